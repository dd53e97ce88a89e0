"""The trainer end to end on a small real problem: real model, real index, real MLflow sqlite store."""

from __future__ import annotations

import json

import pytest

from consumers.finetune import TrainConfig
from consumers.gate import GateConfig
from consumers.trainer import GateSet, Trainer, TrainerConfig
from feedback.sqlite_store import SqliteExampleStore
from registry.models import CHALLENGER, CHAMPION, ModelRegistry
from tests.scifact_problem import SCIFACT, problem  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not SCIFACT.exists(), reason="needs ../shared/data/scifact beside the repo")

TRAIN = TrainConfig(lr=2e-5, epochs=2, seed=3)


@pytest.fixture
def setup(problem, tmp_path):
    store = SqliteExampleStore(tmp_path / "examples.db")
    store.add(problem.window)
    store.close_window("size", max_session_share=1.0)
    registry = ModelRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    # The gate set holds the window's topics, so learning them must show on it.
    gate = GateSet(problem.queries, problem.trained, "trained-topics")
    yield store, registry, gate, tmp_path / "replay.json"
    store.close()


def trainer(problem, setup, epsilon: float, noise_z: float = 2.0) -> Trainer:
    store, registry, gate, reservoir = setup
    return Trainer(problem.index, store, registry, reservoir, gate,
                   TrainerConfig(train=TRAIN, gate=GateConfig(epsilon=epsilon, noise_z=noise_z)))


def test_a_better_candidate_is_registered_as_challenger_with_lineage(problem, setup):
    _, registry, _, _ = setup
    outcome = trainer(problem, setup, epsilon=0.005).train([1])
    assert outcome.passed and outcome.version == "1"
    assert outcome.metrics["candidate.gate.ndcg@10"] > outcome.metrics["champion.gate.ndcg@10"] + 0.03
    assert {"candidate.holdout.mrr@10", "champion.holdout.mrr@10"} <= set(outcome.metrics)  # logged
    assert registry.version_for(CHALLENGER) == "1" and registry.version_for(CHAMPION) is None
    [version] = registry.versions()
    assert version["tags"]["gate"] == "passed" and version["tags"]["windows"] == "1"
    run = registry.client.get_run(outcome.run_id)
    assert run.data.params["lr"] == "2e-05" and run.data.tags["lineage.parent_version"] == "base"
    assert [m.value for m in registry.client.get_metric_history(outcome.run_id, "train_loss")]
    served = registry.load_encoder(CHALLENGER).embed(["a query about cells"])
    assert served.shape == (1, 384)


def test_a_rejected_candidate_registers_nothing(problem, setup):
    _, registry, _, _ = setup
    impossible = trainer(problem, setup, epsilon=-1.0, noise_z=0.0)  # must beat the champion by a full point
    outcome = impossible.train([1])
    assert not outcome.passed and outcome.version is None and outcome.reasons
    assert registry.versions() == [] and registry.version_for(CHALLENGER) is None
    run = registry.client.get_run(outcome.run_id)
    assert run.data.tags["autoglm.decision"] == "rejected"


def test_the_replay_buffer_survives_across_windows_and_restarts(problem, setup):
    store, registry, _, reservoir = setup
    first = trainer(problem, setup, epsilon=1.0).train([1])
    seen_after_first = json.loads(reservoir.read_text())["seen"]
    held_out = int(registry.client.get_run(first.run_id).data.params["lineage.examples_held_out"])
    assert seen_after_first == len(problem.window) - held_out
    store.add(problem.replay)
    store.close_window("size", max_session_share=1.0)
    restarted = trainer(problem, setup, epsilon=1.0)  # a new process: the reservoir comes from disk
    assert restarted.replay.seen == seen_after_first
    second = restarted.train([2])
    assert restarted.replay.seen > seen_after_first
    assert registry.client.get_run(second.run_id).data.tags["lineage.replay_seen"] == str(restarted.replay.seen)
    artifacts = [a.path for a in registry.client.list_artifacts(second.run_id, "extras")]
    assert "extras/replay.json" in artifacts  # the reservoir is versioned with the run


def test_a_learner_taking_over_continues_the_reservoir_its_predecessor_logged(problem, setup, tmp_path):
    """Two learners share store and registry but not disks: the one that takes over starts with
    no reservoir file, and continues from the one logged with the newest run."""
    store, registry, gate, reservoir = setup
    trainer(problem, setup, epsilon=1.0).train([1])
    seen_by_first = json.loads(reservoir.read_text())["seen"]
    store.add(problem.replay)
    store.close_window("size", max_session_share=1.0)
    standby = Trainer(problem.index, store, registry, tmp_path / "standby" / "replay.json", gate,
                      TrainerConfig(train=TRAIN, gate=GateConfig(epsilon=1.0)))
    assert standby.replay.seen == 0
    second = standby.train([2])
    # Without the predecessor's reservoir it could have seen at most window 2's examples.
    assert standby.replay.seen > max(seen_by_first, len(problem.replay))
    held_out = int(registry.client.get_run(second.run_id).data.params["lineage.examples_held_out"])
    new_fitted = int(registry.client.get_run(second.run_id).data.params["lineage.examples"]) - held_out
    assert standby.replay.seen <= seen_by_first + new_fitted


def test_a_rejected_window_is_trained_again_with_the_next_one(problem, setup):
    store, registry, _, _ = setup
    rejected = trainer(problem, setup, epsilon=-1.0, noise_z=0.0).train([1])
    assert not rejected.passed
    half = len(problem.replay) // 2
    for window in (problem.replay[:half], problem.replay[half:]):
        store.add(window)
        store.close_window("size", max_session_share=1.0)
    second = trainer(problem, setup, epsilon=1.0).train([2])
    lineage = registry.client.get_run(second.run_id).data.tags
    assert lineage["lineage.windows"] == "1,2" and lineage["lineage.carried_windows"] == "1"
    assert int(lineage["lineage.examples"]) == len(problem.window) + half
    assert registry.version_tags(second.version)["windows"] == "1,2"

    # Once the champion has learned windows 1 and 2, window 3 trains alone: nothing is carried twice.
    registry.set_alias(CHAMPION, second.version)
    third = trainer(problem, setup, epsilon=1.0).train([3])
    lineage = registry.client.get_run(third.run_id).data.tags
    assert lineage["lineage.windows"] == "3" and lineage["lineage.carried_windows"] == ""
    assert lineage["lineage.parent_version"] == second.version


def test_a_request_already_trained_and_judged_is_not_trained_again(problem, setup):
    """A learner that takes over a request its predecessor decided (but died before committing)."""
    _, registry, _, _ = setup
    first = trainer(problem, setup, epsilon=0.005).train([1])
    assert first.passed
    again = trainer(problem, setup, epsilon=0.005).train([1])
    assert again is None
    assert [v["version"] for v in registry.versions()] == ["1"]
