"""The embedded index: tantivy (BM25), usearch (HNSW vectors) and a SQLite document store in one directory.

Layout under the index directory::

    text/            tantivy index over title + text (English stemming)
    vectors.usearch  HNSW graph, cosine, keyed by an integer per document
    documents.db     documents, their source positions and delete tombstones
    manifest.json    consumer offsets of the last durable commit, and the ids of a commit under way

There is no transaction spanning the three stores, so ``commit`` makes them durable in a
fixed order, each step fsynced before the next, and records offsets last; see
:meth:`EmbeddedIndex.commit`. A crash or a power loss between steps leaves the text and vector
stores ahead of SQLite for the ids the manifest names as pending; reopening forgets those ids'
content hashes so the replay re-embeds them, and replaying is otherwise harmless because the
ingest path orders every change by source position.

tantivy's own commit (0.27, ``MmapDirectory``) fsyncs each new segment file, fsyncs the
directory, then writes ``meta.json`` to a temporary file, fsyncs it and renames it over the old
one, but does not fsync the directory after that rename: a power loss could bring the previous
``meta.json`` back, so the commit step fsyncs ``text/`` itself.

One process owns the directory: tantivy's writer lock refuses a second writer.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime  # noqa: F401  # before usearch: the other order crashes (see tests/test_onnx_encoder.py)
import tantivy
from usearch.index import Index as VectorIndex

from autoglm.files import fsync_path, replace_durably, write_atomically
from search.protocol import Deletion, Document, Hit, StoredState, Upsert

_NON_WORD = re.compile(r"[^\w]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY,
    vector_key INTEGER NOT NULL UNIQUE,
    table_name TEXT NOT NULL,
    title TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    position TEXT NOT NULL,
    source_ts_ms INTEGER,
    content_hash TEXT,
    deleted INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_by_table ON documents (table_name, deleted);
"""


def plain_text_query(text: str) -> str:
    """Reduce a user's query to lower-case words so no character or AND/OR/NOT acts as query syntax."""
    return _NON_WORD.sub(" ", text).lower().strip()


