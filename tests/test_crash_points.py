"""A crash at each step of the embedded index's commit, then a replay: every store agrees afterwards.

The log is a list of changes whose list position is the Kafka offset. Each case commits
revision A, cuts the commit of revision B short at one step, drops the index without a clean
commit, reopens it from its directory and replays the log from its committed offsets through
the real ``IngestSink`` and encoder. The replay brings B and then, in the same batch, A again
(A -> B -> A), C, and a deleted id reinserted with its old content.
"""

import numpy as np
import pytest

from autoglm.encoder import Encoder
from search.embedded import EmbeddedIndex
from search.protocol import Deletion, Document
from streams.ingest import IngestSink

PARTITION = "cdc.public.t:0"
REVISION_WORDS = {"A": "apricot", "B": "blueberry", "C": "cherry"}
COMMIT_STEPS = ["_mark_pending", "_commit_text", "_commit_vectors", "_commit_documents", "_commit_offsets"]


class PowerCut(Exception):
    pass


def doc(pk: int, revision: str) -> Document:
    """One revision of a document: the revision's word, and words of its own so vectors differ."""
    return Document(id=f"public.t:{pk}", table="public.t", title=f"Entry {pk} {REVISION_WORDS[revision]}",
                    text=f"Notes on item number {pk} mention {REVISION_WORDS[revision]} and sample {pk * 7}.")


def delete(pk: int) -> Deletion:
    return Deletion(f"public.t:{pk}", "public.t", ("lsn", 0))


def at_position(change, lsn: int):
    """The change as the source logged it at ``lsn`` (later means newer)."""
    if isinstance(change, Document):
        return Document(change.id, change.table, change.title, change.text, position=("lsn", lsn))
    return Deletion(change.id, change.table, ("lsn", lsn))


def log_of(*batches):
    changes = [change for batch in batches for change in batch]
    return [at_position(change, lsn) for lsn, change in enumerate(changes, start=1)]


BATCH_A = [doc(pk, "A") for pk in range(12)]
BATCH_B = [*(doc(pk, "B") for pk in range(8)), delete(8), delete(9), doc(12, "B"), doc(13, "B")]
BATCH_AFTER = [*(doc(pk, "A") for pk in range(4)), doc(4, "C"), doc(5, "C"), doc(8, "A"), doc(12, "C")]
LOG = log_of(BATCH_A, BATCH_B, BATCH_AFTER)
IDS = sorted({change.id for change in LOG})


def newest_documents(log) -> dict[str, Document]:
    newest = {}
    for change in log:
        if isinstance(change, Document):
            newest[change.id] = change
        else:
            newest.pop(change.id, None)
    return newest


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def apply(sink: IngestSink, start: int, end: int) -> None:
    sink.apply(LOG[start:end], {PARTITION: end})


def replay(index: EmbeddedIndex, encoder: Encoder) -> None:
    """What a restarted worker does: read on from the index's offsets, here in one batch."""
    apply(IngestSink(index, encoder), index.committed_offsets().get(PARTITION, 0), len(LOG))


def assert_stores_agree(index: EmbeddedIndex, encoder: Encoder, replayed: bool = True) -> None:
    """BM25, vectors and rows agree for every id; after a replay the rows are the log's newest
    revisions (without one, whichever revision was committed last)."""
    stored = index.get_many(IDS)
    if replayed:
        expected = newest_documents(LOG)
        assert {doc_id: (d.title, d.text) for doc_id, d in stored.items()} == \
            {doc_id: (d.title, d.text) for doc_id, d in expected.items()}
    for word in REVISION_WORDS.values():
        found = {hit.id for hit in index.search_text(word, 100)}
        assert found == {doc_id for doc_id, d in stored.items() if word in d.text}, word
    vectors = index.vectors(IDS)
    assert sorted(vectors) == sorted(stored)
    wanted = encoder.embed([stored[doc_id].embedding_text for doc_id in sorted(stored)])
    cosines = {doc_id: float(np.dot(vectors[doc_id], vector)) for doc_id, vector in zip(sorted(stored), wanted)}
    assert {doc_id: c for doc_id, c in cosines.items() if c <= 0.999} == {}


def crash_while_committing_b(step: str, directory, encoder: Encoder, monkeypatch) -> None:
    """Commit revision A, then cut the commit of B short at ``step`` and drop the index: the
    process is gone, so nothing else runs (no rollback, no clean close of what was written)."""
    index = EmbeddedIndex(directory)
    apply(IngestSink(index, encoder), 0, len(BATCH_A))
    with monkeypatch.context() as patch:
        def power_cut(*args, **kwargs):
            raise PowerCut(step)
        patch.setattr(EmbeddedIndex, step, power_cut)
        patch.setattr(EmbeddedIndex, "rollback", lambda self: None)
        with pytest.raises(PowerCut):
            apply(IngestSink(index, encoder), len(BATCH_A), len(BATCH_A) + len(BATCH_B))
    index.close()


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_crash_at_any_commit_step_is_mended_by_the_replay(step, encoder, tmp_path, monkeypatch):
    crash_while_committing_b(step, tmp_path / "index", encoder, monkeypatch)
    reopened = EmbeddedIndex(tmp_path / "index")
    try:
        replay(reopened, encoder)
        assert_stores_agree(reopened, encoder)
    finally:
        reopened.close()


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_crash_with_nothing_to_replay_is_mended_by_the_repair(step, encoder, tmp_path, monkeypatch):
    """The source is gone after the crash (an in-memory broker restarted empty): reopening and the
    sink's repair alone leave every store agreeing with the stored rows."""
    crash_while_committing_b(step, tmp_path / "index", encoder, monkeypatch)
    reopened = EmbeddedIndex(tmp_path / "index")
    try:
        IngestSink(reopened, encoder).repair()
        assert reopened.ids_to_reembed() == []
        assert_stores_agree(reopened, encoder, replayed=False)
    finally:
        reopened.close()


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_failure_at_any_commit_step_is_rolled_back_and_the_retry_is_exact(step, encoder, tmp_path, monkeypatch):
    """The same steps failing with the process alive (a full disk, say): the sink rolls the index
    back, and applying the batch again on the same index object leaves every store agreeing."""
    index = EmbeddedIndex(tmp_path / "index")
    try:
        apply(IngestSink(index, encoder), 0, len(BATCH_A))
        with monkeypatch.context() as patch:
            def disk_full(*args, **kwargs):
                raise OSError(28, "No space left on device")
            patch.setattr(EmbeddedIndex, step, disk_full)
            with pytest.raises(OSError):
                apply(IngestSink(index, encoder), len(BATCH_A), len(BATCH_A) + len(BATCH_B))
        replay(index, encoder)
        assert_stores_agree(index, encoder)
    finally:
        index.close()
