"""Query-side fine-tuning, the promotion gate and the replay buffer, on a small real SciFact problem
(see tests/scifact_problem.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoglm.encoder import Encoder
from consumers.finetune import TrainConfig, _Candidates, fine_tune
from consumers.gate import GateConfig, decide, evaluate, forgetting_subset, holdout_mrr, noise_tolerance
from consumers.replay import ReplayBuffer
from feedback.examples import TrainingExample
from tests.scifact_problem import SCIFACT, TRAINED_QUERIES, make_example, problem  # noqa: F401 (fixture)

RUN = TrainConfig(lr=1e-4, epochs=2, seed=7)

pytestmark = pytest.mark.skipif(not SCIFACT.exists(), reason="needs ../shared/data/scifact beside the repo")


@pytest.fixture(scope="module")
def run(problem):
    """One fine-tuning run of 2 epochs over the window, the input encoder's weights kept to compare."""
    before = {name: tensor.clone() for name, tensor in problem.encoder.model.state_dict().items()}
    result = fine_tune(problem.encoder, problem.window, problem.replay, problem.index.vectors, RUN)
    return result, before, Encoder(state_dict=result.state_dict, version="candidate")


def test_fine_tuning_improves_the_trained_queries(problem, run):
    result, _, candidate = run
    base = evaluate(problem.encoder.embed, problem.index, problem.queries, problem.trained)
    tuned = evaluate(candidate.embed, problem.index, problem.queries, problem.trained)
    gate_base = evaluate(problem.encoder.embed, problem.index, problem.queries, problem.gate)
    gate_tuned = evaluate(candidate.embed, problem.index, problem.queries, problem.gate)
    untouched = forgetting_subset(problem.gate, problem.window)
    forgot_base = evaluate(problem.encoder.embed, problem.index, problem.queries, untouched)
    forgot_tuned = evaluate(candidate.embed, problem.index, problem.queries, untouched)
    print(f"\ntrained nDCG@10 {base['ndcg@10']:.3f} -> {tuned['ndcg@10']:.3f}; gate (dev) "
          f"{gate_base['ndcg@10']:.3f} -> {gate_tuned['ndcg@10']:.3f}; forgetting subset ({len(untouched)}) "
          f"{forgot_base['ndcg@10']:.3f} -> {forgot_tuned['ndcg@10']:.3f}; {result.steps} steps in "
          f"{result.seconds:.1f} s ({result.seconds / result.steps:.2f} s/step)")
    assert base["queries"] == TRAINED_QUERIES and result.examples_used == len(problem.window)
    assert tuned["ndcg@10"] > base["ndcg@10"] + 0.05
    assert tuned["mrr@10"] > base["mrr@10"]
    assert holdout_mrr(candidate.embed, problem.index, problem.window) > \
        holdout_mrr(problem.encoder.embed, problem.index, problem.window)
    assert gate_tuned["ndcg@10"] > gate_base["ndcg@10"] - 0.05  # other queries: no collapse


def test_loss_decreases_and_the_input_encoder_is_unchanged(problem, run):
    result, before, _ = run
    assert not result.stopped_early and result.steps == len(result.loss_curve) >= 8
    assert np.mean(result.loss_curve[-3:]) < 0.8 * np.mean(result.loss_curve[:3])
    after = problem.encoder.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not problem.encoder.model.training


def test_batches_draw_the_replay_share_from_older_examples(run):
    result, _, _ = run
    share = result.replay_items / (result.replay_items + result.window_items)
    assert result.replay_items > 0 and abs(share - RUN.replay_ratio) < 0.01


def test_the_same_seed_gives_the_same_run_and_missing_positives_are_skipped(problem):
    window = problem.window[:7] + [make_example("gone", "a deleted document", "no-such-doc")]
    config = TrainConfig(lr=5e-5, batch_size=4, replay_ratio=0.25, epochs=1, seed=3)
    first, second = (fine_tune(problem.encoder, window, problem.replay, problem.index.vectors, config,
                               progress=False) for _ in range(2))
    assert (first.examples_used, first.steps, first.window_items, first.replay_items) == (7, 3, 7, 3)
    assert first.loss_curve == second.loss_curve
    assert all(torch.equal(first.state_dict[name], second.state_dict[name]) for name in first.state_dict)


def test_a_run_stops_at_max_seconds(problem):
    config = TrainConfig(lr=5e-5, epochs=50, max_seconds=6.0)
    result = fine_tune(problem.encoder, problem.window, [], problem.index.vectors, config, progress=False)
    assert result.stopped_early and 0 < result.steps < 50 * math.ceil(len(problem.window) / 32)
    # It skips a step the last one's duration says would end past the limit; step times vary
    # on a shared machine, so the overshoot is bounded by steps, not by a fixed margin.
    assert result.seconds < config.max_seconds + 2 * result.seconds / result.steps


