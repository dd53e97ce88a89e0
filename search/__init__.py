"""Search: the index protocol, its backends, fusion of rankers, the query service and the HTTP API."""
