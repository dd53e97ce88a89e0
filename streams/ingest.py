"""The ingest sink: turns a batch of parsed changes into one durable index commit.

It owns the ingest commit protocol. For each batch, in this order:

1. order: keep, per document id, only a change newer (by source position) than both the
   other changes to that id in the batch and what the index stores, tombstones included;
2. embed: encode the documents whose title or text changed; others keep their vector;
3. apply the batch to the index stores;
4. make them durable and record the consumer offsets (``Index.commit``).
The caller acks the batch's Kafka records only after ``apply`` returns, and Kafka offsets are
committed from those acks. A crash anywhere replays records whose effect is idempotent; a
failure raised anywhere rolls the index back to its last commit first (``Index.rollback``), so
the caller can apply the batch again, or in parts, on a clean slate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

from autoglm import metrics
from autoglm.encoder import Encoder
from autoglm.events import Op, Position, is_newer
from search.protocol import Deletion, Document, Index, Upsert


REPAIR_BATCH = 64  # documents re-embedded per commit by ``IngestSink.repair``


@dataclass(frozen=True)
class Truncate:
    table: str
    position: Position
    source_ts_ms: int | None = None


Change = Union[Document, Deletion, Truncate]


def change_op(change: Change) -> str:
    if isinstance(change, Document):
        return "upsert"
    return "delete" if isinstance(change, Deletion) else Op.TRUNCATE.name.lower()


@dataclass
class BatchReport:
    applied: int = 0
    stale: int = 0
    duplicate: int = 0
    embedded: int = 0
    reused_vectors: int = 0
    commit_seconds: float = 0.0
    applied_source_ts_ms: list[int] = field(default_factory=list)


class IngestSink:
    def __init__(self, index: Index, encoder: Encoder):
        self.index = index
        self.encoder = encoder

    def apply(self, changes: Sequence[Change], offsets: Mapping[str, int]) -> BatchReport:
        """Apply the changes in order and commit them with the offsets, or roll back and raise;
        see the module docstring."""
        try:
            return self._apply(changes, offsets)
        except BaseException:
            self.index.rollback()
            raise

    def repair(self) -> int:
        """Re-embed, from their stored rows, the documents the index cannot vouch for (a commit cut
        short, when no replay brings them again: ``Index.ids_to_reembed``); run before reading any
        change. Returns how many were repaired."""
        ids = self.index.ids_to_reembed()
        try:
            for start in range(0, len(ids), REPAIR_BATCH):
                documents = list(self.index.get_many(ids[start:start + REPAIR_BATCH]).values())
                vectors = self.encoder.embed([doc.embedding_text for doc in documents])
                self.index.write_batch([Upsert(doc, vector) for doc, vector in zip(documents, vectors)], [])
                self.index.commit({})
        except BaseException:
            self.index.rollback()
            raise
        return len(ids)

    def _apply(self, changes: Sequence[Change], offsets: Mapping[str, int]) -> BatchReport:
        report = BatchReport()
        segment: list[Document | Deletion] = []
        for change in changes:
            if isinstance(change, Truncate):
                self._write(segment, report)
                segment = []
                live = self.index.live_ids(change.table)
                self._write([Deletion(doc_id, change.table, change.position) for doc_id in live],
                            report, count=False)
                report.applied += 1
                metrics.EVENTS.labels("truncate", "applied").inc()
            else:
                segment.append(change)
        self._write(segment, report)

        started = time.perf_counter()
        self.index.commit(offsets)
        report.commit_seconds = time.perf_counter() - started
        committed_ms = time.time() * 1000
        metrics.COMMIT_SECONDS.observe(report.commit_seconds)
        metrics.BATCH_SIZE.observe(len(changes))
        metrics.DOCUMENTS.set(self.index.count())
        for ts_ms in report.applied_source_ts_ms:
            metrics.FRESHNESS_SECONDS.observe(max(0.0, committed_ms - ts_ms) / 1000)
        return report

    def _write(self, changes: Sequence[Document | Deletion], report: BatchReport, count: bool = True) -> None:
        """Order, embed and write one run of upserts and deletions (no truncate inside)."""
        if not changes:
            return
        newest: dict[str, Document | Deletion] = {}
        for change in changes:
            previous = newest.get(change.id)
            if previous is None or is_newer(change.position, previous.position):
                newest[change.id] = change
                if previous is not None and count:
                    metrics.EVENTS.labels(change_op(previous), "stale").inc()
                    report.stale += 1
            elif count:
                _count_skipped(change, previous.position, report)

        stored = self.index.states(list(newest))
        upserts: list[Document] = []
        deletions: list[Deletion] = []
        for doc_id, change in newest.items():
            state = stored.get(doc_id)
            if state is not None and not is_newer(change.position, state.position):
                if count:
                    _count_skipped(change, state.position, report)
                continue
            (upserts if isinstance(change, Document) else deletions).append(change)

        to_embed = [doc for doc in upserts
                    if not (stored.get(doc.id) and not stored[doc.id].deleted
                            and stored[doc.id].content_hash == doc.content_hash)]
        vectors = dict(zip((doc.id for doc in to_embed),
                           self.encoder.embed([doc.embedding_text for doc in to_embed])))
        report.embedded += len(to_embed)
        report.reused_vectors += len(upserts) - len(to_embed)
        metrics.EMBEDDED.inc(len(to_embed))
        metrics.VECTORS_REUSED.inc(len(upserts) - len(to_embed))

        self.index.write_batch([Upsert(doc, vectors.get(doc.id)) for doc in upserts], deletions)
        if count:
            for change in (*upserts, *deletions):
                metrics.EVENTS.labels(change_op(change), "applied").inc()
                if change.source_ts_ms is not None:
                    report.applied_source_ts_ms.append(change.source_ts_ms)
            report.applied += len(upserts) + len(deletions)


def _count_skipped(change: Document | Deletion, newer_or_equal: Position, report: BatchReport) -> None:
    """A change not applied: a duplicate when it repeats the stored position, else stale."""
    outcome = "duplicate" if change.position == newer_or_equal else "stale"
    metrics.EVENTS.labels(change_op(change), outcome).inc()
    setattr(report, outcome, getattr(report, outcome) + 1)
