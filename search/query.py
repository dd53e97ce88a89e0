"""Query side: rankers over an index, composed; hybrid is reciprocal rank fusion over the others.

Like Pathway's index factories, a fused ranker is just another ranker, so a new retriever
(a second vector field, a learned sparse model) is added by composing, not by special cases.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from autoglm import metrics
from autoglm.settings import FusionWeights
from search.fusion import reciprocal_rank_fusion
from search.protocol import Document, Hit, Index
from search.serving import QueryEncoder, ServedModels

MODES = ("bm25", "dense", "hybrid")


class Ranker(Protocol):
    def rank(self, query: str, k: int) -> list[Hit]:
        ...


@dataclass
class BM25Ranker:
    index: Index

    def rank(self, query: str, k: int) -> list[Hit]:
        return self.index.search_text(query, k)


@dataclass
class DenseRanker:
    index: Index
    embed_query: Callable[[str], np.ndarray]

    def rank(self, query: str, k: int) -> list[Hit]:
        return self.index.search_vector(self.embed_query(query), k)


@dataclass
class FusedRanker:
    rankers: list[Ranker]
    weights: list[float]
    rrf_k: int = 60
    candidates: int = 100  # depth taken from each ranker before fusing

    def rank(self, query: str, k: int) -> list[Hit]:
        depth = max(k, self.candidates)
        return reciprocal_rank_fusion([r.rank(query, depth) for r in self.rankers], self.weights,
                                      k=self.rrf_k, limit=k)


@runtime_checkable
class HybridIndex(Protocol):
    """A backend that fuses BM25 and vector results itself (Elasticsearch's RRF retriever)."""

    def search_hybrid(self, query: str, vector: np.ndarray, k: int, weights: FusionWeights, rrf_k: int,
                      window: int) -> list[Hit]:
        ...


@dataclass
class BackendHybridRanker:
    """Hybrid search as one backend request instead of two rankers fused here."""

    index: HybridIndex
    embed_query: Callable[[str], np.ndarray]
    weights: FusionWeights
    rrf_k: int = 60
    candidates: int = 100

    def rank(self, query: str, k: int) -> list[Hit]:
        return self.index.search_hybrid(query, self.embed_query(query), k, self.weights, self.rrf_k,
                                        max(k, self.candidates))


@dataclass(frozen=True)
class SearchResult:
    query_id: str
    mode: str
    model_version: str
    arm: str  # champion or challenger (search/serving.py)
    hits: list[tuple[Hit, Document]]


class SearchService:
    """Runs a query in one mode and joins hits with their stored documents."""

    def __init__(self, index: Index, models: ServedModels, weights: FusionWeights = FusionWeights(),
                 rrf_k: int = 60, candidates: int = 100):
        self.index, self.models = index, models
        self.weights, self.rrf_k, self.candidates = weights, rrf_k, candidates

    def rankers(self, encoder: QueryEncoder) -> dict[str, Ranker]:
        bm25, dense = BM25Ranker(self.index), DenseRanker(self.index, encoder.embed_one)
        hybrid: Ranker = FusedRanker([bm25, dense], [self.weights.bm25, self.weights.dense], self.rrf_k,
                                     self.candidates)
        if isinstance(self.index, HybridIndex):
            hybrid = BackendHybridRanker(self.index, encoder.embed_one, self.weights, self.rrf_k, self.candidates)
        return {"bm25": bm25, "dense": dense, "hybrid": hybrid}

    def search(self, query: str, k: int = 10, mode: str = "hybrid", session_id: str | None = None) -> SearchResult:
        """One answer, from the arm the session (or, without one, this query) is routed to."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        started = time.perf_counter()
        query_id = str(uuid.uuid4())
        arm = self.models.choose(session_id or query_id)
        encoder = arm.encoder
        hits = self.rankers(encoder)[mode].rank(query, k)
        documents = self.index.get_many([hit.id for hit in hits])
        metrics.SEARCH_SECONDS.labels(mode).observe(time.perf_counter() - started)
        return SearchResult(query_id=query_id, mode=mode, model_version=encoder.version, arm=arm.name,
                            hits=[(hit, documents[hit.id]) for hit in hits if hit.id in documents])


def snippet(text: str, query: str, width: int = 240) -> str:
    """A window of the text around the first query word it contains (or its start)."""
    lowered = text.lower()
    positions = [lowered.find(word) for word in query.lower().split() if len(word) > 2]
    start = min((p for p in positions if p >= 0), default=0)
    start = max(0, start - width // 4)
    window = text[start:start + width].strip()
    return ("…" if start > 0 else "") + window + ("…" if start + width < len(text) else "")
