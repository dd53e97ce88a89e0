"""BEIR-format datasets (corpus.jsonl[.gz], queries.jsonl, qrels/<split>.tsv), the dev split, and nDCG.

The product reads a dataset from a path; it never copies one. Tuning uses a dev split
carved from train by a seeded hash of the query id; the test split is for reported
numbers only.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

DEV_SALT = "autoglm-dev-v1:"
DEV_SHARE = 5  # one query in five


@dataclass(frozen=True)
class CorpusDocument:
    id: str
    title: str
    text: str


def read_corpus(root: Path) -> Iterator[CorpusDocument]:
    path = root / "corpus.jsonl.gz"
    opener = gzip.open if path.exists() else open
    with opener(path if path.exists() else root / "corpus.jsonl", "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            yield CorpusDocument(str(row["_id"]), row.get("title") or "", row.get("text") or "")


def read_queries(root: Path) -> dict[str, str]:
    """Query id -> text. Query metadata is ignored: in SciFact it holds gold labels."""
    with open(root / "queries.jsonl", encoding="utf-8") as handle:
        return {str(row["_id"]): row["text"] for row in map(json.loads, handle)}


def read_qrels(root: Path, split: str) -> dict[str, dict[str, int]]:
    """Query id -> {document id: relevance} for one split (train or test)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(root / "qrels" / f"{split}.tsv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return qrels


def is_dev_query(query_id: str) -> bool:
    digest = hashlib.sha256((DEV_SALT + query_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % DEV_SHARE == 0


def split_train(qrels: Mapping[str, Mapping[str, int]]) -> tuple[dict, dict]:
    """(fit, dev) partitions of the train qrels; dev is for tuning, fit for learning."""
    fit = {q: r for q, r in qrels.items() if not is_dev_query(q)}
    dev = {q: r for q, r in qrels.items() if is_dev_query(q)}
    return fit, dev


def ndcg_at_k(ranked_ids: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    dcg = sum((2 ** relevant.get(doc_id, 0) - 1) / math.log2(rank + 1)
              for rank, doc_id in enumerate(ranked_ids[:k], start=1))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum((2 ** rel - 1) / math.log2(rank + 1) for rank, rel in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def mean_ndcg(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], k: int = 10) -> float:
    """Mean nDCG@k over the queries of qrels; a query missing from run scores 0."""
    scores = [ndcg_at_k(run.get(query_id, []), relevant, k) for query_id, relevant in qrels.items()]
    return sum(scores) / len(scores) if scores else 0.0
