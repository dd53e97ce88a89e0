"""``autoglm learn``: the learning loop's composition root.

The join of impressions and feedback, examples, windows, training, the gate, registry writes,
online metrics, the canary guard and the champion watch. Several learners may run in one
consumer group: the one Faust assigns the (single) feedback partition is active, the others
stand by with the join tables replicated, and take over when it dies (Faust's rebalance, after
the broker session timeout). Examples and windows live in the shared example store, the
training requests on ``autoglm.training`` (only the active learner's trainer is in the trainer
group, so it takes each; a request it did not finish goes to the one that takes over, which does
not train it again if a run already decided it), the replay reservoir with each run in MLflow
(the trainer continues from the newest one logged), and the online
metrics go to ``autoglm.online`` for every serve replica to show.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from autoglm import topics
from autoglm.settings import Settings
from roles import parts

log = logging.getLogger(__name__)


@dataclass
class Learner:
    """The learning parts of one process, started on a Faust app someone else runs."""

    feedback: object
    store: object
    guard: object | None
    follower: object | None
    training: object | None
    board: object | None

    def active(self) -> bool:
        return self.feedback.holds_join

    def verdicts(self) -> dict[str, str | None]:
        def reason(verdict) -> str | None:
            return verdict.reason if verdict else None

        guard = self.guard
        return {"canary": reason(guard and guard.last_verdict),
                "champion_watch": reason(guard and guard.last_champion_verdict)}

    def problem(self) -> str | None:
        return self.training.last_error if self.training else None

    def stop(self) -> None:
        for part in (self.board, self.training, self.guard, self.follower):
            if part:
                part.stop()
        self.store.close()


def start_learner(app, settings: Settings, index, registry, models=None, follower=None,
                  trainer_group: str | None = None, publish_board: bool = True) -> Learner:
    """``models``/``follower``: the serving arms when this process also serves (the guard watches
    those); a learner on its own follows the aliases itself, on torch (it only needs versions)."""
    from feedback.online_board import BoardPublisher, board_snapshot
    from registry.rollback import RollbackGuard
    from streams.feedback import FeedbackProcessor

    store = parts.open_example_store(settings)
    feedback = FeedbackProcessor(app, settings, store)
    own_follower = None
    if registry and follower is None:
        models, follower = parts.start_serving(settings.replace(query_runtime="torch"), registry)
        own_follower = follower
    guard = None
    if follower and settings.auto_rollback:
        guard = RollbackGuard(registry, models, feedback.online, follower.wake, settings.rollback_alpha,
                              settings.rollback_min_impressions, settings.champion_watch,
                              active=lambda: feedback.holds_join).start()
        follower.promotion_listeners.append(guard.promoted)
    training = None
    if registry:
        training = parts.start_trainer(settings, index, store, registry, follower.sync,
                                       trainer_group or f"{settings.learn_group_id}-trainer",
                                       active=lambda: feedback.holds_join)
    learner = Learner(feedback, store, guard, own_follower, training, None)
    if publish_board:
        learner.board = BoardPublisher(settings.broker, lambda: board_snapshot(feedback.online(), learner.verdicts()),
                                       learner.active).start()
    return learner


def run_learn(settings: Settings) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from autoglm.health_api import create_health_app
    from streams.faust_app import create_faust_app

    if settings.index_backend != "elasticsearch":
        raise ValueError("`autoglm learn` shares its examples with the other learners through Elasticsearch: "
                         "pass --index elasticsearch --es-url URL (or run `autoglm up` for one process)")
    topics.ensure_topics(settings.broker, topics.PLATFORM_TOPICS, partitions=1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    index = parts.open_index(settings)
    registry = parts.open_registry(settings)
    app = create_faust_app(settings.learn_group_id, settings)
    learner = start_learner(app, settings, index, registry)
    broker_probe, index_probe = parts.BrokerProbe(settings.broker), parts.index_probe(index)

    def health() -> dict[str, str | None]:
        return {"broker": broker_probe(), "learner": learner.problem(), "index": index_probe()}

    def role() -> dict:
        return {"role": "learn", "active": learner.active()}

    http = parts.HttpServer(create_health_app("Open-AutoGLM learner", health, role), settings, "learn-http").start()
    try:
        parts.run_faust(app)
    finally:
        http.stop()
        learner.stop()
        index.close()
