"""The ingest sink with a real encoder, on each index backend (the embedded one, and Elasticsearch:
the noida-db emulator or AUTOGLM_ES_URL): ordering, reuse, truncate, offsets; and, on the shared
Elasticsearch index, what several workers writing at once must not break."""

import json
import threading
import uuid
from functools import partial

import pytest

from autoglm.encoder import Encoder
from autoglm.events import parse_change
from search.elasticsearch import BulkWriteFailed, ElasticsearchIndex
from search.embedded import EmbeddedIndex
from search.protocol import Deletion, Document, RefusedChanges, Upsert
from streams.ingest import IngestSink, Truncate
from streams.mapping import Mapper
from tests.conformance import unit_vector


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


class Indexes:
    """Opens the test's index, the same one each time: a restarted worker, or (Elasticsearch) another
    worker of the same deployment. Closes whatever is still open at the end."""

    def __init__(self, open_one):
        self._open_one, self._opened = open_one, []

    def open(self):
        self._opened.append(self._open_one())
        return self._opened[-1]

    def reopen(self, index):
        """The worker holding ``index`` restarts."""
        index.close()
        self._opened.remove(index)
        return self.open()

    def close_all(self):
        for index in self._opened:
            index.close()


def elasticsearch_indexes(url: str) -> Indexes:
    return Indexes(partial(ElasticsearchIndex, url, f"sink-{uuid.uuid4().hex[:10]}"))


@pytest.fixture(params=["embedded", "elasticsearch"])
def indexes(request, tmp_path):
    made = (Indexes(lambda: EmbeddedIndex(tmp_path / "index")) if request.param == "embedded"
            else elasticsearch_indexes(request.getfixturevalue("es_url")))
    yield made
    made.close_all()


@pytest.fixture
def es_indexes(es_url):
    """Only Elasticsearch is shared by several workers, and only its mapping refuses documents."""
    made = elasticsearch_indexes(es_url)
    yield made
    made.close_all()


@pytest.fixture
def sink(indexes, encoder):
    return IngestSink(indexes.open(), encoder)


def doc(pk, title, lsn, text="", table="public.t", **metadata):
    return Document(id=f"{table}:{pk}", table=table, title=title, text=text, metadata=metadata,
                    position=("lsn", lsn), source_ts_ms=None)


def test_newest_change_per_document_wins_within_and_across_batches(sink):
    report = sink.apply([doc(1, "v3", 30), doc(1, "v1", 10), doc(1, "v2", 20), doc(2, "only", 5)], {"t:0": 4})
    assert report.applied == 2 and report.stale == 2
    assert sink.index.get("public.t:1").title == "v3"
    report = sink.apply([doc(1, "v2 again", 20), doc(1, "v3", 30)], {"t:0": 6})
    assert (report.applied, report.stale, report.duplicate) == (0, 1, 1)
    assert sink.index.get("public.t:1").title == "v3"


def test_delete_tombstone_blocks_older_upserts(sink):
    """Our tombstone (a document with the delete's position) carries the order. Had the delete
    been an Elasticsearch delete, a real cluster would refuse the older upsert only within
    ``index.gc_deletes`` (60 s) and the emulator not at all: either would resurrect the row."""
    sink.apply([doc(1, "alive", 1)], {})
    sink.apply([Deletion("public.t:1", "public.t", ("lsn", 10))], {})
    report = sink.apply([doc(1, "late older insert", 5)], {})
    assert report.stale == 1 and sink.index.get("public.t:1") is None
    assert sink.index.states(["public.t:1"])["public.t:1"].position == ("lsn", 10)
    sink.apply([doc(1, "newer insert", 11)], {})
    assert sink.index.get("public.t:1").title == "newer insert"


def test_unchanged_title_and_text_reuse_the_vector(sink):
    first = sink.apply([doc(1, "Title", 1, "Body text", views=1)], {})
    again = sink.apply([doc(1, "Title", 2, "Body text", views=2)], {})
    changed = sink.apply([doc(1, "Title", 3, "Other body", views=3)], {})
    assert (first.embedded, again.embedded, again.reused_vectors, changed.embedded) == (1, 0, 1, 1)
    assert sink.index.get("public.t:1").metadata == {"views": 3}


def test_truncate_applies_in_order_inside_a_batch(sink):
    sink.apply([doc(1, "a", 1), doc(2, "b", 2), doc(1, "x", 1, table="public.other")], {})
    report = sink.apply([doc(3, "c", 3), Truncate("public.t", ("lsn", 10)), doc(4, "after", 11),
                         doc(2, "older than the truncate", 4)], {})
    assert sink.index.live_ids("public.t") == ["public.t:4"]
    assert sink.index.get("public.other:1").title == "x"
    assert report.stale == 1


