"""The feedback stream processor: Faust wiring for the join, examples, windows and online metrics.

One Faust agent reads ``autoglm.impressions`` and ``autoglm.feedback`` (both keyed by
query_id, one partition each), so the two arrive in one ordered stream, and joins them
(streams/feedback_join.py) in the Faust table ``interactions``, changelog-backed so it survives
a restart. What the join keeps flows on within the agent:

- a stored impression counts its shown ranks and a stored click its rank for the propensities,
  and feedback that met its impression makes training examples (feedback/example_sink.py);
- new examples may fill a training window, published to ``autoglm.training``
  (streams/training_windows.py);
- a settled interaction counts in the online metrics of its arm (streams/online_metrics.py;
  the table ``arm_stats``, read through ``online()``).

Faust lets only a stream modify a table, so the sweep (settling and expiring interactions,
dead-lettering orphaned feedback, closing windows on time) runs in the agent too, at most once a
second. When no events come, a timer sends an empty tick to ``autoglm.clock``, which the agent
also reads, so interactions still settle and expire, and windows close on time, in a quiet
period.

Everything runs in the agent, so only the worker that owns the join partition joins and closes
windows: with several learners in one consumer group, that one is the active learner and the
others stand by (``holds_join``); Faust's rebalance hands the partition, with the join tables,
to a standby when it dies, and the new owner re-reads the example store.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import faust

from autoglm import topics
from autoglm.interactions import Feedback, Impression
from autoglm.settings import Settings
from feedback.example_sink import ExampleSink
from feedback.examples import ExamplePolicy
from feedback.online import ArmStats
from feedback.store import ExampleStore
from streams.dead_letters import DeadLetters
from streams.feedback_join import FeedbackJoin, JoinOutputs
from streams.online_metrics import OnlineMetrics
from streams.training_windows import TrainingWindows

log = logging.getLogger(__name__)

_EXPIRY_SWEEP_S = 1.0


class FeedbackProcessor:
    def __init__(self, app: faust.App, settings: Settings, store: ExampleStore,
                 policy: ExamplePolicy = ExamplePolicy()):
        self.app, self.settings, self.store = app, settings, store
        self.examples = ExampleSink(store, settings.propensities == "log", policy)
        dead_letters = DeadLetters(app, settings.dead_letter_max_bytes)
        self.windows = TrainingWindows(store, settings, app.topic(topics.TRAINING, key_serializer="raw",
                                                                  value_serializer="raw"))
        interactions = app.Table("interactions", default=None, partitions=1)
        self.online_metrics = OnlineMetrics(app.Table("arm_stats", default=None, partitions=1),
                                            settings.rollback_alpha)
        self.join = FeedbackJoin(interactions, dead_letters, settings, JoinOutputs(
            impression_stored=self.examples.count_shown, feedback_stored=self.examples.count_click,
            joined=self._add_examples, settled=self.online_metrics.count))
        self._last_sweep = 0.0
        self.holds_join = False  # this worker owns the join partition (the active learner)
        source = app.topic(topics.IMPRESSIONS, topics.FEEDBACK, topics.CLOCK,
                           key_serializer="raw", value_serializer="raw")
        self.clock = app.topic(topics.CLOCK, key_serializer="raw", value_serializer="raw")
        app.agent(source, name="feedback-join")(self._consume)
        app.timer(_EXPIRY_SWEEP_S)(self._tick_when_idle)
        app.on_partitions_assigned.connect(self._on_assigned)

    @property
    def interactions(self):
        """The join state: query_id -> interaction record."""
        return self.join.interactions

    def online(self) -> dict[tuple[str, str], ArmStats]:
        """(model version, arm) -> online metrics so far; a copy, safe to read from other threads."""
        return self.online_metrics.online()

    async def _on_assigned(self, _sender=None, assigned=(), **_kwargs) -> None:
        self.holds_join = any(tp.topic == topics.FEEDBACK for tp in assigned)
        if self.holds_join:
            self.windows.restart_clock()
            try:
                self.store.resume()  # the learner this one takes over from added examples meanwhile
            except Exception:  # the store may be away: the counts catch up with the next window closed
                log.exception("re-reading the example store on taking over the join failed")

    async def _consume(self, stream) -> None:
        async for event in stream.events():
            await self._sweep()
            if event.message.topic != topics.CLOCK:
                await self.join.process(event.message)

    async def _add_examples(self, impression: Impression, feedback: Sequence[Feedback],
                            known: list[Feedback]) -> None:
        if self.examples.add(impression, feedback, known):
            await self.windows.close_if_full()

    async def _sweep(self) -> None:
        now = time.time()
        if now - self._last_sweep < _EXPIRY_SWEEP_S:
            return
        self._last_sweep = now
        try:
            self.online_metrics.publish_restored()
        except Exception:  # only the display of counts restored after a restart; never the agent
            log.exception("showing the restored online metrics failed")
        await self.join.expire(now)
        await self.windows.close_if_due(now)

    async def _tick_when_idle(self) -> None:
        """Wake the agent when interactions wait to settle or expire, or examples wait for a
        window closed on time, and no event has come for a while."""
        waiting = len(self.interactions) or (self.holds_join and self.store.pending())
        if self.holds_join and time.time() - self._last_sweep > 2 * _EXPIRY_SWEEP_S and waiting:
            await self.clock.send(key=b"tick", value=b"")
