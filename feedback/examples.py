"""From an impression and the feedback on it, to training examples for the query encoder.

A positive is a clicked, long-dwell or well-rated document. Its hard negatives are the
documents shown above it that the user passed over (not clicked, not otherwise positive):
the user saw them first and preferred the positive. Examples are built when the positive
arrives, from the feedback known by then.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from autoglm.interactions import Feedback, Impression
from feedback.propensity import PositionBiasModel


@dataclass(frozen=True)
class ExamplePolicy:
    dwell_seconds: float = 30.0  # a dwell at least this long counts as a positive
    min_rating: float = 4.0  # a rating at least this high counts as a positive
    max_negatives: int = 5


@dataclass(frozen=True)
class TrainingExample:
    example_id: str  # one per (query_id, positive document): replays and repeats deduplicate
    query_id: str
    query: str
    positive_id: str
    negative_ids: tuple[str, ...]
    weight: float
    rank: int
    session_id: str | None
    model_version: str


def is_positive(event: Feedback, policy: ExamplePolicy) -> bool:
    if event.type == "click":
        return True
    if event.type == "dwell":
        return (event.value or 0.0) >= policy.dwell_seconds
    if event.type == "rating":
        return (event.value or 0.0) >= policy.min_rating
    return False


def example_id(query_id: str, doc_id: str) -> str:
    return hashlib.sha256(f"{query_id}\x00{doc_id}".encode()).hexdigest()[:32]


def build_example(impression: Impression, positive: Feedback, known: list[Feedback],
                  bias: PositionBiasModel, policy: ExamplePolicy) -> TrainingExample | None:
    """The example a positive feedback event makes, or None when its document was not shown."""
    ranks = {hit.doc_id: hit.position for hit in impression.hits}
    rank = ranks.get(positive.doc_id)
    if rank is None:
        return None
    engaged = {event.doc_id for event in known if event.type == "click" or is_positive(event, policy)}
    negatives = tuple(hit.doc_id for hit in sorted(impression.hits, key=lambda h: h.position)
                      if hit.position < rank and hit.doc_id not in engaged)[-policy.max_negatives:]
    return TrainingExample(
        example_id=example_id(impression.query_id, positive.doc_id), query_id=impression.query_id,
        query=impression.query, positive_id=positive.doc_id, negative_ids=negatives,
        weight=bias.weight(rank), rank=rank, session_id=positive.session_id or impression.session_id,
        model_version=impression.model_version)
