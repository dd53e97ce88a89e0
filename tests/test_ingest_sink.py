"""The ingest sink with a real encoder and a real embedded index: ordering, reuse, truncate, offsets."""

import json

import pytest

from autoglm.encoder import Encoder
from autoglm.events import parse_change
from search.embedded import EmbeddedIndex
from search.protocol import Deletion, Document
from streams.ingest import IngestSink, Truncate
from streams.mapping import Mapper


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


@pytest.fixture
def sink(encoder, tmp_path):
    index = EmbeddedIndex(tmp_path / "index")
    yield IngestSink(index, encoder)
    index.close()


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
    sink.apply([doc(1, "alive", 1)], {})
    sink.apply([Deletion("public.t:1", "public.t", ("lsn", 10))], {})
    report = sink.apply([doc(1, "late older insert", 5)], {})
    assert report.stale == 1 and sink.index.get("public.t:1") is None
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


def test_offsets_are_recorded_with_the_commit(sink):
    sink.apply([doc(1, "a", 1)], {"cdc.t:0": 1})
    sink.apply([], {"cdc.t:0": 2, "cdc.t:1": 7})
    manifest = json.loads((sink.index.directory / "manifest.json").read_text())
    assert manifest["offsets"] == {"cdc.t:0": 2, "cdc.t:1": 7} and manifest["documents"] == 1


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
