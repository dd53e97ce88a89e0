"""Both example stores behave the same: the SQLite one of the embedded default and the
Elasticsearch one that several learners share (against the emulator, or AUTOGLM_ES_URL)."""

from __future__ import annotations

import uuid

import pytest

from feedback.elasticsearch_store import ElasticsearchExampleStore
from feedback.examples import TrainingExample
from feedback.sqlite_store import SqliteExampleStore


def example(n: int, session: str | None = "s1") -> TrainingExample:
    return TrainingExample(f"ex-{n}", f"q-{n}", f"query {n}", f"doc-{n}", (f"neg-{n}",), 1.0 + n / 10, 1 + n % 3,
                           session, "base")


@pytest.fixture(params=["sqlite", "elasticsearch"])
def open_store(request, tmp_path):
    """A function that opens the same store again (as a restarted or a standby learner would)."""
    opened = []
    if request.param == "sqlite":
        def open_again():
            opened.append(SqliteExampleStore(tmp_path / "examples.db"))
            return opened[-1]
    else:
        url, name = request.getfixturevalue("es_url"), f"stores-{uuid.uuid4().hex[:10]}"

        def open_again():
            opened.append(ElasticsearchExampleStore(url, name))
            return opened[-1]
    yield open_again
    for store in opened:
        try:
            store.close()
        except Exception:
            pass


def test_examples_are_deduplicated_and_windows_take_every_pending_one(open_store):
    store = open_store()
    assert store.add([example(1), example(2)]) == 2
    assert store.add([example(2), example(3)]) == 1  # ex-2 again: a replayed record adds nothing
    assert store.pending() == 3
    window = store.close_window("size", max_session_share=1.0)
    assert (window.window_id, window.examples, window.sessions, window.reason) == (1, 3, 1, "size")
    assert [e.example_id for e in store.examples_in(1)] == ["ex-1", "ex-2", "ex-3"]
    assert store.examples_in(1)[1] == example(2)  # the example comes back whole
    assert store.pending() == 0 and store.close_window("size", 1.0) is None
    store.add([example(4)])
    assert store.close_window("time", 1.0).window_id == 2
    assert [e.example_id for e in store.examples_in(2)] == ["ex-4"]


def test_the_session_cap_drops_a_sessions_excess_for_good(open_store):
    store = open_store()
    store.add([example(n, "bot") for n in range(8)] + [example(n, f"user-{n}") for n in range(8, 12)])
    window = store.close_window("size", max_session_share=0.25)  # at most ceil(0.25 * 12) = 3 per session
    assert (window.examples, window.dropped_by_session_cap, window.sessions) == (7, 5, 5)
    kept = [e.example_id for e in store.examples_in(window.window_id)]
    assert kept == ["ex-0", "ex-1", "ex-2", "ex-8", "ex-9", "ex-10", "ex-11"]
    assert store.pending() == 0  # the dropped ones are not carried into the next window


def test_a_reopened_store_continues_where_the_last_one_stopped(open_store):
    first = open_store()
    first.add([example(1), example(2)])
    first.close_window("size", 1.0)
    first.add([example(3)])
    first.add_rank_stats(shown_ranks=3)
    first.add_rank_stats(clicked_rank=2)
    first.close()
    second = open_store()  # a restarted learner, or the standby taking over
    assert second.pending() == 1 and second.last_window().window_id == 1
    assert second.add([example(1), example(3)]) == 0
    assert second.close_window("size", 1.0).window_id == 2  # window ids never restart
    assert [e.example_id for e in second.examples_in(2)] == ["ex-3"]
    shown, clicked = (({rank: n for rank, n in counts.items() if n}) for counts in second.rank_stats())
    assert shown == {1: 1, 2: 1, 3: 1} and clicked == {2: 1}
