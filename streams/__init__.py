"""Stream processors: Debezium change events in, documents out to the index (and, later, feedback joins)."""
