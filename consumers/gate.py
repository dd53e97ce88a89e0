"""The promotion gate: a fine-tuned query encoder replaces the champion only if no metric got worse.

Both models are measured the same way, on the live index (whose document vectors are frozen,
so only the query encoder differs): dense and hybrid retrieval on a labelled gate set, dense
retrieval on examples held out of the training window, and on the gate queries about other
topics than the window, where a model that over-fits the latest clicks forgets what it knew.
Hybrid is gated because it is what users search with by default: a query encoder can gain on
its own and still lose inside the fusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from autoglm.beir import ndcg_at_k
from autoglm.settings import FusionWeights
from feedback.examples import TrainingExample
from search.protocol import Index
from search.query import BM25Ranker, DenseRanker, FusedRanker, Ranker

EmbedQueries = Callable[[list[str]], np.ndarray]  # e.g. Encoder.embed


@dataclass(frozen=True)
class GateConfig:
    epsilon: float = 0.005  # a candidate may trail the champion by this much (noise), no more...
    noise_z: float = 2.0  # ... or by this many standard errors of the paired differences (0: epsilon only)
    fusion_weights: FusionWeights = FusionWeights()  # the hybrid mode as serving runs it
    rrf_k: int = 60


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]  # one line per metric compared, for the run's log and tags


def evaluate(embed_queries: EmbedQueries, index: Index, queries: Mapping[str, str],
             qrels: Mapping[str, Mapping[str, int]], k: int = 10, hybrid: GateConfig | None = None) -> dict[str, float]:
    """nDCG@k and MRR@k over the qrels' queries (those with a text): dense retrieval, or the
    hybrid fusion that ``hybrid`` configures."""
    scores = per_query(embed_queries, index, queries, qrels, k, hybrid)
    return {name: _mean(list(values.values())) for name, values in scores.items()} | \
        {"queries": len(scores[f"ndcg@{k}"])}


def per_query(embed_queries: EmbedQueries, index: Index, queries: Mapping[str, str],
              qrels: Mapping[str, Mapping[str, int]], k: int = 10,
              hybrid: GateConfig | None = None) -> dict[str, dict[str, float]]:
    """nDCG@k and MRR@k of each query with a text, for paired comparisons of two models."""
    query_ids = [qid for qid in qrels if qid in queries]
    rankings = _rankings(embed_queries, index, [queries[qid] for qid in query_ids], k, hybrid)
    return {f"ndcg@{k}": {qid: ndcg_at_k(ranked, qrels[qid], k) for qid, ranked in zip(query_ids, rankings)},
            f"mrr@{k}": {qid: _reciprocal_rank(ranked, {d for d, rel in qrels[qid].items() if rel > 0})
                         for qid, ranked in zip(query_ids, rankings)}}


def noise_tolerance(candidate: Mapping[str, float], champion: Mapping[str, float], epsilon: float,
                    z: float = 2.0) -> float:
    """How far a candidate's mean may trail on a paired query set before it counts as worse:
    epsilon, or z standard errors of the per-query differences, whichever is larger.

    A gate set of ~150 queries (and, more so, the few dozen of the forgetting subset) is noisy:
    one query moving two ranks shifts a mean by more than epsilon, and a fixed epsilon rejected
    good candidates for noise. A regression that matters is larger than the noise; the base
    model's floor (``decide``'s caller) keeps noise from adding up over many versions.
    """
    shared = [qid for qid in candidate if qid in champion]
    if len(shared) < 2 or z <= 0:
        return epsilon
    differences = np.array([candidate[qid] - champion[qid] for qid in shared])
    return max(epsilon, z * float(differences.std(ddof=1)) / math.sqrt(len(shared)))


def holdout_mrr(embed_queries: EmbedQueries, index: Index, examples: list[TrainingExample],
                k: int = 10, window: list[TrainingExample] = ()) -> float:
    return _mean(list(holdout_reciprocal_ranks(embed_queries, index, examples, k, window).values()))


def holdout_reciprocal_ranks(embed_queries: EmbedQueries, index: Index, examples: list[TrainingExample],
                             k: int = 10, window: list[TrainingExample] = ()) -> dict[str, float]:
    """Reciprocal rank of the documents users chose, per held-out query text: the gate for what users want.

    A query text's chosen documents are its positives among the held-out examples and the
    ``window`` they came from: ranking another chosen document first is not a miss.
    """
    chosen: dict[str, set[str]] = {}
    for example in (*examples, *window):
        chosen.setdefault(example.query.lower(), set()).add(example.positive_id)
    texts = sorted({e.query.lower(): e.query for e in examples}.items())
    rankings = _rankings(embed_queries, index, [query for _, query in texts], k)
    return {key: _reciprocal_rank(ranked, chosen[key]) for (key, _), ranked in zip(texts, rankings)}


def forgetting_subset(qrels: Mapping[str, Mapping[str, int]],
                      examples: list[TrainingExample]) -> dict[str, dict[str, int]]:
    """The gate queries none of whose relevant documents the window mentions (as positive or
    negative): topics the window did not train, where any loss is forgetting."""
    mentioned = {doc_id for e in examples for doc_id in (e.positive_id, *e.negative_ids)}
    return {qid: dict(judged) for qid, judged in qrels.items()
            if not mentioned & {doc_id for doc_id, relevance in judged.items() if relevance > 0}}


def decide(candidate: Mapping[str, float], champion: Mapping[str, float],
           epsilon: float = GateConfig.epsilon, tolerances: Mapping[str, float] | None = None) -> GateDecision:
    """Pass if, on every metric both sides report, candidate >= champion - tolerance, where the
    tolerance is epsilon unless ``tolerances`` names another for that metric.

    Names ending in "queries" are counts, not quality, and are not compared; a gate that
    compares nothing fails, since it has shown nothing.
    """
    names = [name for name in candidate if name in champion and not name.endswith("queries")]
    if not names:
        return GateDecision(False, ["no metric in common with the champion"])
    reasons, passed = [], True
    for name in sorted(names):
        tolerance = (tolerances or {}).get(name, epsilon)
        ours, floor = candidate[name], champion[name] - tolerance
        ok = not math.isnan(ours) and ours >= floor
        passed &= ok
        reasons.append(f"{name}: {ours:.4f} {'>=' if ok else '<'} {floor:.4f} "
                       f"(champion {champion[name]:.4f} - {tolerance:.4f})")
    return GateDecision(passed, reasons)


def _rankings(embed_queries: EmbedQueries, index: Index, texts: list[str], k: int,
              hybrid: GateConfig | None = None) -> list[list[str]]:
    """Ranked ids per text, from the same rankers serving composes; queries embedded in one batch."""
    vectors = dict(zip(texts, embed_queries(texts))) if texts else {}
    ranker: Ranker = DenseRanker(index, vectors.__getitem__)
    if hybrid:
        ranker = FusedRanker([BM25Ranker(index), ranker], [hybrid.fusion_weights.bm25, hybrid.fusion_weights.dense],
                             hybrid.rrf_k)
    return [[hit.id for hit in ranker.rank(text, k)] for text in texts]


def _reciprocal_rank(ranked: list[str], relevant: set[str]) -> float:
    return next((1.0 / rank for rank, doc_id in enumerate(ranked, start=1) if doc_id in relevant), 0.0)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