def test_offsets_are_recorded_with_the_commit_and_survive_a_restart(sink, indexes, encoder):
    sink.apply([doc(1, "a", 1)], {"cdc.t:0": 1})
    sink.apply([], {"cdc.t:0": 2, "cdc.t:1": 7})
    restarted = indexes.reopen(sink.index)
    assert restarted.committed_offsets() == {"cdc.t:0": 2, "cdc.t:1": 7} and restarted.count() == 1
    # Its source was reset, so the restarted worker reads cdc.t:1 again from the start: the offset
    # it commits is smaller, and stands, since nobody wrote it after this worker read it.
    IngestSink(restarted, encoder).apply([doc(2, "b", 2)], {"cdc.t:1": 1})
    assert indexes.reopen(restarted).committed_offsets() == {"cdc.t:0": 2, "cdc.t:1": 1}


def test_a_change_of_position_kind_lets_the_later_arrival_win(sink):
    """A connector that ordered by ts_ms (~1.7e12) now sends Postgres LSNs (far smaller numbers): the
    later arrival wins (autoglm.events.is_newer); nothing is refused, and LSNs then order as usual."""
    first = Document(id="public.t:1", table="public.t", title="from ts_ms", text="",
                     position=("ts_ms", 1_700_000_000_000, 3), source_ts_ms=1_700_000_000_000)
    assert sink.apply([first], {"t:0": 1}).applied == 1
    switched = sink.apply([doc(1, "from the LSN", 5000)], {"t:0": 2})
    assert (switched.applied, switched.stale) == (1, 0)
    stored = sink.index.get("public.t:1")
    assert stored.title == "from the LSN" and tuple(stored.position) == ("lsn", 5000)
    later = sink.apply([doc(1, "older LSN", 4999), doc(1, "newer LSN", 5001)], {"t:0": 4})
    assert (later.applied, later.stale) == (1, 1) and sink.index.get("public.t:1").title == "newer LSN"
    assert sink.index.committed_offsets() == {"t:0": 4}


def ts_ms_only_update(title, ts_ms, offset):
    """An update from a connector whose source has only ts_ms, as the worker parses it at ``offset``."""
    value = {"op": "u", "after": {"id": 1, "title": title}, "source": {"db": "shop", "table": "t", "ts_ms": ts_ms}}
    event = parse_change(b'{"id": 1}', json.dumps(value), offset=offset)
    return Mapper().document(event, Mapper().document_id(event))


def test_same_millisecond_updates_apply_in_offset_order(sink):
    report = sink.apply([ts_ms_only_update("first", 1000, 5), ts_ms_only_update("second", 1000, 6)], {})
    assert sink.index.get("shop.t:1").title == "second" and (report.applied, report.stale) == (1, 1)
    report = sink.apply([ts_ms_only_update("third", 1000, 7)], {})
    assert sink.index.get("shop.t:1").title == "third" and report.applied == 1
    replay = sink.apply([ts_ms_only_update("second", 1000, 6), ts_ms_only_update("third", 1000, 7)], {})
    assert (replay.applied, replay.stale, replay.duplicate) == (0, 1, 1)
    assert sink.index.get("shop.t:1").title == "third"


def test_a_batch_that_fails_half_way_leaves_nothing_of_it_behind(sink):
    """The index refuses a change part-way through writing it (its position cannot be stored):
    the sink rolls back, so the change's text and vector are not made durable by the next commit."""
    sink.apply([doc(1, "Glacier retreat", 1)], {"cdc.t:0": 1})
    unstorable = Document(id="public.t:2", table="public.t", title="Zebra migration", text="",
                          position=("lsn", object()))
    with pytest.raises(TypeError):
        sink.apply([doc(1, "Glacier retreat and zebra", 2), unstorable], {"cdc.t:0": 3})
    sink.apply([doc(3, "Coral reefs", 3)], {"cdc.t:0": 3})
    assert [hit.id for hit in sink.index.search_text("zebra", 10)] == []
    assert sink.index.get("public.t:1").title == "Glacier retreat"
    assert sorted(sink.index.vectors(["public.t:1", "public.t:2", "public.t:3"])) == ["public.t:1", "public.t:3"]


def test_refused_documents_are_named_the_rest_applied_and_no_offsets_recorded(es_indexes, encoder):
    """A document the mapping rejects (source_ts_ms far beyond a long; a real cluster refuses it the
    same way, per bulk item, and already at 2**63, which the emulator, reading numbers as floats,
    still accepts): the other changes are applied, the offsets are not, and the caller
    dead-letters the refused one and applies the batch again without it (streams/cdc.py)."""
    sink = IngestSink(es_indexes.open(), encoder)
    sink.apply([doc(1, "kept", 1)], {"cdc.t:0": 1})
    unstorable = Document(id="public.t:2", table="public.t", title="too late", text="", position=("lsn", 2),
                          source_ts_ms=10**20)
    with pytest.raises(RefusedChanges) as refused:
        sink.apply([doc(3, "applied anyway", 3), unstorable], {"cdc.t:0": 3})
    assert list(refused.value.reasons) == ["public.t:2"] and "source_ts_ms" in refused.value.reasons["public.t:2"]
    assert sink.index.get("public.t:3").title == "applied anyway" and sink.index.get("public.t:2") is None
    restarted = es_indexes.reopen(sink.index)
    assert restarted.committed_offsets() == {"cdc.t:0": 1}
    again = IngestSink(restarted, encoder).apply([doc(3, "applied anyway", 3)], {"cdc.t:0": 3})
    assert (again.applied, again.duplicate) == (0, 1) and restarted.committed_offsets() == {"cdc.t:0": 3}


