"""The feedback stream processor: join feedback to impressions, build examples, cut windows.

One Faust agent reads ``autoglm.impressions`` and ``autoglm.feedback`` (both keyed by
query_id, one partition each), so the two arrive in one ordered stream. The join state per
query_id lives in a Faust table (changelog-backed, so it survives a restart):

- an impression opens an interaction; feedback that came before it (and waited at most
  ``feedback_max_wait_s``) is joined then;
- a feedback event is deduplicated by event_id; a positive one becomes a training example;
- an interaction expires ``impression_ttl_s`` after it opened; feedback still without an
  impression after ``feedback_max_wait_s`` goes to the dead-letter topic. Faust lets only a
  stream modify a table, so expiry runs in the agent, at most once a second. When no events
  come, a timer sends an empty tick to ``autoglm.clock``, which the agent also reads, so
  interactions still settle and expire in a quiet period.

An interaction also counts, once, in the online metrics of the arm that answered it
(feedback/online.py; a second table keyed by model version and arm, read through ``online()``),
when it is ``online_settle_s`` old: counting an impression before its clicks could arrive would
bias the arm with the most recent traffic (a new challenger) downwards. Feedback after that
still makes examples but no longer changes the online metrics.

Examples go to the example store (deduplicated). When ``window_size`` new examples exist,
or ``window_minutes`` passed with at least ``window_min`` of them, a window is closed and a
training request is published to ``autoglm.training``.
"""

from __future__ import annotations

import json
import logging
import time

import faust
from pydantic import ValidationError
from prometheus_client import Counter, Gauge

from autoglm import topics
from autoglm.interactions import Feedback, Impression, TrainingRequest
from autoglm.settings import Settings
from feedback.examples import ExamplePolicy, build_example, is_positive
from feedback.online import METRICS, RANKS, ArmStats
from feedback.propensity import PositionBiasModel
from feedback.store import ExampleStore
from search.serving import CHAMPION
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


