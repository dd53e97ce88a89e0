"""Simulated users: the click model, the query split they may use, and clicks through a real API."""

import random
import pytest

from autoglm import beir
from autoglm.datasets import document_id, publish_corpus
from autoglm.simulate import ClickModel, simulate, training_queries
from tests.conftest import WorkerProcess, wait_until
from tests.scifact_problem import SCIFACT



def test_position_based_click_model_follows_examination_and_relevance():
    model, rng = ClickModel(eta=1.0, click_relevant=1.0, click_noise=0.0), random.Random(3)
    ranked = [f"d{i}" for i in range(1, 11)]
    counts = {rank: 0 for rank in range(1, 11)}
    for _ in range(20000):
        for rank in model.clicks(ranked, set(ranked), rng):
            counts[rank] += 1
    assert counts[1] == 20000 and counts[2] / 20000 == pytest.approx(0.5, abs=0.02)
    assert counts[10] / 20000 == pytest.approx(0.1, abs=0.01)
    assert model.clicks(ranked, set(), rng) == []  # no noise, nothing relevant: no clicks


@pytest.mark.skipif(not SCIFACT.exists(), reason="needs ../shared/data/scifact beside the repo")
def test_simulation_uses_train_queries_outside_the_dev_split():
    queries, qrels = training_queries(SCIFACT)
    assert queries and not any(beir.is_dev_query(q) for q in queries)
    test_ids = set(beir.read_qrels(SCIFACT, "test"))
    assert not test_ids & set(queries) and set(qrels) == set(queries)
    with pytest.raises(ValueError):
        training_queries(SCIFACT, "test")


@pytest.mark.skipif(not SCIFACT.exists(), reason="needs ../shared/data/scifact beside the repo")
def test_simulated_sessions_search_and_click_through_the_api(broker, tmp_path):
    _, count = publish_corpus(broker, SCIFACT, limit=200, progress=False)
    worker = WorkerProcess(broker, tmp_path / "data", tmp_path / "worker.log",
                           ["--cdc-topics", r"^cdc\.beir\."]).wait_healthy()
    try:
        first_ids = [doc.id for doc, _ in zip(beir.read_corpus(SCIFACT), range(count))]
        wait_until(lambda: worker.document(document_id(SCIFACT, first_ids[-1])), 300, 0.5, "the corpus subset")
        report = simulate(worker.url, SCIFACT, searches=30, seed=1, progress=False)
        assert report.searches == 30 and report.clicks > 0
        wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="joined")
                   >= report.clicks, 30, 0.2, "the clicks to join their impressions")
        assert worker.metric("autoglm_training_examples_total") > 0
    finally:
        worker.stop()
