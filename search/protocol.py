"""The index boundary: what a backend must do, and the values that cross it.

A backend stores documents for BM25 and vector search plus, per document id, the
source position of the last change applied to it. Deletes leave a tombstone with
their position so that a late, older upsert can be recognised as stale.

Contract, checked by ``tests/conformance.py`` for every backend:
- ``write_batch`` applies upserts and deletions; they are searchable and durable once
  ``commit`` returns (a backend may make them visible earlier, never later);
- ``commit`` records the consumer offsets together with the data, so that
  ``committed_offsets`` after a restart names the first record not yet applied;
- an upsert whose ``vector`` is None keeps the document's stored vector;
- ids of deleted documents are never returned by ``get`` or by searches;
- ``commit`` may raise ``RefusedChanges`` for items the backend refuses for good (a document
  its mapping rejects, say): the other items are applied, but no offsets are recorded, so the
  caller can dead-letter the refused ones and commit the batch again without them;
- ``rollback`` drops every write since the last commit, so a batch that failed half-way can be
  applied again, or in parts, from what is durable;
- ``is_unavailable`` tells a failure of the backend's store (disk, cluster, network: retried)
  from one a record caused (dead-lettered).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from autoglm.events import Position


@dataclass(frozen=True)
class Document:
    id: str  # "<schema>.<table>:<primary key>"
    table: str
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    position: Position = ("ts_ms", 0)
    source_ts_ms: int | None = None

    @property
    def content_hash(self) -> str:
        """Identifies what the vector is computed from: equal hashes share a vector."""
        return hashlib.sha256(f"{self.title}\x00{self.text}".encode()).hexdigest()

    @property
    def embedding_text(self) -> str:
        return f"{self.title} {self.text}".strip()


@dataclass(frozen=True)
class Upsert:
    document: Document
    vector: np.ndarray | None  # None: keep the stored vector (title and text unchanged)


@dataclass(frozen=True)
class Deletion:
    id: str
    table: str
    position: Position
    source_ts_ms: int | None = None


@dataclass(frozen=True)
class StoredState:
    """What the ingest path needs to know about a stored id to order changes against it."""

    id: str
    position: Position
    deleted: bool
    content_hash: str | None


class RefusedChanges(Exception):
    """Some changes of a batch were refused for good: doc id -> the backend's reason."""

    def __init__(self, reasons: Mapping[str, str]):
        self.reasons = dict(reasons)
        super().__init__(f"{len(self.reasons)} changes refused, e.g. {next(iter(self.reasons.items()), '')}")


@dataclass(frozen=True)
class Hit:
    id: str
    score: float


class Index(Protocol):
    dimension: int

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        """Stored position and tombstone flag of each known id (live or deleted)."""

    def live_ids(self, table: str) -> list[str]:
        """Ids of the documents of one table that are not deleted (for truncate)."""

    def write_batch(self, upserts: Sequence[Upsert], deletions: Sequence[Deletion]) -> None:
        """Apply a batch; a given id appears at most once in it."""

    def commit(self, offsets: Mapping[str, int]) -> None:
        """Make every write so far durable and searchable, with the offsets ("topic:partition" ->
        next offset to read) recorded atomically after the data."""

    def rollback(self) -> None:
        """Drop the writes since the last commit (after a failed ``write_batch`` or ``commit``)."""

    def is_unavailable(self, exc: BaseException) -> bool:
        """True when ``exc`` is this backend's store failing, which a retry may cure."""

    def ids_to_reembed(self) -> list[str]:
        """Live documents whose text or vector may not match their stored row (a commit cut
        short); ``IngestSink.repair`` re-embeds them from the row."""

    def committed_offsets(self) -> dict[str, int]:
        ...

    def get(self, doc_id: str) -> Document | None:
        ...

    def get_many(self, ids: Sequence[str]) -> dict[str, Document]:
        ...

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors of live documents (the trainer's frozen document side)."""

    def sample_vectors(self, limit: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Vectors of ``limit`` live documents drawn at random (all of them when fewer exist);
        the same seed and contents give the same sample. The trainer's corpus-wide negatives."""

    def search_text(self, query: str, k: int) -> list[Hit]:
        """BM25 over title and text; the query is plain text (no query syntax)."""

    def search_vector(self, vector: np.ndarray, k: int) -> list[Hit]:
        """Nearest documents by cosine similarity; score is the similarity."""

    def count(self) -> int:
        """Number of live documents."""

    def close(self) -> None:
        ...