class FeedbackProcessor:
    def __init__(self, app: faust.App, settings: Settings, store: ExampleStore,
                 policy: ExamplePolicy = ExamplePolicy()):
        self.app, self.settings, self.store, self.policy = app, settings, store, policy
        shown, clicked = store.rank_stats()
        self.bias = PositionBiasModel(shown=shown, clicked=clicked,
                                      estimate_from_log=settings.propensities == "log")
        self.dead_letters = DeadLetters(app)
        self.training = app.topic(topics.TRAINING, key_serializer="raw", value_serializer="raw")
        self.interactions = app.Table("interactions", default=None, partitions=1)
        self.arm_stats = app.Table("arm_stats", default=None, partitions=1)
        self._online: dict[tuple[str, str], ArmStats] = {}
        self._last_sweep = 0.0
        self._started_at = time.time()
        source = app.topic(topics.IMPRESSIONS, topics.FEEDBACK, topics.CLOCK,
                           key_serializer="raw", value_serializer="raw")
        self.clock = app.topic(topics.CLOCK, key_serializer="raw", value_serializer="raw")
        app.agent(source, name="feedback-join")(self._join)
        app.timer(_EXPIRY_SWEEP_S)(self._tick_when_idle)
        app.timer(10.0)(self._close_window_on_time)

    async def _join(self, stream) -> None:
        async for event in stream.events():
            await self._expire()
            message = event.message
            if message.topic == topics.CLOCK:
                continue
            kind = "impression" if message.topic == topics.IMPRESSIONS else "feedback"
            try:
                parsed = (Impression if kind == "impression" else Feedback).model_validate_json(message.value)
            except (ValidationError, ValueError, TypeError) as exc:
                FEEDBACK_EVENTS.labels(kind, "invalid").inc()
                await self.dead_letters.send(message, f"invalid {kind}: {_first_error(exc)}")
                continue
            try:
                if isinstance(parsed, Impression):
                    await self._on_impression(parsed)
                else:
                    await self._on_feedback(parsed, message)
            except Exception as exc:  # a bug must cost one record, not the stream
                log.exception("feedback processing failed")
                FEEDBACK_EVENTS.labels(kind, "failed").inc()
                await self.dead_letters.send(message, f"processing failed: {exc!r}")

    async def _on_impression(self, impression: Impression) -> None:
        state = self.interactions.get(impression.query_id) or _new_state()
        if state["impression"] is not None:
            FEEDBACK_EVENTS.labels("impression", "duplicate").inc()
            return
        state["impression"] = json.loads(impression.model_dump_json())
        self.bias.observe_impression(len(impression.hits))
        self.store.add_rank_stats(shown_ranks=len(impression.hits))
        FEEDBACK_EVENTS.labels("impression", "joined").inc()
        waiting = [Feedback.model_validate(item["event"]) for item in state["feedback"]]
        FEEDBACK_EVENTS.labels("feedback", "joined").inc(len(waiting))
        self.interactions[impression.query_id] = state
        await self._add_examples(impression, [f for f in waiting if is_positive(f, self.policy)], waiting)

    async def _on_feedback(self, event: Feedback, message) -> None:
        state = self.interactions.get(event.query_id) or _new_state()
        if str(event.event_id) in state["event_ids"]:
            FEEDBACK_EVENTS.labels("feedback", "duplicate").inc()
            return
        state["event_ids"].append(str(event.event_id))
        state["feedback"].append({"event": json.loads(event.model_dump_json()), "partition": message.partition,
                                  "offset": message.offset})
        self.interactions[event.query_id] = state
        if event.type == "click":
            self.bias.observe_click(event.position)
            self.store.add_rank_stats(clicked_rank=event.position)
        if state["impression"] is None:
            FEEDBACK_EVENTS.labels("feedback", "waiting").inc()
            return
        FEEDBACK_EVENTS.labels("feedback", "joined").inc()
        if is_positive(event, self.policy):
            known = [Feedback.model_validate(item["event"]) for item in state["feedback"]]
            await self._add_examples(Impression.model_validate(state["impression"]), [event], known)

    def online(self) -> dict[tuple[str, str], ArmStats]:
        """(model version, arm) -> online metrics so far; a copy, safe to read from other threads."""
        return dict(self._online)

    def _count_online(self, state: dict) -> None:
        """Fold a settled interaction into its arm's metrics: one impression, its first click in
        the top 10 (by time), whether it was skipped."""
        impression = state["impression"]
        arm = impression.get("arm", CHAMPION)  # impressions stored before arms existed
        key = f"{impression['model_version']}|{arm}"
        stats = ArmStats(**(self.arm_stats.get(key) or {}))
        stats.impressions += 1
        events = [item["event"] for item in state["feedback"]]
        first_click = next((e for e in events if e["type"] == "click" and e["position"] <= RANKS), None)
        if first_click:
            stats.clicked += 1
            stats.reciprocal_rank_sum += 1.0 / first_click["position"]
        stats.skipped += any(e["type"] == "skip" for e in events)
        self.arm_stats[key] = stats.to_dict()
        self._publish_online(impression["model_version"], arm, stats)

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
            for key, counts in self.arm_stats.items():
                self._publish_online(*key.split("|", 1), ArmStats(**counts))
        for query_id, state in list(self.interactions.items()):
            age = now - state["opened_at"]
            if state["impression"] is not None and not state.get("counted") and age >= self.settings.online_settle_s:
                self._count_online(state)
                state["counted"] = True
                self.interactions[query_id] = state
            if state["impression"] is None and age > self.settings.feedback_max_wait_s:
                for item in state["feedback"]:
                    FEEDBACK_EVENTS.labels("feedback", "no_impression").inc()
                    await self.dead_letters.send(_Orphan(query_id, item),
                                                 f"no impression for query_id within "
                                                 f"{self.settings.feedback_max_wait_s:.0f} s")
                del self.interactions[query_id]
            elif state["impression"] is not None and age > self.settings.impression_ttl_s:
                del self.interactions[query_id]

    async def _tick_when_idle(self) -> None:
        """Wake the agent when interactions wait to settle or expire and no event has come for a while."""
        if time.time() - self._last_sweep > 2 * _EXPIRY_SWEEP_S and len(self.interactions):
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


class _Orphan:
    """A feedback event that never met its impression, shaped as the record it came in."""

    def __init__(self, query_id: str, item: dict):
        self.topic, self.partition, self.offset = topics.FEEDBACK, item["partition"], item["offset"]
        self.key, self.value = query_id.encode(), json.dumps(item["event"]).encode()


def _new_state() -> dict:
    return {"impression": None, "feedback": [], "event_ids": [], "opened_at": time.time()}


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        return f"{'.'.join(map(str, error['loc'])) or 'event'}: {error['msg']}"
    return str(exc)
