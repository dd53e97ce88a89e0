"""The feedback stream processor: join feedback to impressions, build examples, cut windows.

One Faust agent reads ``autoglm.impressions`` and ``autoglm.feedback`` (both keyed by
query_id, one partition each), so the two arrive in one ordered stream. The join state per
query_id lives in a Faust table (changelog-backed, so it survives a restart):

- an impression opens an interaction; feedback that came before it (and waited at most
  ``feedback_max_wait_s``) is joined then;
- a feedback event is deduplicated by event_id and by (doc_id, type): the first event per
  (query, document, type) wins, so a later dwell or rating on the same document is a duplicate,
  counted and dropped, not an update. A positive event becomes a training example;
- feedback must be on a document the impression showed, at the position it showed it: once the
  impression is known, other feedback is a dead letter saying so, and so is waiting feedback the
  impression turns out not to match;
- the state per query_id is bounded, since one record is one changelog message (feedback/join.py):
  at most ``feedback_per_query`` events (the backstop while feedback waits for its impression),
  only events on its hits once the impression is known (so at most hits x feedback types), and a
  byte bound for the impression and for the events that keeps the record below 1 MB. What does
  not fit is a dead letter;
- an interaction expires ``impression_ttl_s`` after it opened; feedback still without an
  impression after ``feedback_max_wait_s`` goes to the dead-letter topic, each event leaving the
  state once its letter is delivered (a failed send resumes there, it does not repeat letters).
  An interaction that cannot be counted in the online metrics still expires. Faust lets only a
  stream modify a table, so expiry runs in the agent, at most once a second. When no events
  come, a timer sends an empty tick to ``autoglm.clock``, which the agent also reads, so
  interactions still settle and expire in a quiet period.

An interaction also counts, once, in the online metrics of the arm that answered it
(feedback/online.py; a second table keyed by model version and arm, read through ``online()``),
when it is ``online_settle_s`` old: counting an impression before its clicks could arrive would
bias the arm with the most recent traffic (a new challenger) downwards. Feedback after that
still makes examples but no longer changes the online metrics.

Examples go to the example store (deduplicated; feedback/store.py). When ``window_size`` new
examples exist, or ``window_minutes`` passed with at least ``window_min`` of them, a window is
closed and a training request is published to ``autoglm.training``. Both checks run in the
agent, so only the worker that owns the join partition closes windows: with several learners
in one consumer group, that one is the active learner and the others stand by (``holds_join``);
Faust's rebalance hands the partition, with the join tables, to a standby when it dies.

Anyone can produce to the input topics, so a record is validated at the edge (autoglm/
interactions.py) and any failure in parsing or joining it dead-letters that record alone: the
join state holds only validated values, and the agent never stops on a record.
"""

from __future__ import annotations

import logging
import time

import faust
from pydantic import ValidationError
from prometheus_client import Counter, Gauge

from autoglm import topics
from autoglm.interactions import (Feedback, Impression, TrainingRequest, first_error, parse_feedback_json,
                                  parse_impression_json)
from autoglm.settings import Settings
from feedback.examples import ExamplePolicy, build_example, is_positive
from feedback.join import Interaction, JoinLimits, StoredFeedback, Verdict, expiry_facts
from feedback.online import METRICS, RANKS, ArmStats
from feedback.propensity import PositionBiasModel
from feedback.store import ExampleStore
from streams.dead_letters import DeadLetters

log = logging.getLogger(__name__)

FEEDBACK_EVENTS = Counter("autoglm_feedback_events", "Feedback and impression records by outcome",
                          ["kind", "outcome"])
EXAMPLES = Counter("autoglm_training_examples", "Training examples stored (new, not duplicates)")
WINDOWS = Counter("autoglm_training_windows", "Training windows closed", ["reason"])
ONLINE = Gauge("autoglm_online_metric", "Online metrics per model version and arm, with the bounds of "
               "their anytime-valid confidence interval", ["version", "arm", "metric", "stat"])
