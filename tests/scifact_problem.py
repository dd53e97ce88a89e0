"""A small real retrieval problem from SciFact, shared by the fine-tuning and trainer tests.

320 SciFact abstracts (the relevant documents of the chosen queries plus random distractors)
embedded by the base model into a real EmbeddedIndex. Training examples come from train
queries of the fit split, one per (query, relevant document), with the base model's
non-relevant top results as hard negatives; the gate queries come from the dev split.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from autoglm import beir
from autoglm.encoder import Encoder
from feedback.examples import TrainingExample, example_id
from search.embedded import EmbeddedIndex
from search.protocol import Document, Upsert

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"
TRAINED_QUERIES, REPLAY_QUERIES, GATE_QUERIES, CORPUS_SIZE = 130, 40, 60, 320


def make_example(query_id: str, query: str, positive: str, negatives=(), weight=1.0, rank=1) -> TrainingExample:
    return TrainingExample(example_id=example_id(query_id, positive), query_id=query_id, query=query,
                           positive_id=positive, negative_ids=tuple(negatives), weight=weight, rank=rank,
                           session_id=None, model_version="base")


@dataclasses.dataclass
class Problem:
    encoder: Encoder
    index: EmbeddedIndex
    queries: dict[str, str]
    trained: dict[str, dict[str, int]]  # qrels of the queries the window's examples come from
    gate: dict[str, dict[str, int]]
    window: list[TrainingExample]
    replay: list[TrainingExample]


def examples_for(qrels: dict, queries: dict, index: EmbeddedIndex, encoder: Encoder) -> list[TrainingExample]:
    """One example per (query, relevant document); hard negatives are the base model's
    non-relevant top-10; the weight is the inverse propensity of the positive's base rank."""
    query_ids = list(qrels)
    examples = []
    for qid, vector in zip(query_ids, encoder.embed([queries[q] for q in query_ids])):
        ranked = [hit.id for hit in index.search_vector(vector, 10)]
        negatives = [doc for doc in ranked if doc not in qrels[qid]][:5]
        for doc in qrels[qid]:
            rank = ranked.index(doc) + 1 if doc in ranked else 11
            examples.append(make_example(qid, queries[qid], doc, negatives, min(10.0, rank ** 0.8), rank))
    return examples


@pytest.fixture(scope="module")
def problem(tmp_path_factory) -> Problem:
    queries = beir.read_queries(SCIFACT)
    fit, dev = beir.split_train(beir.read_qrels(SCIFACT, "train"))
    rng = random.Random(11)
    fit_ids = rng.sample(sorted(fit), TRAINED_QUERIES + REPLAY_QUERIES)
    trained = {q: fit[q] for q in fit_ids[:TRAINED_QUERIES]}
    older = {q: fit[q] for q in fit_ids[TRAINED_QUERIES:]}
    gate = {q: dev[q] for q in rng.sample(sorted(dev), GATE_QUERIES)}

    corpus = {doc.id: doc for doc in beir.read_corpus(SCIFACT)}
    relevant = {doc for qrels in (trained, older, gate) for rel in qrels.values() for doc in rel}
    distractors = rng.sample(sorted(set(corpus) - relevant), CORPUS_SIZE - len(relevant))
    documents = [corpus[doc_id] for doc_id in sorted(relevant) + distractors]

    encoder = Encoder()
    vectors = encoder.embed([f"{d.title} {d.text}".strip() for d in documents])
    index = EmbeddedIndex(tmp_path_factory.mktemp("index"))
    index.write_batch([Upsert(Document(id=d.id, table="scifact.corpus", title=d.title, text=d.text), vector)
                       for d, vector in zip(documents, vectors)], [])
    index.commit({})
    yield Problem(encoder, index, queries, trained, gate, examples_for(trained, queries, index, encoder),
                  examples_for(older, queries, index, encoder))
    index.close()


