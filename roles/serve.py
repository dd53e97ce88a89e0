"""``autoglm serve``: the search API's composition root.

Stateless: it reads the shared index, publishes impressions and feedback to Kafka, follows the
MLflow aliases (by its own webhook at ``--advertise-url``, and by polling), and shows the online
metrics the active learner publishes. Any number of replicas answer alike behind a load balancer.
"""

from __future__ import annotations

import logging
import os

from autoglm import topics
from autoglm.settings import Settings
from roles import parts

log = logging.getLogger(__name__)


def create_search_api(settings: Settings, index, models, registry, alias_hook, publisher, health, online, verdict):
    """The search API over ``index`` and ``models``; ``online``/``verdict`` give the arms' online
    metrics and the guard's verdicts for /models."""
    from registry.overview import models_overview
    from search.api import create_app
    from search.query import SearchService

    def overview() -> dict:
        return models_overview(registry, models, online, settings.rollback_alpha, verdict("canary"),
                               verdict("champion_watch"))

    service = SearchService(index, models, settings.fusion_weights, settings.rrf_k, settings.fusion_candidates)
    return create_app(service, health, publisher, alias_hook, overview, settings.api_limits,
                      settings.feedback_retention_s)


def run_serve(settings: Settings) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from autoglm.publisher import EventPublisher
    from feedback.online_board import BoardView

    if settings.index_backend != "elasticsearch":
        raise ValueError("`autoglm serve` replicas read the index through Elasticsearch: pass --index "
                         "elasticsearch --es-url URL (or run `autoglm up` for one process on the embedded index)")
    topics.ensure_topics(settings.broker, topics.PLATFORM_TOPICS, partitions=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = parts.open_index(settings)
    registry = parts.open_registry(settings)
    models, follower = parts.start_serving(settings, registry)
    alias_hook, webhook_id = parts.register_alias_hook(settings, follower)
    board = BoardView(settings.broker).start()
    publisher = EventPublisher(settings.broker)
    broker_probe, index_probe = parts.BrokerProbe(settings.broker), parts.index_probe(index)

    def health() -> dict[str, str | None]:
        return {"broker": broker_probe(), "index": index_probe()}

    api = create_search_api(settings, index, models, registry, alias_hook, publisher, health, board.online,
                            board.verdict)
    http = parts.HttpServer(api, settings, "search-api").start()
    try:
        parts.wait_for_signal()
    finally:
        http.stop()
        if follower:
            follower.stop()
        parts.unregister_alias_hook(settings, webhook_id)
        board.stop()
        publisher.close()
        index.close()
