"""The conformance suite on the embedded backend (tantivy + usearch + SQLite), with real files."""

import os

import pytest

from search.embedded import EmbeddedIndex, plain_text_query
from search.protocol import Upsert
from tests.conformance import IndexConformance, doc, unit_vector


class TestEmbeddedIndex(IndexConformance):
    @pytest.fixture
    def open_index(self):
        return EmbeddedIndex


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path):
    first = EmbeddedIndex(tmp_path / "index")
    try:
        with pytest.raises(ValueError):
            EmbeddedIndex(tmp_path / "index")
    finally:
        first.close()


def test_plain_text_query_drops_syntax_and_operators():
    assert plain_text_query('Vitamin: "D" AND (bone*) -x ~2^3 OR NOT') == "vitamin d and bone x 2 3 or not"


def test_commit_makes_each_step_durable_before_the_next(tmp_path, monkeypatch):
    """Power loss: no store may be behind what the manifest (pending ids, then offsets) says."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", os.path.realpath(target)))
        real_replace(source, target)

    directory = os.path.realpath(tmp_path / "index")
    index = EmbeddedIndex(tmp_path / "index")
    try:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        index.write_batch([Upsert(doc("public.items:1", "durable"), unit_vector(1))], [])
        index.commit({"t:0": 1})
        assert index._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: the WAL is fsynced per commit
    finally:
        index.close()

    def position(event, start=0):
        return events.index(event, start)

    manifest, text, vectors = (f"{directory}/manifest.json", f"{directory}/text", f"{directory}/vectors.usearch")
    pending_written = position(("rename", manifest))
    assert position(("fsync", directory), pending_written) < position(("fsync", text))
    vectors_renamed = position(("rename", vectors))
    assert position(("fsync", f"{directory}/vectors.tmp")) < vectors_renamed
    offsets_written = position(("rename", manifest), vectors_renamed)
    assert position(("fsync", directory), vectors_renamed) < offsets_written
    assert events[offsets_written + 1:] == [("fsync", directory)]
