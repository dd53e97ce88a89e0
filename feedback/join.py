"""The feedback join's state for one query_id, and what an impression or a feedback event does to it.

Plain code over a plain record (the value of the Faust table ``interactions``, see
streams/feedback.py), so its bounds can be checked without a broker. The record travels as one
Kafka message on the table's changelog, and anyone can produce feedback for any query_id, so it
stays bounded whatever arrives:

- feedback must be on a shown document: once the impression is known, an event whose doc_id is
  not among its hits, or whose position is not where that document was shown, is refused, and
  feedback that waited for the impression and does not match it is handed back to be
  dead-lettered. So the stored events are at most hits x feedback types;
- one stored event per (doc_id, type): a repeat, by event_id or by the same action on the same
  document, is a duplicate, counted and not stored;
- at most ``feedback_per_query`` stored events, a backstop while feedback waits for its
  impression; the caller dead-letters the rest;
- the impression takes at most ``impression_bytes`` as JSON, and the stored events together at
  most ``feedback_bytes``, so the record stays below the 1 MB a broker takes by default. Every
  impression the schema accepts (at most ``MAX_HITS`` hits) fits its bound;
- event ids are remembered only inside the stored events, so their memory has the same bound.

Only validated, normalised values are stored, and they are read back through the same schemas
with no age limit (a stored value passed once, so it passes again): an entry that cannot be read
(an older version wrote it) is dropped with a log line, and the query keeps the rest.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from autoglm.interactions import Feedback, Impression, first_error, parse_feedback, parse_impression
from autoglm.settings import Settings

log = logging.getLogger(__name__)

Outcome = Literal["joined", "waiting", "duplicate", "refused"]


@dataclass(frozen=True)
class JoinLimits:
    feedback_per_query: int = Settings.feedback_per_query
    # The largest impression the schema accepts takes ~445 KB (see the tests); together with the
    # feedback and the record's framing the changelog message stays below 1 MB.
    impression_bytes: int = 600_000
    feedback_bytes: int = 300_000


@dataclass(frozen=True)
class StoredFeedback:
    event: Feedback
    partition: int  # where it came from, for its dead letter if it never joins
    offset: int

    def to_record(self) -> dict:
        return {"event": self.event.model_dump(mode="json"), "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str | None = None  # why it was refused: the dead letter's reason
    joined_feedback: tuple[Feedback, ...] = ()  # the waiting feedback an impression joined
    unmatched: tuple[tuple[StoredFeedback, str], ...] = ()  # waiting feedback it does not match, and why

    @property
    def kept(self) -> bool:
        """Whether the record is now in the join state (and the state must be written)."""
        return self.outcome in ("joined", "waiting")


@dataclass
class Interaction:
    opened_at: float  # time.time() of the first record for this query_id
    impression: Impression | None = None
    feedback: list[StoredFeedback] = field(default_factory=list)
    counted: bool = False  # in the online metrics already
    _feedback_bytes: int = field(default=0, init=False, repr=False)

    @property
    def events(self) -> list[Feedback]:
        return [item.event for item in self.feedback]

    def add_impression(self, impression: Impression, limits: JoinLimits) -> Verdict:
        """Store the impression; the waiting feedback it does not match leaves the state, with
        its reason, for the caller to dead-letter."""
        if self.impression is not None:
            return Verdict("duplicate")
        size = _json_bytes(impression.model_dump(mode="json"))
        if size > limits.impression_bytes:
            return Verdict("refused", f"impression too large: {size} bytes of JSON, the join keeps at most "
                                      f"{limits.impression_bytes}")
        self.impression = impression
        waiting, self.feedback, self._feedback_bytes = self.feedback, [], 0
        unmatched = []
        for item in waiting:
            mismatch = self._mismatch(item.event)
            if mismatch:
                unmatched.append((item, mismatch))
            else:
                self._store(item)
        return Verdict("joined", joined_feedback=tuple(self.events), unmatched=tuple(unmatched))

    def add_feedback(self, event: Feedback, partition: int, offset: int, limits: JoinLimits) -> Verdict:
        item = StoredFeedback(event, partition, offset)
        refusal = self._refusal(item, limits)
        if refusal:
            return refusal
        self._store(item)
        return Verdict("waiting" if self.impression is None else "joined")

    def remove(self, item: StoredFeedback) -> None:
        """Take a stored event out of the state (its dead letter was delivered)."""
        self.feedback.remove(item)
        self._feedback_bytes -= _record_bytes(item)

    def _store(self, item: StoredFeedback) -> None:
        self.feedback.append(item)
        self._feedback_bytes += _record_bytes(item)

    def _refusal(self, item: StoredFeedback, limits: JoinLimits) -> Verdict | None:
        event = item.event
        if any(known.event_id == event.event_id or (known.doc_id, known.type) == (event.doc_id, event.type)
               for known in self.events):
            return Verdict("duplicate")
        mismatch = self._mismatch(event)
        if mismatch:
            return Verdict("refused", mismatch)
        if len(self.feedback) >= limits.feedback_per_query:
            return Verdict("refused", f"too many feedback events for one query_id: the limit is "
                                      f"{limits.feedback_per_query}")
        size = self._feedback_bytes + _record_bytes(item)
        if size > limits.feedback_bytes:
            return Verdict("refused", f"join state full: feedback for this query_id would take {size} bytes "
                                      f"of JSON, the join keeps at most {limits.feedback_bytes}")
        return None

    def _mismatch(self, event: Feedback) -> str | None:
        """Why the event is not on a hit of the impression; None when it is, or no impression is known."""
        if self.impression is None:
            return None
        positions = [hit.position for hit in self.impression.hits if hit.doc_id == event.doc_id]
        if not positions:
            return (f"feedback on a document not shown: doc_id {event.doc_id!r} was not shown for "
                    f"query_id {event.query_id!r}")
        if event.position not in positions:
            return (f"feedback position does not match the impression: doc_id {event.doc_id!r} was shown at "
                    f"position {', '.join(map(str, positions))}, not {event.position}, "
                    f"for query_id {event.query_id!r}")
        return None

    def to_record(self) -> dict:
        return {"opened_at": self.opened_at, "counted": self.counted,
                "impression": self.impression.model_dump(mode="json") if self.impression else None,
                "feedback": [item.to_record() for item in self.feedback]}

    @classmethod
    def from_record(cls, query_id: str, record: Any, now: float, limits: JoinLimits) -> "Interaction":
        """The interaction a table record holds; what cannot be read is dropped with a log line
        (a record that is not even a mapping leaves a new interaction opened ``now``)."""
        if not isinstance(record, dict):
            if record is not None:
                log.warning("join state of %r unreadable (%s); starting it afresh", query_id, type(record).__name__)
            return cls(opened_at=now)
        facts = expiry_facts(query_id, record)
        interaction = cls(opened_at=facts.opened_at if facts else now, counted=bool(facts and facts.counted))
        if record.get("impression") is not None:
            try:
                interaction.impression = parse_impression(record["impression"], retention_s=math.inf)
            except ValidationError as exc:
                log.warning("join state of %r: stored impression dropped (%s)", query_id, first_error(exc))
        stored = record.get("feedback")
        for entry in stored if isinstance(stored, list) else []:
            item = _stored_feedback(entry)
            if item is None:
                log.warning("join state of %r: unreadable stored feedback dropped: %.200r", query_id, entry)
                continue
            verdict = interaction.add_feedback(item.event, item.partition, item.offset, limits)
            if not verdict.kept:
                log.warning("join state of %r: stored feedback %s dropped (%s)", query_id, item.event.event_id,
                            verdict.reason or verdict.outcome)
        return interaction


@dataclass(frozen=True)
class ExpiryFacts:
    opened_at: float
    has_impression: bool
    counted: bool


def expiry_facts(query_id: str, record: Any) -> ExpiryFacts | None:
    """What the expiry sweep needs of a record, read without validating all of it (the sweep
    visits every query_id each second); None when the record is unreadable."""
    opened_at = record.get("opened_at") if isinstance(record, dict) else None
    if isinstance(opened_at, bool) or not isinstance(opened_at, (int, float)) or not math.isfinite(opened_at):
        log.warning("join state of %r unreadable: no opening time", query_id)
        return None
    return ExpiryFacts(float(opened_at), record.get("impression") is not None, record.get("counted") is True)


def _stored_feedback(entry: Any) -> StoredFeedback | None:
    if not isinstance(entry, dict):
        return None
    partition, offset = entry.get("partition"), entry.get("offset")
    if not all(type(number) is int for number in (partition, offset)):
        return None
    try:
        return StoredFeedback(parse_feedback(entry.get("event"), retention_s=math.inf), partition, offset)
    except ValidationError:
        return None


def _record_bytes(item: StoredFeedback) -> int:
    return _json_bytes(item.to_record()) + 2  # with its ", " separator


def _json_bytes(value: Any) -> int:
    """Size as JSON with every non-ASCII character escaped: no serializer of the table writes more."""
    return len(json.dumps(value))

