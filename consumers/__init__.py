"""Plain confluent-kafka consumers for work that is not a stream transformation (the trainer, issue 3)."""
