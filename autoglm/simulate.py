"""Simulated users: real searches through the API, clicks from a position-based click model.

Each simulated session issues one query from the dataset's train split (never the dev
queries, which gate models, and never test), then examines rank r with probability
1 / r ** eta and clicks an examined result with probability ``click_relevant`` when the
qrels call it relevant, else ``click_noise``. Clicks are posted to /feedback.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from autoglm import beir
from autoglm.datasets import corpus_id


@dataclass(frozen=True)
class ClickModel:
    eta: float = 0.8
    click_relevant: float = 0.9
    click_noise: float = 0.1

    def clicks(self, ranked: list[str], relevant: set[str], rng: random.Random) -> list[int]:
        """1-based ranks clicked on one result list."""
        clicked = []
        for rank, doc in enumerate(ranked, start=1):
            if rng.random() < 1.0 / rank ** self.eta:
                if rng.random() < (self.click_relevant if doc in relevant else self.click_noise):
                    clicked.append(rank)
        return clicked


@dataclass
class SimulationReport:
    searches: int = 0
    clicks: int = 0
    relevant_clicks: int = 0
    queries: set[str] = field(default_factory=set)


def training_queries(root: Path, split: str = "train") -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries and qrels users may be simulated on: the split minus the dev queries."""
    if split != "train":
        raise ValueError("simulated feedback uses the train split only (dev gates models, test reports)")
    texts = beir.read_queries(root)
    fit, _ = beir.split_train(beir.read_qrels(root, "train"))
    return {qid: texts[qid] for qid in fit}, fit


def simulate(api: str, root: Path, searches: int, split: str = "train", model: ClickModel = ClickModel(),
             k: int = 10, seed: int = 0, progress: bool = True) -> SimulationReport:
    queries, qrels = training_queries(root, split)
    rng = random.Random(seed)
    order = sorted(queries)
    report = SimulationReport()
    with httpx.Client(base_url=api, timeout=60) as client:
        for _ in tqdm(range(searches), desc="simulated searches", disable=not progress):
            query_id = rng.choice(order)
            session = f"sim-{uuid.uuid4().hex[:12]}"
            answer = client.get("/search", params={"q": queries[query_id], "k": k, "session": session})
            answer.raise_for_status()
            body = answer.json()
            ranked = [hit["id"] for hit in body["hits"]]
            relevant = {doc for doc, grade in qrels[query_id].items() if grade > 0}
            ranks = model.clicks([corpus_id(doc) for doc in ranked], relevant, rng)
            events = [{"event_id": str(uuid.uuid4()), "query_id": body["query_id"], "doc_id": ranked[rank - 1],
                       "type": "click", "position": rank, "session_id": session} for rank in ranks]
            if events:
                client.post("/feedback", json=events).raise_for_status()
            report.searches += 1
            report.clicks += len(ranks)
            report.relevant_clicks += sum(corpus_id(ranked[r - 1]) in relevant for r in ranks)
            report.queries.add(query_id)
    return report
