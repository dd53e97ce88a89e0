"""Examples from feedback: positives, hard negatives, propensity weights, dedup, windows and session caps."""

import uuid

import pytest

from autoglm.interactions import Feedback, Impression, ShownHit
from feedback.examples import ExamplePolicy, build_example, is_positive
from feedback.propensity import PositionBiasModel
from feedback.sqlite_store import SqliteExampleStore

POLICY = ExamplePolicy()


def impression(query_id="q1", docs=("d1", "d2", "d3", "d4"), session="s1"):
    return Impression(query_id=query_id, query="what is x", mode="hybrid", model_version="base",
                      session_id=session, hits=[ShownHit(doc_id=d, position=i, score=1.0 / i)
                                                for i, d in enumerate(docs, start=1)])


def event(doc, position, type_="click", value=None, query_id="q1", session="s1"):
    return Feedback(event_id=uuid.uuid4(), query_id=query_id, doc_id=doc, type=type_, position=position,
                    value=value, session_id=session)


def test_positive_signals():
    assert is_positive(event("d1", 1), POLICY)
    assert is_positive(event("d1", 1, "dwell", 45), POLICY) and not is_positive(event("d1", 1, "dwell", 5), POLICY)
    assert is_positive(event("d1", 1, "rating", 5), POLICY) and not is_positive(event("d1", 1, "rating", 2), POLICY)
    assert not is_positive(event("d1", 1, "skip"), POLICY)


def test_hard_negatives_are_shown_above_and_not_engaged():
    first, third = event("d1", 1), event("d3", 3)
    example = build_example(impression(), third, [first, third], PositionBiasModel(), POLICY)
    assert example.positive_id == "d3" and example.negative_ids == ("d2",) and example.rank == 3
    assert build_example(impression(), event("zz", 9), [], PositionBiasModel(), POLICY) is None
    same = build_example(impression(), event("d3", 3), [], PositionBiasModel(), POLICY)
    assert same.example_id == example.example_id  # one example per (query, document)


def test_inverse_propensity_weights_prior_estimate_and_clip():
    prior = PositionBiasModel(eta=1.0, estimate_from_log=False)
    assert prior.weight(1) == 1.0 and prior.weight(4) == pytest.approx(4.0)
    assert prior.weight(50) == pytest.approx(10.0)  # clipped at 1 / min_propensity
    estimated = PositionBiasModel(min_impressions=100, estimate_from_log=True)
    for _ in range(1000):
        estimated.observe_impression(3)
    for rank, clicks in ((1, 400), (2, 200), (3, 100)):
        for _ in range(clicks):
            estimated.observe_click(rank)
    assert estimated.propensity(2) == pytest.approx(0.5) and estimated.weight(3) == pytest.approx(4.0)
    default = PositionBiasModel(eta=1.0, shown=estimated.shown, clicked=estimated.clicked)
    assert default.weight(3) == pytest.approx(3.0)  # the same log, but the default is the prior
    sparse = PositionBiasModel(eta=1.0, min_impressions=100, estimate_from_log=True)
    sparse.observe_impression(3)
    sparse.observe_click(3)
    assert sparse.propensity(3) == pytest.approx(1 / 3)  # too little log: the prior holds


def test_store_deduplicates_and_cuts_windows_with_a_session_cap(tmp_path):
    store = SqliteExampleStore(tmp_path / "examples.db")
    bias = PositionBiasModel()
    bot = [build_example(impression(f"bot{i}", session="bot"), event("d2", 2, query_id=f"bot{i}", session="bot"), [], bias, POLICY)
           for i in range(30)]
    people = [build_example(impression(f"p{i}", session=f"s{i}"), event("d1", 1, query_id=f"p{i}", session=f"s{i}"), [], bias,
                            POLICY) for i in range(10)]
    assert store.add(bot + people) == 40 and store.add(bot[:5]) == 0
    assert store.pending() == 40
    window = store.close_window("size", max_session_share=0.1)
    assert (window.window_id, window.examples, window.dropped_by_session_cap, window.sessions) == (1, 14, 26, 11)
    examples = store.examples_in(1)
    assert sum(e.session_id == "bot" for e in examples) == 4 and len(examples) == 14
    assert store.pending() == 0 and store.close_window("time", 0.1) is None
    store.add([build_example(impression("new"), event("d1", 1, query_id="new"), [], bias, POLICY)])
    assert store.close_window("time", 0.1).window_id == 2
    store.close()
    reopened = SqliteExampleStore(tmp_path / "examples.db")
    assert reopened.last_window().window_id == 2 and len(reopened.examples_in(1)) == 14
