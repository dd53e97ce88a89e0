"""``autoglm worker``: the three roles in one process, what ``autoglm up`` runs on the embedded default.

The embedded index lives in this process's data dir, so ingest, search and learning share one
process: the search API runs in a thread and reads the index the CDC processor writes, with no
second copy to reload. The Faust worker owns the main thread and its signal handling:
SIGINT/SIGTERM stop the stream, then the API, then close the index. The parts are the roles'
own (roles/ingest.py, serve.py, learn.py).
"""

from __future__ import annotations

import logging
import os

from autoglm import topics
from autoglm.settings import Settings
from roles import parts
from roles.parts import DataDirInUse, lock_data_dir  # noqa: F401  # the CLI's `up` checks the lock

log = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from autoglm.publisher import EventPublisher
    from roles.ingest import ingest_problem, start_ingest
    from roles.learn import start_learner
    from roles.serve import create_search_api
    from streams.faust_app import create_faust_app

    lock = lock_data_dir(settings)
    topics.ensure_topics(settings.broker, topics.PLATFORM_TOPICS, partitions=1)
    index = parts.open_index(settings)
    registry = parts.open_registry(settings)
    # The query side has its own encoders: queries never wait behind a document batch, and
    # fine-tuned versions (query side only) swap in without touching document vectors.
    models, follower = parts.start_serving(settings, registry)
    alias_hook, webhook_id = parts.register_alias_hook(settings, follower)

    app = create_faust_app(settings.group_id, settings)
    processor, assigned = start_ingest(app, settings, index)
    learner = start_learner(app, settings, index, registry, models, follower,
                            trainer_group=f"{settings.group_id}-trainer", publish_board=False)
    broker_probe, index_probe = parts.BrokerProbe(settings.broker), parts.index_probe(index)

    def health() -> dict[str, str | None]:
        return {"broker": broker_probe(), "worker": ingest_problem(processor, assigned) or learner.problem(),
                "index": index_probe()}

    publisher = EventPublisher(settings.broker)
    api = create_search_api(settings, index, models, registry, alias_hook, publisher, health,
                            learner.feedback.online, lambda name: learner.verdicts()[name])
    http = parts.HttpServer(api, settings, "search-api").start()
    try:
        parts.run_faust(app)
    finally:
        http.stop()
        learner.stop()
        if follower:
            follower.stop()
        parts.unregister_alias_hook(settings, webhook_id)
        publisher.close()
        index.close()
        lock.close()
