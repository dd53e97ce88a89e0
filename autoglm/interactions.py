"""Schemas of what users do with search: impressions (what was shown) and feedback (what they did).

Both carry ``query_id``, in the spirit of OpenSearch's User Behavior Insights schema, so
feedback joins the impression it refers to. Both are validated at the edge (the API and the
stream processor) with pydantic; anything invalid is refused with a reason.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ShownHit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    doc_id: str
    position: int = Field(ge=1)  # 1-based rank as shown
    score: float


class Impression(BaseModel):
    """One /search answer as the user saw it; published to ``autoglm.impressions``."""

    model_config = ConfigDict(extra="forbid")

    query_id: str
    query: str
    mode: str
    hits: list[ShownHit]
    model_version: str
    arm: str = "champion"
    session_id: str | None = None
    ts: datetime = Field(default_factory=utc_now)


FeedbackType = Literal["click", "dwell", "rating", "skip"]


class Feedback(BaseModel):
    """One user action on one shown document; posted to /feedback or ``autoglm.feedback``.

    ``value`` is the dwell time in seconds for ``dwell`` and the rating 1..5 for ``rating``;
    clicks and skips carry none.
    """

    model_config = ConfigDict(extra="forbid")

    event_id: uuid.UUID  # a duplicate event_id is ignored downstream
    query_id: str = Field(min_length=1)
    doc_id: str = Field(min_length=1)
    type: FeedbackType
    position: int = Field(ge=1)
    value: float | None = None
    session_id: str | None = None
    ts: datetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _value_matches_type(self) -> "Feedback":
        if self.type == "rating" and (self.value is None or not 1 <= self.value <= 5):
            raise ValueError("a rating needs value between 1 and 5")
        if self.type == "dwell" and (self.value is None or self.value < 0):
            raise ValueError("a dwell needs value >= 0 (seconds)")
        return self


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
