"""Schemas of what users do with search: impressions (what was shown) and feedback (what they did).

Both carry ``query_id``, in the spirit of OpenSearch's User Behavior Insights schema, so
feedback joins the impression it refers to. Both are validated at the edge (the API and the
stream processor) with pydantic; anything invalid is refused with a reason.

Anyone who can reach the API or produce to the topics writes these records, and the join keeps
them in its state, so the edges are strict: finite numbers only, integers and booleans never
coerced (``true`` is not rank 1, ``"3"`` and ``3.0`` are not rank 3), identifiers, ranks,
ratings and dwell times within bounds, and timestamps no more than ``MAX_CLOCK_SKEW_S`` ahead
of now nor older than the feedback retention (``parse``'s ``retention_s``). A value
that passed once passes again later with ``retention_s=math.inf``, which is how stored state
is read back. A timestamp without a time zone is taken as UTC; every timestamp is kept in UTC.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from functools import partial
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

FEEDBACK_RETENTION_S = 7 * 86400  # feedback older than this is refused
MAX_CLOCK_SKEW_S = 300  # ... and so is feedback from further in the future than this
MAX_ID_CHARS = 256
MAX_QUERY_CHARS = 10_000
MAX_POSITION = 1000
MAX_HITS = 100  # the search API's largest k: the join keeps any impression within its byte bound
MAX_DWELL_S = 86400

Identifier = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_CHARS)]
SessionId = Annotated[str, Field(strict=True, max_length=MAX_ID_CHARS)]
Position = Annotated[int, Field(strict=True, ge=1, le=MAX_POSITION)]  # 1-based rank as shown
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _recent_utc(ts: datetime, info: ValidationInfo) -> datetime:
    """``ts`` in UTC when it lies in [now - retention, now + skew]; ``info.context`` may name
    ``now`` and ``retention_s`` (see ``parse``)."""
    context = info.context or {}
    now = context.get("now") or utc_now()
    retention_s = context.get("retention_s", FEEDBACK_RETENTION_S)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    age_s = (now - ts).total_seconds()  # no intermediate datetime: cannot overflow
    if age_s < -MAX_CLOCK_SKEW_S:
        raise ValueError(f"ts is more than {MAX_CLOCK_SKEW_S} s in the future")
    if age_s > retention_s:
        raise ValueError(f"ts is older than the feedback retention ({retention_s:.0f} s)")
    return ts.astimezone(timezone.utc)


class ShownHit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_id: Identifier
    position: Position
    score: FiniteNumber


class Impression(BaseModel):
    """One /search answer as the user saw it; published to ``autoglm.impressions``."""

    model_config = ConfigDict(extra="forbid")

    query_id: Identifier
    query: Annotated[str, Field(strict=True, max_length=MAX_QUERY_CHARS)]
    mode: Literal["bm25", "dense", "hybrid"]
    hits: Annotated[list[ShownHit], Field(max_length=MAX_HITS)]
    model_version: Identifier
    arm: Literal["champion", "challenger"] = "champion"
    session_id: SessionId | None = None
    ts: datetime = Field(default_factory=utc_now)

    _ts_is_recent = field_validator("ts")(_recent_utc)


FeedbackType = Literal["click", "dwell", "rating", "skip"]


class Feedback(BaseModel):
    """One user action on one shown document; posted to /feedback or ``autoglm.feedback``.

    ``value`` is the dwell time in seconds (0..86400) for ``dwell`` and the rating 1..5 for
    ``rating``; clicks and skips carry none.
    """

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID  # a duplicate event_id is ignored downstream
    query_id: Identifier
    doc_id: Identifier
    type: FeedbackType
    position: Position
    value: FiniteNumber | None = None
    session_id: SessionId | None = None
    ts: datetime = Field(default_factory=utc_now)

    _ts_is_recent = field_validator("ts")(_recent_utc)

    @model_validator(mode="after")
    def _value_matches_type(self) -> "Feedback":
        if self.type == "rating" and (self.value is None or not 1 <= self.value <= 5):
            raise ValueError("a rating needs value between 1 and 5")
        if self.type == "dwell" and (self.value is None or not 0 <= self.value <= MAX_DWELL_S):
            raise ValueError(f"a dwell needs value between 0 and {MAX_DWELL_S} (seconds)")
        return self


Record = TypeVar("Record", Feedback, Impression)


def parse(model: type[Record], data: Any, *, raw_json: bool = False, retention_s: float = FEEDBACK_RETENTION_S,
          now: datetime | None = None) -> Record:
    """One record of ``model`` from decoded JSON (a dict), or from raw JSON as read from a topic
    with ``raw_json``; raises pydantic.ValidationError with the reason."""
    context = {"retention_s": retention_s, "now": now}
    if raw_json:
        return model.model_validate_json(data, context=context)
    return model.model_validate(data, context=context)


parse_feedback = partial(parse, Feedback)
parse_feedback_json = partial(parse, Feedback, raw_json=True)
parse_impression = partial(parse, Impression)
parse_impression_json = partial(parse, Impression, raw_json=True)


def first_error(exc: ValidationError) -> str:
    """The first reason a record was refused, as "field: message" (a dead letter's reason)."""
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'event'}: {error['msg']}"


class TrainingRequest(BaseModel):
    """A closed window of training examples, published to ``autoglm.training`` for the trainer."""

    model_config = ConfigDict(extra="forbid")

    window_id: int
    first_seq: int  # example sequence numbers the window was cut from
    last_seq: int
    examples: int
    sessions: int
    dropped_by_session_cap: int
    reason: Literal["size", "time"]
    ts: datetime = Field(default_factory=utc_now)
