"""The index conformance suite: behaviour every backend of ``search.protocol.Index`` must show.

A backend's test module subclasses :class:`IndexConformance` and provides an
``open_index(path)`` fixture-factory; the same assertions then run against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from search.protocol import Deletion, Document, Upsert

DIM = 384


def unit_vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def doc(doc_id: str, title: str, text: str = "", position: int = 1, table: str = "public.items",
        **metadata) -> Document:
    return Document(id=doc_id, table=table, title=title, text=text, metadata=metadata,
                    position=("lsn", position), source_ts_ms=1_700_000_000_000)


class IndexConformance:
    @pytest.fixture
    def index(self, open_index, tmp_path):
        index = open_index(tmp_path / "index")
        yield index
        index.close()

    def write(self, index, upserts=(), deletions=(), offsets=None):
        index.write_batch(list(upserts), list(deletions))
        index.commit(offsets or {})

    def test_upsert_is_searchable_and_readable_after_commit(self, index):
        self.write(index, [Upsert(doc("public.items:1", "Coral reef bleaching", "Warm water stresses corals.",
                                      source="survey"), unit_vector(1))])
        stored = index.get("public.items:1")
        assert stored.title == "Coral reef bleaching" and stored.text == "Warm water stresses corals."
        assert stored.metadata == {"source": "survey"} and stored.table == "public.items"
        assert tuple(stored.position) == ("lsn", 1)
        assert [hit.id for hit in index.search_text("coral bleaching", 10)] == ["public.items:1"]
        [hit] = index.search_vector(unit_vector(1), 1)
        assert hit.id == "public.items:1" and hit.score == pytest.approx(1.0, abs=1e-3)
        assert index.count() == 1

    def test_text_search_stems_english_and_ranks_by_bm25(self, index):
        self.write(index, [
            Upsert(doc("public.items:1", "Running shoes", "Shoes for runners who run daily."), unit_vector(1)),
            Upsert(doc("public.items:2", "Kitchen knives", "Sharp knives for cooks; one mention of run."),
                   unit_vector(2)),
        ])
        assert [hit.id for hit in index.search_text("runs", 10)] == ["public.items:1", "public.items:2"]

    def test_upsert_replaces_text_and_vector(self, index):
        self.write(index, [Upsert(doc("public.items:1", "Old words here"), unit_vector(1))])
        self.write(index, [Upsert(doc("public.items:1", "Fresh content", position=2), unit_vector(2))])
        assert index.search_text("old words", 10) == []
        assert [hit.id for hit in index.search_text("fresh", 10)] == ["public.items:1"]
        assert index.search_vector(unit_vector(2), 1)[0].score == pytest.approx(1.0, abs=1e-3)
        assert index.count() == 1

    def test_upsert_without_vector_keeps_the_stored_vector(self, index):
        self.write(index, [Upsert(doc("public.items:1", "Same text", views=1), unit_vector(7))])
        self.write(index, [Upsert(doc("public.items:1", "Same text", position=2, views=2), None)])
        assert index.get("public.items:1").metadata == {"views": 2}
        [hit] = index.search_vector(unit_vector(7), 1)
        assert hit.id == "public.items:1" and hit.score == pytest.approx(1.0, abs=1e-3)
        assert [hit.id for hit in index.search_text("same text", 10)] == ["public.items:1"]

    def test_delete_hides_the_document_and_keeps_a_tombstone(self, index):
        self.write(index, [Upsert(doc("public.items:1", "Doomed entry"), unit_vector(1)),
                           Upsert(doc("public.items:2", "Survivor entry"), unit_vector(2))])
        self.write(index, deletions=[Deletion("public.items:1", "public.items", ("lsn", 9)),
                                     Deletion("public.items:404", "public.items", ("lsn", 9))])
        assert index.get("public.items:1") is None
        assert [hit.id for hit in index.search_text("entry", 10)] == ["public.items:2"]
        assert all(hit.id != "public.items:1" for hit in index.search_vector(unit_vector(1), 10))
        states = index.states(["public.items:1", "public.items:2", "public.items:404", "public.items:5"])
        assert states["public.items:1"].deleted and tuple(states["public.items:1"].position) == ("lsn", 9)
        assert states["public.items:404"].deleted
        assert not states["public.items:2"].deleted and "public.items:5" not in states
        assert index.count() == 1

    def test_vectors_returns_stored_vectors_of_live_documents(self, index):
        self.write(index, [Upsert(doc("public.items:1", "a"), unit_vector(1)),
                           Upsert(doc("public.items:2", "b"), unit_vector(2))])
        self.write(index, deletions=[Deletion("public.items:2", "public.items", ("lsn", 3))])
        found = index.vectors(["public.items:1", "public.items:2", "public.items:9"])
        assert list(found) == ["public.items:1"]
        assert np.allclose(found["public.items:1"], unit_vector(1), atol=1e-6)
        assert index.vectors([]) == {}

    def test_sample_vectors_draws_live_documents_reproducibly(self, index):
        self.write(index, [Upsert(doc(f"public.items:{n}", f"row {n}"), unit_vector(n)) for n in range(1, 9)])
        self.write(index, deletions=[Deletion("public.items:8", "public.items", ("lsn", 3))])
        everything = index.sample_vectors(100)
        assert sorted(everything) == [f"public.items:{n}" for n in range(1, 8)]
        assert np.allclose(everything["public.items:3"], unit_vector(3), atol=1e-6)
        sample = index.sample_vectors(4, seed=1)
        assert len(sample) == 4 and set(sample) <= set(everything)
        assert list(index.sample_vectors(4, seed=1)) == list(sample)
        assert {frozenset(index.sample_vectors(4, seed=s)) for s in range(6)} != {frozenset(sample)}
        assert all(np.allclose(vector, everything[doc_id]) for doc_id, vector in sample.items())

    def test_upsert_after_delete_revives_the_document(self, index):
        self.write(index, [Upsert(doc("public.items:1", "First life"), unit_vector(1))])
        self.write(index, deletions=[Deletion("public.items:1", "public.items", ("lsn", 2))])
        self.write(index, [Upsert(doc("public.items:1", "Second life", position=3), unit_vector(3))])
        assert index.get("public.items:1").title == "Second life"
        assert index.search_vector(unit_vector(3), 1)[0].id == "public.items:1"

    def test_live_ids_lists_one_tables_live_documents(self, index):
        self.write(index, [Upsert(doc("public.items:1", "a"), unit_vector(1)),
                           Upsert(doc("public.items:2", "b"), unit_vector(2)),
                           Upsert(doc("public.other:1", "c", table="public.other"), unit_vector(3))])
        self.write(index, deletions=[Deletion("public.items:2", "public.items", ("lsn", 5))])
        assert index.live_ids("public.items") == ["public.items:1"]

    def test_query_syntax_is_plain_text(self, index):
        self.write(index, [Upsert(doc("public.items:1", "AND OR NOT operators", "title: value (x) *"),
                                  unit_vector(1))])
        for query in ['title: "value', "(x", "*", "~^", "-", "AND", "OR NOT", "", "   ", "ünïcödé ✓"]:
            index.search_text(query, 5)  # must not raise
        assert index.search_text("", 5) == []
        assert [hit.id for hit in index.search_text("operators AND", 5)] == ["public.items:1"]

    def test_search_respects_k_and_empty_index(self, index):
        assert index.search_text("anything", 5) == [] and index.search_vector(unit_vector(1), 5) == []
        self.write(index, [Upsert(doc(f"public.items:{i}", f"shared word {i}"), unit_vector(i))
                           for i in range(20)])
        assert len(index.search_text("shared word", 7)) == 7
        assert len(index.search_vector(unit_vector(3), 7)) == 7

    def test_vector_search_finds_each_document_by_its_own_vector(self, index):
        self.write(index, [Upsert(doc(f"public.items:{i}", f"doc {i}"), unit_vector(i)) for i in range(500)])
        found = sum(index.search_vector(unit_vector(i), 1)[0].id == f"public.items:{i}" for i in range(500))
        assert found >= 495

    def test_commit_records_offsets_and_everything_survives_reopen(self, open_index, tmp_path):
        path: Path = tmp_path / "index"
        index = open_index(path)
        self.write(index, [Upsert(doc("public.items:1", "Persistent kept doc", tag="x"), unit_vector(1)),
                           Upsert(doc("public.items:2", "Removed doc"), unit_vector(2))],
                   offsets={"cdc.public.items:0": 10})
        self.write(index, deletions=[Deletion("public.items:2", "public.items", ("lsn", 4))],
                   offsets={"cdc.public.items:1": 3})
        index.close()

        reopened = open_index(path)
        try:
            assert reopened.committed_offsets() == {"cdc.public.items:0": 10, "cdc.public.items:1": 3}
            assert reopened.get("public.items:1").metadata == {"tag": "x"}
            assert [hit.id for hit in reopened.search_text("persistent", 5)] == ["public.items:1"]
            assert reopened.search_vector(unit_vector(1), 1)[0].id == "public.items:1"
            assert reopened.states(["public.items:2"])["public.items:2"].deleted
            assert reopened.count() == 1
        finally:
            reopened.close()

    def test_uncommitted_writes_are_not_durable(self, open_index, tmp_path):
        path: Path = tmp_path / "index"
        index = open_index(path)
        self.write(index, [Upsert(doc("public.items:1", "committed"), unit_vector(1))], offsets={"t:0": 1})
        index.write_batch([Upsert(doc("public.items:2", "never committed"), unit_vector(2))], [])
        index.close()
        reopened = open_index(path)
        try:
            assert reopened.get("public.items:2") is None
            assert reopened.committed_offsets() == {"t:0": 1}
        finally:
            reopened.close()

    def test_rollback_drops_the_writes_since_the_last_commit(self, index):
        self.write(index, [Upsert(doc("public.items:1", "Glacier retreat", position=1), unit_vector(1))],
                   offsets={"cdc.t:0": 1})
        index.write_batch([Upsert(doc("public.items:1", "Volcanic ash", position=2), unit_vector(2)),
                           Upsert(doc("public.items:2", "Volcanic soil", position=3), unit_vector(3))], [])
        index.rollback()
        self.write(index, offsets={"cdc.t:0": 1})  # a later commit must not make the dropped writes durable
        assert index.get("public.items:1").title == "Glacier retreat" and index.get("public.items:2") is None
        assert index.search_text("volcanic", 10) == []
        assert [hit.id for hit in index.search_vector(unit_vector(1), 1)] == ["public.items:1"]
        assert index.states(["public.items:1"])["public.items:1"].position == ("lsn", 1)
        assert index.committed_offsets() == {"cdc.t:0": 1}