def test_other_clicks_on_the_same_query_are_not_negatives():
    items = [make_example("q1", "Vitamin D", "a", ["n"]), make_example("q2", "vitamin d ", "b"),
             make_example("q3", "other", "c", ["a"])]
    vectors = {doc_id: np.eye(4, dtype=np.float32)[j] for j, doc_id in enumerate("abcn")}
    candidates = _Candidates.build(items, vectors, corpus={"z": np.ones(4, dtype=np.float32)})
    assert candidates.ids == ["z", "a", "b", "c", "n"]
    assert candidates.other_positives(items).tolist() == [[False, False, True, False, False],
                                                          [False, True, False, False, False],
                                                          [False, False, False, False, False]]


def test_forgetting_subset_keeps_queries_the_window_never_mentions():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1, "x": 1}, "q3": {"c": 1}, "q4": {"d": 1}, "q5": {"e": 1, "a": 0}}
    window = [make_example("s1", "q", "a", ["x"]), make_example("s2", "q", "d")]
    assert forgetting_subset(qrels, window) == {"q3": {"c": 1}, "q5": {"e": 1, "a": 0}}


def test_gate_passes_within_epsilon_and_fails_on_any_regression():
    champion = {"gate.ndcg@10": 0.700, "gate.mrr@10": 0.650, "holdout.mrr@10": 0.500,
                "forgetting.ndcg@10": 0.600, "gate.queries": 60}
    eps = GateConfig().epsilon
    better = {**champion, "gate.ndcg@10": 0.720, "forgetting.ndcg@10": 0.600 - eps / 2}
    decision = decide(better, champion, eps)
    assert decision.passed and len(decision.reasons) == 4
    forgot = {**better, "forgetting.ndcg@10": 0.600 - 2 * eps}
    decision = decide(forgot, champion, eps)
    assert not decision.passed
    assert [r for r in decision.reasons if " < " in r] == [r for r in decision.reasons if "forgetting" in r]
    assert not decide({**champion, "gate.mrr@10": float("nan")}, champion, eps).passed
    assert not decide({"other.ndcg@10": 0.9}, champion, eps).passed  # nothing compared, nothing shown
    assert decide({"gate.ndcg@10": 0.71, "new.metric": 0.0}, champion, eps).passed  # only shared names count


def stream(n: int) -> list[TrainingExample]:
    return [make_example(f"q{i}", f"query {i}", f"d{i}") for i in range(n)]


def test_replay_buffer_keeps_a_uniform_sample_of_the_stream():
    buffer, examples = ReplayBuffer(capacity=1000, seed=5), stream(20_000)
    for start in range(0, len(examples), 700):  # chunks as windows arrive
        buffer.add(examples[start:start + 700])
    assert buffer.seen == 20_000 and len(buffer) == 1000
    positions = [int(e.query_id[1:]) for e in buffer.items()]
    assert len(set(positions)) == 1000
    counts = np.bincount(np.array(positions) // 2000, minlength=10)  # expected 100 per tenth of the stream
    chi_square = float(((counts - 100) ** 2 / 100).sum())
    assert chi_square < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001

    small = ReplayBuffer(capacity=10)
    small.add(stream(4))
    assert len(small) == 4 and len(small.sample(8, np.random.default_rng(0))) == 4


def test_replay_buffer_survives_save_and_load(tmp_path):
    buffer = ReplayBuffer(capacity=50, seed=1)
    buffer.add([make_example(f"q{i}", f"query {i}", f"d{i}", [f"n{i}", "m"], weight=1.5) for i in range(120)])
    buffer.save(tmp_path / "replay.json")
    loaded = ReplayBuffer.load(tmp_path / "replay.json")
    assert (loaded.capacity, loaded.seen, loaded.items()) == (50, 120, buffer.items())
    assert isinstance(loaded.items()[0].negative_ids, tuple)
    more = stream(300)
    buffer.add(more)
    loaded.add(more)
    assert loaded.items() == buffer.items()  # the random state travels with the buffer


def test_forgetting_tolerance_grows_with_the_noise_of_a_small_subset():
    rng = np.random.default_rng(4)
    champion = {f"q{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 40))}
    noisy = {qid: min(1.0, max(0.0, v + rng.normal(0, 0.3))) for qid, v in champion.items()}
    steady = {qid: v - 0.001 for qid, v in champion.items()}
    eps = GateConfig().epsilon
    assert noise_tolerance(noisy, champion, eps) > 5 * eps  # 40 queries moving a lot: wide
    assert noise_tolerance(steady, champion, eps) == eps  # identical moves: epsilon itself
    assert noise_tolerance({"q1": 0.5}, champion, eps) == eps  # too few to estimate
    decision = decide({"forgetting.ndcg@10": 0.60, "gate.ndcg@10": 0.70},
                      {"forgetting.ndcg@10": 0.62, "gate.ndcg@10": 0.70}, eps, {"forgetting.ndcg@10": 0.03})
    assert decision.passed and "0.0300" in decision.reasons[0]
    assert not decide({"forgetting.ndcg@10": 0.58}, {"forgetting.ndcg@10": 0.62}, eps,
                      {"forgetting.ndcg@10": 0.03}).passed
