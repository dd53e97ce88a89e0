"""User feedback: schemas and validation of clicks, ratings and dwell times (issue 3)."""
