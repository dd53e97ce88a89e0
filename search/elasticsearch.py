"""The Elasticsearch backend of the index protocol (search/protocol.py), for production.

Layout: documents live in a concrete index (``<name>-<timestamp>``) behind the alias ``<name>``,
so ``reindex`` can build a new index and swap the alias atomically. Consumer offsets live in
``<name>-offsets``, one document per backend instance.

Ordering is enforced by Elasticsearch itself as well as by the ingest sink: every write carries
``version`` = the source position as an integer (``position_version``) with
``version_type=external_gte``, so an older write is refused (409, counted as stale, not retried).
A delete is written as a tombstone document (``deleted: true``) rather than removed, because an
external-version delete is forgotten after ``index.gc_deletes`` and a late, older upsert could
then resurrect the row. Every query filters tombstones out.

Commit protocol (``write_batch`` buffers, ``commit`` does the work, in this order):
1. bulk-write the buffered actions, retrying transport errors and 429s with backoff; version
   conflicts are stale writes and ignored; items refused for good (other 4xx, e.g. a mapping
   error) raise ``RefusedChanges`` and any other item failure ``BulkWriteFailed``, both before
   step 3, so the batch's offsets are not recorded (the caller dead-letters refused changes and
   commits again without them);
2. refresh the documents index if the refresh policy asks for it (``wait_for`` / ``true``);
3. write the offsets document with ``refresh=wait_for``.
The caller commits Kafka offsets only after this returns.

No Elasticsearch server can run on the development machines: the conformance suite runs against
one when ``AUTOGLM_ES_URL`` is set; the request bodies are unit-tested without a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from autoglm.settings import FusionWeights
from search.fusion import reciprocal_rank_fusion
from search.protocol import Deletion, Document, Hit, RefusedChanges, StoredState, Upsert

log = logging.getLogger(__name__)

DIMENSION = 384
STALE_WRITE = 409  # version_conflict_engine_exception: an older change than the stored one


class BulkWriteFailed(RuntimeError):
    """Some bulk items failed for another reason than being stale; the batch is not committed."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        super().__init__(f"{len(failures)} bulk items failed, first: {json.dumps(failures[0])[:500]}")


def position_version(position: Sequence) -> int:
    """The source position as Elasticsearch's external version: a non-negative int64 that never
    decreases along one kind's order (see ``autoglm.events.source_position``), so ``external_gte``
    never refuses a newer change. Equal versions are accepted, so a version may be coarser than
    its position and the ingest sink, which compares whole positions, orders the ties.

    Exact (strictly increasing) for: ``lsn`` and ``oracle`` (commit SCN); ``mongo`` up to the
    year 2106 and 2**31 ops a second; ``binlog`` up to file number 2**19, pos 2**32 and 4095
    rows an event. Coarser by design: ``pg`` keeps the last commit LSN only, ``sqlserver`` the
    commit LSN's VLF and block (not its slot, change LSN or serial), ``ts_ms`` the millisecond
    (not the Kafka offset). A field beyond its width saturates the rest, keeping the order.
    The kinds of one table never mix, so their ranges need not be comparable."""
    kind = position[0]
    if kind in ("lsn", "ts_ms", "pg", "oracle"):
        return int(position[1])
    if kind == "binlog":
        _, file, offset, row = position
        suffix = str(file).rsplit(".", 1)[-1]
        file_number = int(suffix) if "." in str(file) and suffix.isascii() and suffix.isdigit() else 0
        return _saturating_pack((file_number, 19), (int(offset), 32), (int(row), 12))
    if kind == "sqlserver":
        commit_lsn = int(position[1])  # 32-bit VLF, 32-bit block, 16-bit slot
        return _saturating_pack((commit_lsn >> 48, 32), ((commit_lsn >> 16) & 0xFFFF_FFFF, 31))
    if kind == "mongo":
        return _saturating_pack((int(position[1]), 32), (int(position[2]), 31))
    raise ValueError(f"unknown position kind {kind!r}")


def _saturating_pack(*fields: tuple[int, int]) -> int:
    """Concatenate (value, bits) fields, most significant first. A value wider than its field
    fills it and every later field with ones, so the result stays monotone in the fields' order."""
    packed, saturated = 0, False
    for value, bits in fields:
        full = (1 << bits) - 1
        saturated = saturated or value > full
        packed = (packed << bits) | (full if saturated else value)
    return packed