class EmbeddedIndex:
    """Hybrid index on local files; safe to search from other threads while one thread writes."""

    def __init__(self, directory: Path, dimension: int = 384, hnsw_ef_search: int = 128):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dimension = dimension
        self._lock = threading.RLock()

        text_dir = self.directory / "text"
        text_dir.mkdir(exist_ok=True)
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw")
        builder.add_text_field("body", tokenizer_name="en_stem")
        self._text = tantivy.Index(builder.build(), path=str(text_dir), reuse=True)
        self._text_writer = self._text.writer(heap_size=64_000_000, num_threads=1)

        self._vectors_path = self.directory / "vectors.usearch"
        self._hnsw_ef_search = hnsw_ef_search
        self._vectors = self._load_vectors()

        self._db = sqlite3.connect(self.directory / "documents.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # NORMAL in WAL mode may lose the last commits on power loss
        self._db.executescript(_SCHEMA)
        self._next_vector_key = 1 + (self._db.execute(
            "SELECT COALESCE(MAX(vector_key), 0) FROM documents").fetchone()[0])

        self._manifest_path = self.directory / "manifest.json"
        self._manifest = self._read_manifest()
        self._pending_ids: set[str] = set()
        self._mend_pending()
        self._db.execute("BEGIN")

    # -- ingest side ---------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        found: dict[str, StoredState] = {}
        with self._lock:
            for chunk_start in range(0, len(ids), 500):
                chunk = list(ids[chunk_start:chunk_start + 500])
                rows = self._db.execute(
                    f"SELECT id, position, deleted, content_hash FROM documents "
                    f"WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                for doc_id, position, deleted, content_hash in rows:
                    found[doc_id] = StoredState(doc_id, tuple(json.loads(position)), bool(deleted),
                                                content_hash)
        return found

    def live_ids(self, table: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM documents WHERE table_name = ? AND deleted = 0", (table,)).fetchall()
        return [row[0] for row in rows]

    def write_batch(self, upserts: Sequence[Upsert], deletions: Sequence[Deletion]) -> None:
        now = time.time()
        with self._lock:
            keys = self._vector_keys([u.document.id for u in upserts] + [d.id for d in deletions])
            for upsert in upserts:
                doc = upsert.document
                key = keys.get(doc.id)
                if key is None:
                    key = keys[doc.id] = self._next_vector_key
                    self._next_vector_key += 1
                if upsert.vector is not None:
                    self._pending_ids.add(doc.id)
                    self._text_writer.delete_documents_by_term("id", doc.id)
                    self._text_writer.add_document(tantivy.Document(id=doc.id, body=doc.embedding_text))
                    self._vectors.remove(key)
                    self._vectors.add(key, np.asarray(upsert.vector, dtype=np.float32))
                self._db.execute(
                    "INSERT INTO documents (id, vector_key, table_name, title, text, metadata, position,"
                    " source_ts_ms, content_hash, deleted, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
                    " ON CONFLICT(id) DO UPDATE SET table_name=excluded.table_name, title=excluded.title,"
                    " text=excluded.text, metadata=excluded.metadata, position=excluded.position,"
                    " source_ts_ms=excluded.source_ts_ms, content_hash=excluded.content_hash, deleted=0,"
                    " updated_at=excluded.updated_at",
                    (doc.id, key, doc.table, doc.title, doc.text, json.dumps(doc.metadata, default=str),
                     json.dumps(list(doc.position)), doc.source_ts_ms, doc.content_hash, now))
            for deletion in deletions:
                key = keys.get(deletion.id)
                if key is None:
                    key = keys[deletion.id] = self._next_vector_key
                    self._next_vector_key += 1
                self._pending_ids.add(deletion.id)
                self._text_writer.delete_documents_by_term("id", deletion.id)
                self._vectors.remove(key)
                self._db.execute(
                    "INSERT INTO documents (id, vector_key, table_name, position, deleted, updated_at)"
                    " VALUES (?, ?, ?, ?, 1, ?)"
                    " ON CONFLICT(id) DO UPDATE SET title='', text='', metadata='{}', content_hash=NULL,"
                    " position=excluded.position, deleted=1, updated_at=excluded.updated_at",
                    (deletion.id, key, deletion.table, json.dumps(list(deletion.position)), now))

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Make the batch durable. Steps, in this order, each durable before the next starts:

        1. ``_mark_pending``: the manifest, offsets unchanged, names the ids whose text or vector
           this batch changes (skipped when there are none);
        2. ``_commit_text``: tantivy commit (atomic ``meta.json`` swap), fsync of ``text/``,
           then reload of the searcher;
        3. ``_commit_vectors``: save the HNSW graph to a temporary file, fsync it, rename it over
           the old one, fsync the directory;
        4. ``_commit_documents``: commit the SQLite transaction that holds documents, positions,
           content hashes and tombstones (WAL with synchronous=FULL: the WAL is fsynced);
        5. ``_commit_offsets``: the manifest with the new offsets and no pending ids (write,
           fsync, rename, fsync the directory).
        The caller commits the consumer offsets to Kafka only after this returns.
        A crash or power loss after step 1 and before step 5 can leave a pending id's text and
        vector newer than its SQLite row. Reopening (or ``rollback``) mends that: a live id's
        content hash is set to NULL, so the replay from the recorded offsets, or the sink's repair
        when nothing is replayed, re-embeds it and rewrites its text and vector even when its
        content equals the stored one (A -> B -> A would otherwise keep B's); a deleted or unknown
        id leaves the text and vector stores.
        """
        with self._lock:
            if self._pending_ids:
                self._mark_pending()
            self._commit_text()
            self._commit_vectors()
            self._commit_documents()
            self._commit_offsets(offsets)

    def _mark_pending(self) -> None:
        self._write_manifest({**self._manifest, "pending_ids": sorted(self._pending_ids)})

    def _commit_text(self) -> None:
        self._text_writer.commit()
        fsync_path(self.directory / "text")
        self._text.reload()

    def _commit_vectors(self) -> None:
        tmp = self._vectors_path.with_suffix(".tmp")
        self._vectors.save(str(tmp))
        fsync_path(tmp)
        replace_durably(tmp, self._vectors_path)

    def _commit_documents(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def _commit_offsets(self, offsets: Mapping[str, int]) -> None:
        merged = {**self.committed_offsets(), **offsets}
        self._write_manifest({"offsets": merged, "documents": self.count(), "committed_at": time.time(),
                              "pending_ids": []})
        self._pending_ids.clear()

    def committed_offsets(self) -> dict[str, int]:
        return dict(self._manifest.get("offsets", {}))

    def _read_manifest(self) -> dict:
        """The manifest on disk, read once at open: this process is its only writer."""
        if not self._manifest_path.exists():
            return {}
        return json.loads(self._manifest_path.read_text())

    def _write_manifest(self, manifest: dict) -> None:
        write_atomically(self._manifest_path, json.dumps(manifest, indent=1).encode())
        self._manifest = manifest

    def _mend_pending(self) -> None:
        """After a commit cut short (see ``commit``), the ids it named may have text and vectors
        newer than their rows. Live ones forget their content hash, so a replayed change, or the
        sink's repair (``ids_to_reembed``), re-embeds them; deleted or unknown ones leave the text
        and vector stores at once, so nothing of them stays searchable when no replay comes."""
        pending = self._manifest.get("pending_ids", [])
        if not pending:
            return
        rows: dict[str, tuple[int, int]] = {}
        for start in range(0, len(pending), 500):
            chunk = pending[start:start + 500]
            rows.update((doc_id, (key, deleted)) for doc_id, key, deleted in self._db.execute(
                f"SELECT id, vector_key, deleted FROM documents WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        live = [doc_id for doc_id in pending if doc_id in rows and not rows[doc_id][1]]
        gone = [doc_id for doc_id in pending if doc_id not in live]
        self._db.execute("BEGIN")
        for start in range(0, len(live), 500):
            chunk = live[start:start + 500]
            self._db.execute(
                f"UPDATE documents SET content_hash = NULL WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        self._db.execute("COMMIT")
        for doc_id in gone:
            self._text_writer.delete_documents_by_term("id", doc_id)
            if doc_id in rows:
                self._vectors.remove(rows[doc_id][0])
        if gone:
            self._commit_text()
            self._commit_vectors()

    def ids_to_reembed(self) -> list[str]:
        """Live documents whose text and vector this index cannot vouch for: those a commit cut
        short had named (their content hash was forgotten; every upsert stores one)."""
        with self._lock:
            return [row[0] for row in self._db.execute(
                "SELECT id FROM documents WHERE deleted = 0 AND content_hash IS NULL ORDER BY id")]

    # -- query side ----------------------------------------------------------------------

    def get(self, doc_id: str) -> Document | None:
        return self.get_many([doc_id]).get(doc_id)

    def get_many(self, ids: Sequence[str]) -> dict[str, Document]:
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                "SELECT id, table_name, title, text, metadata, position, source_ts_ms FROM documents"
                f" WHERE deleted = 0 AND id IN ({','.join('?' * len(ids))})", list(ids)).fetchall()
        return {row[0]: Document(id=row[0], table=row[1], title=row[2], text=row[3],
                                 metadata=json.loads(row[4]), position=tuple(json.loads(row[5])),
                                 source_ts_ms=row[6]) for row in rows}

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        with self._lock:
            keys = self._vector_keys(ids, live_only=True)
            return {doc_id: np.asarray(self._vectors.get(key), dtype=np.float32) for doc_id, key in keys.items()}

    def sample_vectors(self, limit: int, seed: int = 0) -> dict[str, np.ndarray]:
        with self._lock:
            rows = self._db.execute("SELECT id, vector_key FROM documents WHERE deleted = 0 ORDER BY id").fetchall()
            if len(rows) > limit:
                rows = [rows[i] for i in sorted(np.random.default_rng(seed).choice(len(rows), limit, replace=False))]
            if not rows:
                return {}
            vectors = np.asarray(self._vectors.get(np.array([key for _, key in rows], dtype=np.uint64)),
                                 dtype=np.float32)
            return {doc_id: vector for (doc_id, _), vector in zip(rows, vectors)}

    def search_text(self, query: str, k: int) -> list[Hit]:
        words = plain_text_query(query)
        if not words:
            return []
        with self._lock:
            searcher = self._text.searcher()
            parsed = self._text.parse_query(words, ["body"])
            result = searcher.search(parsed, k)
            return [Hit(searcher.doc(address)["id"][0], float(score)) for score, address in result.hits]

    def search_vector(self, vector: np.ndarray, k: int) -> list[Hit]:
        with self._lock:
            if len(self._vectors) == 0:
                return []
            matches = self._vectors.search(np.asarray(vector, dtype=np.float32), k)
            keys = [int(key) for key in matches.keys]
            if not keys:
                return []
            rows = dict(self._db.execute(
                f"SELECT vector_key, id FROM documents WHERE deleted = 0 AND vector_key IN "
                f"({','.join('?' * len(keys))})", keys).fetchall())
        return [Hit(rows[key], 1.0 - float(distance))
                for key, distance in zip(keys, matches.distances) if key in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM documents WHERE deleted = 0").fetchone()[0]

    def rollback(self) -> None:
        """Back to the last commit: tantivy's and SQLite's open transactions are dropped and the
        vectors reread from their file. A commit that failed after its first step is mended as on
        reopen (``_mend_pending``), since the stores it reached keep its writes."""
        with self._lock:
            self._text_writer.rollback()
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._vectors = self._load_vectors()
            self._pending_ids.clear()
            try:
                self._mend_pending()  # may fail again (the disk still full): the next rollback or reopen retries
            finally:
                if not self._db.in_transaction:
                    self._db.execute("BEGIN")

    def is_unavailable(self, exc: BaseException) -> bool:
        """The disk or the database file failing (full, read-only, locked), not a record."""
        return isinstance(exc, (OSError, sqlite3.OperationalError))

    def close(self) -> None:
        """Drop what is not committed and release the files (tantivy's writer lock included)."""
        with self._lock:
            try:
                if self._db.in_transaction:  # SQLite may have rolled back by itself after a failed COMMIT
                    self._db.execute("ROLLBACK")
                self._db.close()
            finally:
                self._text_writer.rollback()
                del self._text_writer

    def _load_vectors(self) -> VectorIndex:
        vectors = VectorIndex(ndim=self.dimension, metric="cos", dtype="f32", expansion_search=self._hnsw_ef_search)
        if self._vectors_path.exists():
            vectors.load(str(self._vectors_path))
        return vectors

    def _vector_keys(self, ids: Sequence[str], live_only: bool = False) -> dict[str, int]:
        keys: dict[str, int] = {}
        live = " AND deleted = 0" if live_only else ""
        for start in range(0, len(ids), 500):
            chunk = list(ids[start:start + 500])
            keys.update(self._db.execute(
                f"SELECT id, vector_key FROM documents WHERE id IN ({','.join('?' * len(chunk))}){live}",
                chunk).fetchall())
        return keys