ONLINE_IMPRESSIONS = Gauge("autoglm_online_impressions", "Impressions joined per model version and arm",
                           ["version", "arm"])

_EXPIRY_SWEEP_S = 1.0
_WINDOW_CHECK_S = 10.0


class FeedbackProcessor:
    def __init__(self, app: faust.App, settings: Settings, store: ExampleStore,
                 policy: ExamplePolicy = ExamplePolicy()):
        self.app, self.settings, self.store, self.policy = app, settings, store, policy
        shown, clicked = store.rank_stats()
        self.bias = PositionBiasModel(shown=shown, clicked=clicked,
                                      estimate_from_log=settings.propensities == "log")
        self.dead_letters = DeadLetters(app, settings.dead_letter_max_bytes)
        self.limits = JoinLimits(feedback_per_query=settings.feedback_per_query)
        self.training = app.topic(topics.TRAINING, key_serializer="raw", value_serializer="raw")
        self.interactions = app.Table("interactions", default=None, partitions=1)
        self.arm_stats = app.Table("arm_stats", default=None, partitions=1)
        self._online: dict[tuple[str, str], ArmStats] = {}
        self._last_sweep = self._last_window_check = 0.0
        self._started_at = time.time()
        self.holds_join = False  # this worker owns the join partition (the active learner)
        source = app.topic(topics.IMPRESSIONS, topics.FEEDBACK, topics.CLOCK,
                           key_serializer="raw", value_serializer="raw")
        self.clock = app.topic(topics.CLOCK, key_serializer="raw", value_serializer="raw")
        app.agent(source, name="feedback-join")(self._join)
        app.timer(_EXPIRY_SWEEP_S)(self._tick_when_idle)
        app.on_partitions_assigned.connect(self._on_assigned)

    async def _on_assigned(self, _sender=None, assigned=(), **_kwargs) -> None:
        self.holds_join = any(tp.topic == topics.FEEDBACK for tp in assigned)
        if self.holds_join:
            self._started_at = time.time()  # a window closed on time counts from the takeover at the earliest
            try:
                self.store.resume()  # the learner this one takes over from added examples meanwhile
            except Exception:  # the store may be away: the counts catch up with the next window closed
                log.exception("re-reading the example store on taking over the join failed")

    async def _join(self, stream) -> None:
        async for event in stream.events():
            await self._expire()
            message = event.message
            if message.topic == topics.CLOCK:
                continue
            kind = "impression" if message.topic == topics.IMPRESSIONS else "feedback"
            parse = parse_impression_json if kind == "impression" else parse_feedback_json
            try:
                parsed = parse(message.value, retention_s=self.settings.feedback_retention_s)
            except ValidationError as exc:
                FEEDBACK_EVENTS.labels(kind, "invalid").inc()
                await self.dead_letters.send(message, f"invalid {kind}: {first_error(exc)}")
                continue
            try:
                if isinstance(parsed, Impression):
                    await self._on_impression(parsed, message)
                else:
                    await self._on_feedback(parsed, message)
            except Exception as exc:  # a bug must cost one record, not the stream
                log.exception("feedback processing failed")
                FEEDBACK_EVENTS.labels(kind, "failed").inc()
                await self.dead_letters.send(message, f"processing failed: {type(exc).__name__}")

    def _interaction(self, query_id: str) -> Interaction:
        return Interaction.from_record(query_id, self.interactions.get(query_id), time.time(), self.limits)

    async def _count_and_dead_letter(self, kind: str, verdict: Verdict, message) -> None:
        FEEDBACK_EVENTS.labels(kind, verdict.outcome).inc()
        if verdict.outcome == "refused":
            await self.dead_letters.send(message, verdict.reason)

    async def _on_impression(self, impression: Impression, message) -> None:
        interaction = self._interaction(impression.query_id)
        verdict = interaction.add_impression(impression, self.limits)
        await self._count_and_dead_letter("impression", verdict, message)
        if not verdict.kept:
            return
        for item, reason in verdict.unmatched:  # delivered before the state forgets them
            FEEDBACK_EVENTS.labels("feedback", "refused").inc()
            await self.dead_letters.send(_StoredRecord(impression.query_id, item), reason)
        self.interactions[impression.query_id] = interaction.to_record()
        self.bias.observe_impression(len(impression.hits))
        self.store.add_rank_stats(shown_ranks=len(impression.hits))
        FEEDBACK_EVENTS.labels("feedback", "joined").inc(len(verdict.joined_feedback))
        positives = [f for f in verdict.joined_feedback if is_positive(f, self.policy)]
        await self._add_examples(impression, positives, list(verdict.joined_feedback))

    async def _on_feedback(self, event: Feedback, message) -> None:
        interaction = self._interaction(event.query_id)
        verdict = interaction.add_feedback(event, message.partition, message.offset, self.limits)
        await self._count_and_dead_letter("feedback", verdict, message)
        if not verdict.kept:
            return
        self.interactions[event.query_id] = interaction.to_record()
        if event.type == "click":
            self.bias.observe_click(event.position)
            self.store.add_rank_stats(clicked_rank=event.position)
        if verdict.outcome == "joined" and is_positive(event, self.policy):
            await self._add_examples(interaction.impression, [event], interaction.events)

    def online(self) -> dict[tuple[str, str], ArmStats]:
        """(model version, arm) -> online metrics so far; a copy, safe to read from other threads."""
        return dict(self._online)

    def _count_online(self, interaction: Interaction) -> None:
        """Fold a settled interaction into its arm's metrics: one impression, its first click in
        the top 10 (by time), whether it was skipped."""
        impression = interaction.impression
        key = f"{impression.model_version}|{impression.arm}"
        stats = self._arm_stats(key)
        stats.impressions += 1
        events = interaction.events
        first_click = next((e for e in events if e.type == "click" and e.position <= RANKS), None)
        if first_click:
            stats.clicked += 1
            stats.reciprocal_rank_sum += 1.0 / first_click.position
        stats.skipped += any(e.type == "skip" for e in events)
        self.arm_stats[key] = stats.to_dict()
        self._publish_online(impression.model_version, impression.arm, stats)

    def _arm_stats(self, key: str) -> ArmStats:
        """The arm's counts so far; a record that cannot be read (another version wrote it) starts afresh."""
        counts = self.arm_stats.get(key) or {}
        try:
            return ArmStats(**counts)
        except TypeError:
            log.warning("online metrics of %r unreadable: %.200r; counting afresh", key, counts)
            return ArmStats()

    def _publish_online(self, version: str, arm: str, stats: ArmStats) -> None:
        self._online[(version, arm)] = stats
        ONLINE_IMPRESSIONS.labels(version, arm).set(stats.impressions)
        for metric in METRICS:
            low, high = stats.bounds(metric, self.settings.rollback_alpha)
            for stat, value in (("value", stats.mean(metric)), ("lower", low), ("upper", high)):
                ONLINE.labels(version, arm, metric, stat).set(value)

    async def _add_examples(self, impression: Impression, positives: list[Feedback],
                            known: list[Feedback]) -> None:
        examples = [example for positive in positives
                    if (example := build_example(impression, positive, known, self.bias, self.policy))]
        if examples:
            EXAMPLES.inc(self.store.add(examples))
            if self.store.pending() >= self.settings.window_size:
                await self._close_window("size")

    async def _expire(self) -> None:
        now = time.time()
        if now - self._last_sweep < _EXPIRY_SWEEP_S:
            return
        self._last_sweep = now
        if not self._online and self.arm_stats:  # first sweep after a restart: show what the table holds
            for key in list(self.arm_stats.keys()):
                self._publish_online(*key.split("|", 1), self._arm_stats(key))
        for query_id, record in list(self.interactions.items()):
            try:
                await self._expire_one(query_id, record, now)
            except Exception:  # never the agent: the next sweep tries again
                log.exception("expiry of the join state of %r failed", query_id)
        if now - self._last_window_check >= _WINDOW_CHECK_S:
            self._last_window_check = now
            try:
                await self._close_window_on_time()
            except Exception:  # the store may be away; the next check tries again
                log.exception("closing a window on time failed")

    async def _expire_one(self, query_id: str, record, now: float) -> None:
        facts = expiry_facts(query_id, record)
        if facts is None:
            del self.interactions[query_id]
            return
        age = now - facts.opened_at
        if not facts.has_impression:
            if age > self.settings.feedback_max_wait_s:
                await self._dead_letter_orphans(query_id, record, now)
            return
        if not facts.counted and age >= self.settings.online_settle_s:
            try:
                self._count_settled(query_id, record, now)
            except Exception:  # the record still expires below
                log.exception("counting the interaction of %r in the online metrics failed", query_id)
        if age > self.settings.impression_ttl_s:
            del self.interactions[query_id]

    def _count_settled(self, query_id: str, record, now: float) -> None:
        """Count a settled interaction once: it is marked counted first, so a failure in counting
        can neither count it twice nor be retried every sweep."""
        interaction = Interaction.from_record(query_id, record, now, self.limits)
        interaction.counted = True
        self.interactions[query_id] = interaction.to_record()
        if interaction.impression is not None:
            self._count_online(interaction)

    async def _dead_letter_orphans(self, query_id: str, record, now: float) -> None:
        """Dead-letter the feedback that never met its impression, then forget the query. An event
        leaves the state once its letter is delivered, so after a failed send the next sweep
        resumes with the first letter not sent."""
        interaction = Interaction.from_record(query_id, record, now, self.limits)
        reason = f"no impression for query_id within {self.settings.feedback_max_wait_s:.0f} s"
        try:
            for item in list(interaction.feedback):
                await self.dead_letters.send(_StoredRecord(query_id, item), reason)
                FEEDBACK_EVENTS.labels("feedback", "no_impression").inc()
                interaction.remove(item)
        finally:
            if interaction.feedback:
                self.interactions[query_id] = interaction.to_record()
            else:
                del self.interactions[query_id]

    async def _tick_when_idle(self) -> None:
        """Wake the agent when interactions wait to settle or expire, or examples wait for a
        window closed on time, and no event has come for a while."""
        waiting = len(self.interactions) or (self.holds_join and self.store.pending())
        if self.holds_join and time.time() - self._last_sweep > 2 * _EXPIRY_SWEEP_S and waiting:
            await self.clock.send(key=b"tick", value=b"")

    async def _close_window_on_time(self) -> None:
        last = self.store.last_window()
        opened = last.created_at if last else self._started_at
        if (time.time() - opened >= self.settings.window_minutes * 60
                and self.store.pending() >= self.settings.window_min):
            await self._close_window("time")

    async def _close_window(self, reason: str) -> None:
        window = self.store.close_window(reason, self.settings.session_share)
        if window is None:
            return
        WINDOWS.labels(reason).inc()
        request = TrainingRequest(**{k: v for k, v in window.__dict__.items() if k != "created_at"})
        delivery = await self.training.send(key=str(window.window_id).encode(),
                                            value=request.model_dump_json().encode())
        await delivery
        log.info("window %d closed (%s): %d examples from %d sessions, %d capped", window.window_id,
                 reason, window.examples, window.sessions, window.dropped_by_session_cap)


class _StoredRecord:
    """A stored feedback event shaped as the record it came in, for its dead letter."""

    def __init__(self, query_id: str, item: StoredFeedback):
        self.topic, self.partition, self.offset = topics.FEEDBACK, item.partition, item.offset
        self.key, self.value = query_id.encode(), item.event.model_dump_json().encode()