def index_settings(refresh_interval: str = "1s") -> dict:
    """Settings and mappings of the documents index: English BM25 text, 384-d cosine HNSW vectors."""
    return {
        "settings": {"index": {"refresh_interval": refresh_interval, "number_of_replicas": 0}},
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "id": {"type": "keyword"},
                "table": {"type": "keyword"},
                "title": {"type": "text", "analyzer": "english"},
                "text": {"type": "text", "analyzer": "english"},
                "metadata": {"type": "object", "enabled": False},
                "position": {"type": "keyword", "index": False},
                "source_ts_ms": {"type": "long"},
                "content_hash": {"type": "keyword"},
                "deleted": {"type": "boolean"},
                "updated_at": {"type": "date", "format": "epoch_millis"},
                "vector": {"type": "dense_vector", "dims": DIMENSION, "index": True, "similarity": "cosine",
                           "index_options": {"type": "hnsw", "m": 16, "ef_construction": 100}},
            },
        },
    }


def bulk_actions(index: str, upserts: Sequence[Upsert], deletions: Sequence[Deletion],
                 stored_vectors: Mapping[str, list[float]], now_ms: int) -> list[dict]:
    """Bulk actions with external versions; an upsert without a vector reuses ``stored_vectors``."""
    actions = []
    for upsert in upserts:
        document = upsert.document
        vector = upsert.vector if upsert.vector is not None else stored_vectors.get(document.id)
        source = {"id": document.id, "table": document.table, "title": document.title, "text": document.text,
                  "metadata": document.metadata, "position": json.dumps(list(document.position)),
                  "source_ts_ms": document.source_ts_ms, "content_hash": document.content_hash,
                  "deleted": False, "updated_at": now_ms}
        if vector is not None:
            source["vector"] = [float(x) for x in np.asarray(vector, dtype=np.float32)]
        actions.append({"_op_type": "index", "_index": index, "_id": document.id,
                        "version": position_version(document.position), "version_type": "external_gte",
                        "_source": source})
    for deletion in deletions:
        actions.append({"_op_type": "index", "_index": index, "_id": deletion.id,
                        "version": position_version(deletion.position), "version_type": "external_gte",
                        "_source": {"id": deletion.id, "table": deletion.table, "title": "", "text": "",
                                    "metadata": {}, "position": json.dumps(list(deletion.position)),
                                    "source_ts_ms": deletion.source_ts_ms, "content_hash": None,
                                    "deleted": True, "updated_at": now_ms}})
    return actions


LIVE = {"term": {"deleted": False}}


def text_query(query: str, k: int) -> dict:
    """BM25 over title and text. ``multi_match`` analyses the text as words: no query syntax."""
    return {"size": k, "_source": False, "fields": ["id"],
            "query": {"bool": {"must": {"multi_match": {"query": query, "fields": ["title", "text"],
                                                        "type": "most_fields"}},
                               "filter": [LIVE]}}}


def knn_query(vector: Sequence[float], k: int, num_candidates: int = 100) -> dict:
    return {"size": k, "_source": False, "fields": ["id"],
            "knn": {"field": "vector", "query_vector": [float(x) for x in vector], "k": k,
                    "num_candidates": max(num_candidates, k), "filter": LIVE}}


def rrf_query(query: str, vector: Sequence[float], k: int, rrf_k: int = 60, window: int = 100) -> dict:
    """Hybrid search as one request: the RRF retriever (Elasticsearch >= 8.16) over BM25 and kNN."""
    return {"size": k, "_source": False, "fields": ["id"],
            "retriever": {"rrf": {"retrievers": [
                {"standard": {"query": text_query(query, window)["query"]}},
                {"knn": {"field": "vector", "query_vector": [float(x) for x in vector], "k": window,
                         "num_candidates": max(window, 100), "filter": LIVE}},
            ], "rank_constant": rrf_k, "rank_window_size": window}}}


def index_name_for(location: str) -> str:
    """An index name (lowercase, no path characters) for a location such as a data dir."""
    return "autoglm-" + hashlib.sha256(str(location).encode()).hexdigest()[:12]


