"""The impression/feedback join: records validated, joined per query_id, expired, dead-lettered.

Anyone can produce to the input topics, so a record is validated at the edge (autoglm/
interactions.py) and any failure in parsing or joining it dead-letters that record alone: the
join state holds only validated values, and the agent never stops on a record. The state per
query_id is the Faust table ``interactions`` (streams/feedback.py), one record of
feedback/join.py's ``Interaction``:

- an impression opens an interaction; feedback that came before it (and waited at most
  ``feedback_max_wait_s``) is joined then;
- a feedback event is deduplicated by event_id and by (doc_id, type): the first event per
  (query, document, type) wins, so a later dwell or rating on the same document is a duplicate,
  counted and dropped, not an update;
- feedback must be on a document the impression showed, at the position it showed it: once the
  impression is known, other feedback is a dead letter saying so, and so is waiting feedback the
  impression turns out not to match;
- the state per query_id is bounded, since one record is one changelog message (feedback/join.py):
  at most ``feedback_per_query`` events (the backstop while feedback waits for its impression),
  only events on its hits once the impression is known (so at most hits x feedback types), and a
  byte bound for the impression and for the events that keeps the record below 1 MB. What does
  not fit is a dead letter;
- an interaction settles ``online_settle_s`` after it opened and is handed on once, to be counted
  in the online metrics; it expires ``impression_ttl_s`` after it opened, even when it could not
  be counted. Feedback still without an impression after ``feedback_max_wait_s`` goes to the
  dead-letter topic, each event leaving the state once its letter is delivered (a failed send
  resumes there, it does not repeat letters).

What the join keeps it hands on through ``JoinOutputs``, always after the state is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, MutableMapping, Sequence

from prometheus_client import Counter
from pydantic import ValidationError

from autoglm import topics
from autoglm.interactions import Feedback, Impression, first_error, parse_feedback_json, parse_impression_json
from autoglm.settings import Settings
from feedback.join import Interaction, JoinLimits, StoredFeedback, Verdict, expiry_facts
from streams.dead_letters import DeadLetters

log = logging.getLogger(__name__)

FEEDBACK_EVENTS = Counter("autoglm_feedback_events", "Feedback and impression records by outcome",
                          ["kind", "outcome"])


@dataclass(frozen=True)
class JoinOutputs:
    """Where the join's results go; each is called from the agent, once the join state is written."""

    impression_stored: Callable[[Impression], None]  # an impression entered the join state
    feedback_stored: Callable[[Feedback], None]  # a feedback event entered it, joined or waiting
    # (impression, feedback that just met it, all feedback known on it): feedback joined
    joined: Callable[[Impression, Sequence[Feedback], list[Feedback]], Awaitable[None]]
    settled: Callable[[Interaction], None]  # an interaction with its impression, online_settle_s old; once


class FeedbackJoin:
    def __init__(self, interactions: MutableMapping, dead_letters: DeadLetters, settings: Settings,
                 outputs: JoinOutputs):
        self.interactions, self.dead_letters, self.settings, self.outputs = (interactions, dead_letters,
                                                                              settings, outputs)
        self.limits = JoinLimits(feedback_per_query=settings.feedback_per_query)

    async def process(self, message) -> None:
        """Validate one impression or feedback record and join it; a failure dead-letters it alone."""
        kind = "impression" if message.topic == topics.IMPRESSIONS else "feedback"
        parse = parse_impression_json if kind == "impression" else parse_feedback_json
        try:
            parsed = parse(message.value, retention_s=self.settings.feedback_retention_s)
        except ValidationError as exc:
            FEEDBACK_EVENTS.labels(kind, "invalid").inc()
            await self.dead_letters.send(message, f"invalid {kind}: {first_error(exc)}")
            return
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
        self.outputs.impression_stored(impression)
        FEEDBACK_EVENTS.labels("feedback", "joined").inc(len(verdict.joined_feedback))
        await self.outputs.joined(impression, verdict.joined_feedback, list(verdict.joined_feedback))

    async def _on_feedback(self, event: Feedback, message) -> None:
        interaction = self._interaction(event.query_id)
        verdict = interaction.add_feedback(event, message.partition, message.offset, self.limits)
        await self._count_and_dead_letter("feedback", verdict, message)
        if not verdict.kept:
            return
        self.interactions[event.query_id] = interaction.to_record()
        self.outputs.feedback_stored(event)
        if verdict.outcome == "joined":
            await self.outputs.joined(interaction.impression, (event,), interaction.events)

    async def expire(self, now: float) -> None:
        """One sweep over the join state: settle, expire and dead-letter what is due."""
        for query_id, record in list(self.interactions.items()):
            try:
                await self.expire_one(query_id, record, now)
            except Exception:  # never the agent: the next sweep tries again
                log.exception("expiry of the join state of %r failed", query_id)

    async def expire_one(self, query_id: str, record, now: float) -> None:
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
                self._settle(query_id, record, now)
            except Exception:  # the record still expires below
                log.exception("counting the interaction of %r in the online metrics failed", query_id)
        if age > self.settings.impression_ttl_s:
            del self.interactions[query_id]

    def _settle(self, query_id: str, record, now: float) -> None:
        """Hand a settled interaction on once: it is marked counted first, so a failure in counting
        can neither count it twice nor be retried every sweep."""
        interaction = Interaction.from_record(query_id, record, now, self.limits)
        interaction.counted = True
        self.interactions[query_id] = interaction.to_record()
        if interaction.impression is not None:
            self.outputs.settled(interaction)

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


class _StoredRecord:
    """A stored feedback event shaped as the record it came in, for its dead letter."""

    def __init__(self, query_id: str, item: StoredFeedback):
        self.topic, self.partition, self.offset = topics.FEEDBACK, item.partition, item.offset
        self.key, self.value = query_id.encode(), item.event.model_dump_json().encode()
