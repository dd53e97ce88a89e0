"""Prometheus metrics of the worker and the API (one registry per process, served on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("autoglm_events_received", "Records read from CDC topics, by Debezium op "
                   "(c, u, d, r, t; tombstone; invalid)", ["op"])
EVENTS = Counter("autoglm_events", "Changes by kind (upsert, delete, truncate) and outcome "
                 "(applied, stale, duplicate)", ["op", "outcome"])
DEAD_LETTERS = Counter("autoglm_dead_letters", "Records sent to the dead-letter topic", ["reason"])
BATCH_SIZE = Histogram("autoglm_batch_size", "Change events per ingest batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
EMBEDDED = Counter("autoglm_documents_embedded", "Documents run through the encoder")
VECTORS_REUSED = Counter("autoglm_vectors_reused", "Updates whose title and text were unchanged")
COMMIT_SECONDS = Histogram("autoglm_commit_seconds", "Durable index commit latency",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
FRESHNESS_SECONDS = Histogram("autoglm_freshness_seconds",
                              "From the event's source ts_ms to searchable",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
DOCUMENTS = Gauge("autoglm_documents", "Live documents in the index")
SEARCH_SECONDS = Histogram("autoglm_search_seconds", "Search latency, query encoding included",
                           ["mode"], buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1))


def sample_value(exposition: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples in Prometheus text whose labels include the given ones (0 when absent)."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{")[0] == name and all(f'{key}="{val}"' in series for key, val in labels.items()):
            total += float(value)
    return total