class ElasticsearchIndex:
    dimension = DIMENSION

    def __init__(self, url: str, name: str = "autoglm-documents", refresh: str = "wait_for",
                 client: Any = None):
        """``refresh``: "wait_for" (a commit returns once searchable), "true", or "false" (the
        index's refresh_interval decides: more throughput, less freshness)."""
        from elasticsearch import Elasticsearch

        self.client = client or Elasticsearch(url, retry_on_timeout=True, max_retries=5,
                                              request_timeout=30)
        self.alias, self.refresh = name, refresh
        self.offsets_index = f"{name}-offsets"
        self.server_rrf = True  # until the cluster refuses the RRF retriever
        self._pending: tuple[list[Upsert], list[Deletion]] = ([], [])
        self._ensure_indices()

    # -- setup -----------------------------------------------------------------------------

    def _ensure_indices(self) -> None:
        if not self.client.indices.exists_alias(name=self.alias):
            concrete = f"{self.alias}-{time.strftime('%Y%m%d%H%M%S')}"
            self.client.indices.create(index=concrete, **index_settings(),
                                       aliases={self.alias: {"is_write_index": True}})
        if not self.client.indices.exists(index=self.offsets_index):
            self.client.indices.create(index=self.offsets_index,
                                       mappings={"dynamic": False, "properties": {}})

    def reindex(self) -> str:
        """Copy every document (tombstones and versions included) into a new index with the
        current settings and mappings, then point the alias at it in one atomic step."""
        old = list(self.client.indices.get_alias(name=self.alias))
        new = f"{self.alias}-{time.strftime('%Y%m%d%H%M%S')}-r"
        self.client.indices.create(index=new, **index_settings())
        self.client.reindex(source={"index": self.alias}, dest={"index": new, "version_type": "external_gte"},
                            wait_for_completion=True, refresh=True)
        self.client.indices.update_aliases(actions=[
            *({"remove": {"index": index, "alias": self.alias}} for index in old),
            {"add": {"index": new, "alias": self.alias, "is_write_index": True}}])
        return new

    # -- write side ------------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        if not ids:
            return {}
        found = self.client.mget(index=self.alias, ids=list(ids),
                                 source_includes=["position", "deleted", "content_hash"])["docs"]
        return {hit["_id"]: StoredState(hit["_id"], tuple(json.loads(hit["_source"]["position"])),
                                        hit["_source"]["deleted"], hit["_source"].get("content_hash"))
                for hit in found if hit.get("found")}

    def live_ids(self, table: str) -> list[str]:
        from elasticsearch.helpers import scan

        query = {"query": {"bool": {"filter": [LIVE, {"term": {"table": table}}]}}, "_source": False}
        return [hit["_id"] for hit in scan(self.client, index=self.alias, query=query)]

    def write_batch(self, upserts: Sequence[Upsert], deletions: Sequence[Deletion]) -> None:
        self._pending[0].extend(upserts)
        self._pending[1].extend(deletions)

    def commit(self, offsets: Mapping[str, int]) -> None:
        from elasticsearch.helpers import streaming_bulk

        upserts, deletions = self._pending
        reuse = [u.document.id for u in upserts if u.vector is None]
        stored = self._stored_vectors(reuse)
        actions = bulk_actions(self.alias, upserts, deletions, stored, int(time.time() * 1000))
        refused, failures = {}, []
        for ok, item in streaming_bulk(self.client, actions, raise_on_error=False, raise_on_exception=True,
                                       max_retries=5, initial_backoff=0.5, max_backoff=10):
            result = next(iter(item.values()))
            status = result.get("status", 0)
            if ok or status == STALE_WRITE:
                continue
            if 400 <= status < 500 and status != 429:
                refused[result.get("_id")] = json.dumps(result.get("error"))[:1000]
            else:
                failures.append(result)
        if failures:
            raise BulkWriteFailed(failures)  # transient: the caller rolls back and applies the batch again
        self._pending = ([], [])
        if refused:
            raise RefusedChanges(refused)
        if self.refresh in ("true", "wait_for"):
            self.client.indices.refresh(index=self.alias)
        merged = {**self.committed_offsets(), **offsets}
        self.client.index(index=self.offsets_index, id="offsets", document={"offsets": merged},
                          refresh="wait_for")

    def rollback(self) -> None:
        """Writes wait in ``_pending`` until ``commit`` sends them: dropping those is the rollback."""
        self._pending = ([], [])

    def ids_to_reembed(self) -> list[str]:
        """Text, vector and row are one Elasticsearch document, written at once: none to repair."""
        return []

    def is_unavailable(self, exc: BaseException) -> bool:
        """The cluster unreachable, overloaded or failing (transport errors, 408, 429, 5xx, bulk
        items failing that way), not a document it refuses."""
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        if isinstance(exc, ApiError):
            return exc.status_code in (408, 429) or exc.status_code >= 500
        return isinstance(exc, (TransportError, BulkWriteFailed, OSError))

    def committed_offsets(self) -> dict[str, int]:
        found = self.client.options(ignore_status=404).get(index=self.offsets_index, id="offsets").body
        return dict(found["_source"]["offsets"]) if found.get("found") else {}

    # -- read side -------------------------------------------------------------------------

    def get(self, doc_id: str) -> Document | None:
        return self.get_many([doc_id]).get(doc_id)

    def get_many(self, ids: Sequence[str]) -> dict[str, Document]:
        if not ids:
            return {}
        found = self.client.mget(index=self.alias, ids=list(ids), source_excludes=["vector"])["docs"]
        return {hit["_id"]: _document(hit["_source"]) for hit in found
                if hit.get("found") and not hit["_source"]["deleted"]}

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        return {doc_id: np.asarray(vector, dtype=np.float32) for doc_id, vector in self._stored_vectors(ids).items()}

    def sample_vectors(self, limit: int, seed: int = 0) -> dict[str, np.ndarray]:
        body = {"size": limit, "_source": ["vector"],
                "query": {"function_score": {"query": {"bool": {"filter": [LIVE]}},
                                             "random_score": {"seed": seed, "field": "_seq_no"}}}}
        hits = self.client.search(index=self.alias, **body)["hits"]["hits"]
        return {hit["_id"]: np.asarray(hit["_source"]["vector"], dtype=np.float32)
                for hit in hits if "vector" in hit["_source"]}

    def search_text(self, query: str, k: int) -> list[Hit]:
        if not query.strip():
            return []
        return self._hits(self.client.search(index=self.alias, **text_query(query, k)))

    def search_vector(self, vector: np.ndarray, k: int) -> list[Hit]:
        return self._hits(self.client.search(index=self.alias, **knn_query(vector, k)))

    def search_hybrid(self, query: str, vector: np.ndarray, k: int, weights: FusionWeights, rrf_k: int,
                      window: int) -> list[Hit]:
        """One request to the RRF retriever when the cluster serves it (and weights are equal:
        the retriever has none); otherwise, or once it refused (a basic licence, a cluster older
        than 8.16), reciprocal rank fusion here over a BM25 and a kNN request."""
        from elasticsearch import ApiError

        if self.server_rrf and weights.bm25 == weights.dense and query.strip():
            try:
                return self._hits(self.client.search(index=self.alias, **rrf_query(query, vector, k, rrf_k, window)))
            except ApiError as exc:
                if exc.meta.status not in (400, 403):
                    raise
                self.server_rrf = False
                log.warning("the cluster refused the RRF retriever (%s); fusing results here from now on", exc)
        return reciprocal_rank_fusion([self.search_text(query, window), self.search_vector(vector, window)],
                                      [weights.bm25, weights.dense], k=rrf_k, limit=k)

    def count(self) -> int:
        return int(self.client.count(index=self.alias, query={"bool": {"filter": [LIVE]}})["count"])

    def close(self) -> None:
        self.client.close()

    def _stored_vectors(self, ids: Sequence[str]) -> dict[str, list[float]]:
        if not ids:
            return {}
        found = self.client.mget(index=self.alias, ids=list(ids), source_includes=["vector", "deleted"])["docs"]
        return {hit["_id"]: hit["_source"]["vector"] for hit in found
                if hit.get("found") and not hit["_source"]["deleted"] and "vector" in hit["_source"]}

    @staticmethod
    def _hits(response: dict) -> list[Hit]:
        return [Hit(hit["_id"], float(hit["_score"])) for hit in response["hits"]["hits"]]


def _document(source: dict) -> Document:
    return Document(id=source["id"], table=source["table"], title=source["title"], text=source["text"],
                    metadata=source.get("metadata") or {}, position=tuple(json.loads(source["position"])),
                    source_ts_ms=source.get("source_ts_ms"))
