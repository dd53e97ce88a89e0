"""MLflow model registry: versions, aliases and the model served (issues 3 and 4)."""