def test_workers_committing_different_partitions_keep_each_others_offsets(es_indexes):
    """Two workers of one group, each owning one partition, commit at the same time, over and over;
    neither ever finds its offset undone by the other's commit."""
    workers, errors, undone = [es_indexes.open(), es_indexes.open()], [], []
    start = threading.Barrier(len(workers))

    def commit_offsets(index, partition):
        start.wait()
        try:
            for offset in range(1, 31):
                index.commit({f"cdc.t:{partition}": offset})
                found = index.committed_offsets().get(f"cdc.t:{partition}")
                if found != offset:
                    undone.append((partition, offset, found))
        except Exception as exc:  # noqa: BLE001 -- asserted below
            errors.append(exc)

    threads = [threading.Thread(target=commit_offsets, args=(index, n)) for n, index in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and undone == []
    assert es_indexes.open().committed_offsets() == {"cdc.t:0": 30, "cdc.t:1": 30}


def test_a_revoked_worker_never_moves_an_offset_back(es_indexes):
    """After a rebalance the revoked worker may still flush its last batch: its older offset must not
    overwrite the new owner's, whether it read the offset before or never did."""
    revoked, owner = es_indexes.open(), es_indexes.open()
    assert revoked.committed_offsets() == {}
    revoked.commit({"cdc.t:0": 10})
    assert owner.committed_offsets() == {"cdc.t:0": 10}  # the new owner resumes there
    owner.commit({"cdc.t:0": 15})
    revoked.commit({"cdc.t:0": 12})  # its read is stale: the write conflicts, 15 is larger and stays
    es_indexes.open().commit({"cdc.t:0": 11})  # a worker that never read it: the create conflicts
    assert es_indexes.open().committed_offsets() == {"cdc.t:0": 15}
    owner.commit({"cdc.t:0": 16})  # the owner's own view was overtaken by nothing newer: it moves on
    assert es_indexes.open().committed_offsets() == {"cdc.t:0": 16}


def interleaved(first, second, first_write, second_write):
    """Both workers read the id, then ``second`` commits, then ``first``: the classic lost update."""
    for index in (first, second):
        index.states(["public.t:1"])
    for index, (upserts, deletions) in ((second, second_write), (first, first_write)):
        index.write_batch(upserts, deletions)
        index.commit({})


def test_two_workers_writing_one_id_keep_the_newer_position(es_indexes):
    a, b = es_indexes.open(), es_indexes.open()
    # absent for both: b creates it at 7, a's create at 5 conflicts, is re-decided and dropped
    interleaved(a, b, ([Upsert(doc(1, "a at 5", 5), unit_vector(5))], []),
                ([Upsert(doc(1, "b at 7", 7), unit_vector(7))], []))
    assert a.get("public.t:1").title == "b at 7"
    # a's change is the newer one: its write conflicts, is re-decided and retried over b's
    interleaved(a, b, ([Upsert(doc(1, "a at 9", 9), unit_vector(9))], []),
                ([Upsert(doc(1, "b at 8", 8), unit_vector(8))], []))
    assert b.get("public.t:1").title == "a at 9"
    assert [hit.id for hit in b.search_vector(unit_vector(9), 1)] == ["public.t:1"]
    # b's delete at 12 wins over a's upsert at 11 arriving later: the tombstone stays
    interleaved(a, b, ([Upsert(doc(1, "a late", 11), unit_vector(11))], []),
                ([], [Deletion("public.t:1", "public.t", ("lsn", 12))]))
    assert a.get("public.t:1") is None and a.states(["public.t:1"])["public.t:1"].position == ("lsn", 12)


def test_a_kept_vector_is_not_reused_once_another_worker_changed_the_text(es_indexes):
    """a decided from its read that the text is unchanged (no vector), but b rewrote the text before
    a's commit: a's newer change is not written with b's vector; the commit fails as transient, so
    the sink applies the batch again, reads the new text and embeds."""
    a, b = es_indexes.open(), es_indexes.open()
    a.write_batch([Upsert(doc(1, "Same title", 1), unit_vector(1))], [])
    a.commit({})
    with pytest.raises(BulkWriteFailed) as failed:
        interleaved(a, b, ([Upsert(doc(1, "Same title", 3), None)], []),
                    ([Upsert(doc(1, "Other title", 2), unit_vector(2))], []))
    assert a.is_unavailable(failed.value)
    a.rollback()
    assert a.get("public.t:1").title == "Other title"
    assert [hit.id for hit in a.search_vector(unit_vector(2), 1)] == ["public.t:1"]
