"""Reciprocal rank fusion: combine ranked lists by rank alone, so BM25 and cosine scores need no calibration."""

from __future__ import annotations

from typing import Sequence

from search.protocol import Hit


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], weights: Sequence[float],
                           k: int = 60, limit: int = 10) -> list[Hit]:
    """score(d) = sum_i weight_i / (k + rank_i(d)), ranks from 1 (Cormack et al., 2009)."""
    if len(rankings) != len(weights):
        raise ValueError("one weight per ranking")
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, hit in enumerate(ranking, start=1):
            scores[hit.id] = scores.get(hit.id, 0.0) + weight / (k + rank)
    fused = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return [Hit(doc_id, score) for doc_id, score in fused[:limit]]
