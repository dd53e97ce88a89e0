"""``autoglm ingest``: the CDC stream processors' composition root.

N replicas share one consumer group and so the CDC topics' partitions; each writes the
documents of its partitions to the shared index (Elasticsearch) and records per-partition
offsets there (search/elasticsearch.py's commit protocol). /healthz and /metrics are served on
``--host``/``--port``.
"""

from __future__ import annotations

import logging
import threading

from autoglm import topics
from autoglm.settings import Settings
from roles import parts

log = logging.getLogger(__name__)


def start_ingest(app, settings: Settings, index):
    """The CDC processor on ``app``, writing through an ingest sink that first repairs a commit
    cut short; returns (processor, has-joined-its-group event)."""
    from autoglm.encoder import Encoder
    from streams.cdc import CdcProcessor
    from streams.ingest import IngestSink
    from streams.mapping import Mapper

    mapper = Mapper.from_file(settings.mapping_file)
    sink = IngestSink(index, Encoder())
    repaired = sink.repair()
    if repaired:
        log.warning("re-embedded %d documents whose last commit was cut short", repaired)
    processor = CdcProcessor(app, settings, mapper, sink)
    assigned = threading.Event()

    @app.on_partitions_assigned.connect
    async def on_assigned(*_args, **_kwargs) -> None:
        assigned.set()

    return processor, assigned


def ingest_problem(processor, assigned: threading.Event) -> str | None:
    if not assigned.is_set():
        return "stream processor has not joined its consumer group yet"
    if processor.retrying:
        return processor.retrying.describe()
    return None


def run_ingest(settings: Settings) -> None:
    from autoglm.health_api import create_health_app
    from streams.faust_app import create_faust_app

    if settings.index_backend != "elasticsearch":
        raise ValueError("`autoglm ingest` replicas share the index through Elasticsearch: pass --index "
                         "elasticsearch --es-url URL (or run `autoglm up` for one process on the embedded index)")
    topics.ensure_topics(settings.broker, topics.PLATFORM_TOPICS, partitions=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = parts.open_index(settings)
    app = create_faust_app(settings.group_id, settings)
    processor, assigned = start_ingest(app, settings, index)
    broker_probe, index_probe = parts.BrokerProbe(settings.broker), parts.index_probe(index)

    def health() -> dict[str, str | None]:
        return {"broker": broker_probe(), "worker": ingest_problem(processor, assigned), "index": index_probe()}

    http = parts.HttpServer(create_health_app("Open-AutoGLM ingest", health, lambda: {"role": "ingest"}),
                            settings, "ingest-http").start()
    try:
        parts.run_faust(app)
    finally:
        http.stop()
        index.close()
