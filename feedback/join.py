"""The feedback join's state for one query_id, and what an impression or a feedback event does to it.

Plain code over a plain record (the value of the Faust table ``interactions``, see
streams/feedback.py), so its bounds can be checked without a broker. The record travels as one
Kafka message on the table's changelog, and anyone can produce feedback for any query_id, so it
stays bounded whatever arrives:

- one stored event per (doc_id, type): a repeat, by event_id or by the same action on the same
  document, is a duplicate, counted and not stored;
- at most ``feedback_per_query`` stored events; the caller dead-letters the rest;
- the impression, and the stored events together, each take at most half of
  ``max_record_bytes`` as JSON, so the record stays below the 1 MB a broker takes by default;
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

log = logging.getLogger(__name__)

Outcome = Literal["joined", "waiting", "duplicate", "refused"]


@dataclass(frozen=True)
class JoinLimits:
    feedback_per_query: int = 100
    max_record_bytes: int = 512 * 1024


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str | None = None  # why it was refused: the dead letter's reason
    joined: tuple[Feedback, ...] = ()  # the feedback this record joined to an impression


@dataclass(frozen=True)
class StoredFeedback:
    event: Feedback
    partition: int  # where it came from, for its dead letter if its impression never comes
    offset: int

    def to_record(self) -> dict:
        return {"event": self.event.model_dump(mode="json"), "partition": self.partition, "offset": self.offset}


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
        if self.impression is not None:
            return Verdict("duplicate")
        size = _json_bytes(impression.model_dump(mode="json"))
        if size > limits.max_record_bytes // 2:
            return Verdict("refused", f"impression too large: {size} bytes of JSON, the join keeps at most "
                                      f"{limits.max_record_bytes // 2}")
        self.impression = impression
        return Verdict("joined", joined=tuple(self.events))

    def add_feedback(self, event: Feedback, partition: int, offset: int, limits: JoinLimits) -> Verdict:
        item = StoredFeedback(event, partition, offset)
        refusal = self._refusal(item, limits)
        if refusal:
            return refusal
        self.feedback.append(item)
        self._feedback_bytes += _json_bytes(item.to_record()) + 2  # with its ", " separator
        return Verdict("waiting" if self.impression is None else "joined")

    def _refusal(self, item: StoredFeedback, limits: JoinLimits) -> Verdict | None:
        event = item.event
        if any(known.event_id == event.event_id or (known.doc_id, known.type) == (event.doc_id, event.type)
               for known in self.events):
            return Verdict("duplicate")
        if len(self.feedback) >= limits.feedback_per_query:
            return Verdict("refused", f"too many feedback events for one query_id: the limit is "
                                      f"{limits.feedback_per_query}")
        size = self._feedback_bytes + _json_bytes(item.to_record()) + 2
        if size > limits.max_record_bytes // 2:
            return Verdict("refused", f"join state full: feedback for this query_id would take {size} bytes "
                                      f"of JSON, the join keeps at most {limits.max_record_bytes // 2}")
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
            elif interaction.add_feedback(item.event, item.partition, item.offset, limits).outcome == "refused":
                log.warning("join state of %r: stored feedback %s beyond the limits dropped", query_id,
                            item.event.event_id)
        return interaction


@dataclass(frozen=True)
class ExpiryFacts:
    opened_at: float
    joined: bool  # has its impression
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


def _json_bytes(value: Any) -> int:
    """Size as JSON with every non-ASCII character escaped: no serializer of the table writes more."""
    return len(json.dumps(value))

