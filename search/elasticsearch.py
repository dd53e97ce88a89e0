"""The Elasticsearch backend of the index protocol (search/protocol.py), for production.

Layout: documents live in a concrete index (``<name>-000001`` at first, so processes that start
at once agree on it) behind the alias ``<name>``, so ``reindex`` can build a new index and swap
the alias atomically. Consumer offsets live in ``<name>-offsets``, one document per
"topic:partition" (id = that key, body ``{key, offset}``), so workers owning different
partitions never write the same document.

Several writers may write one id at once (a worker revoked by a rebalance still flushing its last
batch while the new owner writes). Every write is a compare-and-set on Elasticsearch's
``_seq_no``/``_primary_term``: ``states`` remembers them for each id it reads (or that the id is
absent), and ``commit`` writes with ``if_seq_no``/``if_primary_term`` (``create`` for an absent
id; an id written without a ``states`` read first, such as a truncate's deletions, is read in
``commit``). A 409 means another writer wrote that id since the read: it is read again and
decided by the source order (``autoglm.events.is_newer``, which also orders positions of
different kinds): a stored change newer or equal makes ours stale (dropped), an older one is
overwritten with the fresh ``_seq_no``; a few rounds at most, then the commit fails as transient.
Elasticsearch's own versions play no part: they would map every kind of position onto one number.
A delete is written as a tombstone document (``deleted: true``, with its position) rather than
removed: Elasticsearch forgets a delete (after ``index.gc_deletes``), the tombstone keeps the
order, so a late, older upsert cannot resurrect the row. Every query filters tombstones out.

Commit protocol (``write_batch`` buffers, ``commit`` does the work, in this order):
1. bulk-write the buffered documents as above, retrying transport errors and 429s with backoff,
   with the refresh policy on the bulk request (``wait_for``: returns once the next scheduled
   refresh made them searchable; ``true``: refreshes at once; ``false``: the index's
   refresh_interval decides); items refused for good (other 4xx, e.g. a mapping error) raise
   ``RefusedChanges`` and any other item failure ``BulkWriteFailed``, both before step 2, so the
   batch's offsets are not recorded (the caller dead-letters refused changes and commits again
   without them);
2. write the offset documents that changed, compare-and-set as well: on a conflict the offset
   is read again and the larger one kept (a stale writer never moves an offset back; a writer
   whose read is current may, as a worker re-reading a reset partition does).
The caller commits Kafka offsets only after this returns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from autoglm.events import is_newer
from autoglm.settings import FusionWeights
from search.fusion import reciprocal_rank_fusion
from search.protocol import Deletion, Document, Hit, RefusedChanges, StoredState, Upsert

log = logging.getLogger(__name__)

DIMENSION = 384
CONFLICT = 409  # version_conflict_engine_exception: another writer wrote the id since we read it
CONFLICT_ROUNDS = 5  # re-read and retry at most this often before the commit fails as transient
REFRESH_ON_BULK = {"wait_for": "wait_for", "true": "true", "false": None}

Token = tuple[int, int]  # (_seq_no, _primary_term) of the version read; None: the id is absent


class BulkWriteFailed(RuntimeError):
    """Some writes failed for another reason than being stale; the batch is not committed."""

    def __init__(self, failures: list[dict]):
        self.failures = failures
        super().__init__(f"{len(failures)} bulk items failed, first: {json.dumps(failures[0])[:500]}")


class Stored(NamedTuple):
    """One id as read: the version to compare-and-set against, its state, its vector if asked for."""

    token: Token | None
    state: StoredState | None
    vector: list[float] | None = None


class BulkResult(NamedTuple):
    written: dict[str, Token]
    conflicted: list[str]
    refused: dict[str, str]
    failures: list[dict]


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


OFFSETS_MAPPINGS = {"dynamic": "strict", "properties": {"key": {"type": "keyword"}, "offset": {"type": "long"}}}


def document_source(change: Upsert | Deletion, vector: Sequence[float] | None, now_ms: int) -> dict:
    """The stored body of an upsert (with ``vector``, if any) or of a deletion's tombstone."""
    if isinstance(change, Deletion):
        return {"id": change.id, "table": change.table, "title": "", "text": "", "metadata": {},
                "position": json.dumps(list(change.position)), "source_ts_ms": change.source_ts_ms,
                "content_hash": None, "deleted": True, "updated_at": now_ms}
    document = change.document
    source = {"id": document.id, "table": document.table, "title": document.title, "text": document.text,
              "metadata": document.metadata, "position": json.dumps(list(document.position)),
              "source_ts_ms": document.source_ts_ms, "content_hash": document.content_hash,
              "deleted": False, "updated_at": now_ms}
    if vector is not None:
        source["vector"] = [float(x) for x in np.asarray(vector, dtype=np.float32)]
    return source


def write_action(index: str, doc_id: str, source: dict, token: Token | None) -> dict:
    """A bulk action that succeeds only if the id is still as read: the version ``token`` names,
    or absent (``create``) when it is None; otherwise the item fails with a 409."""
    if token is None:
        return {"_op_type": "create", "_index": index, "_id": doc_id, "_source": source}
    return {"_op_type": "index", "_index": index, "_id": doc_id, "if_seq_no": token[0],
            "if_primary_term": token[1], "_source": source}


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

        if refresh not in REFRESH_ON_BULK:
            raise ValueError(f"refresh must be one of {sorted(REFRESH_ON_BULK)}, got {refresh!r}")
        self.client = client or Elasticsearch(url, retry_on_timeout=True, max_retries=5,
                                              request_timeout=30)
        self.alias, self.refresh = name, refresh
        self.offsets_index = f"{name}-offsets"
        self.server_rrf = True  # until the cluster refuses the RRF retriever
        self._pending: dict[str, Upsert | Deletion] = {}  # by id: the last write since the last commit
        self._tokens: dict[str, Token | None] = {}  # ids read since the last commit: the version seen
        self._offsets: dict[str, tuple[int, Token | None]] = {}  # key -> (offset, token) as last read or written
        self._ensure_indices()

    # -- setup -----------------------------------------------------------------------------

    def _ensure_indices(self) -> None:
        """Create the first documents index with its alias, and the offsets index, unless they
        exist; several processes starting at once all succeed and agree on the same indices."""
        if not self.client.indices.exists_alias(name=self.alias):
            self._create_index(f"{self.alias}-000001", **index_settings(),
                               aliases={self.alias: {"is_write_index": True}})
        self._create_index(self.offsets_index, mappings=OFFSETS_MAPPINGS,
                           settings={"index": {"number_of_replicas": 0}})

    def _create_index(self, index: str, **body) -> None:
        from elasticsearch import BadRequestError

        try:
            self.client.indices.create(index=index, **body)
        except BadRequestError as exc:
            if exc.error != "resource_already_exists_exception":  # another process made it first
                raise

    def reindex(self) -> str:
        """Copy every document (tombstones included) into a new index with the current settings
        and mappings, then point the alias at it in one atomic step. Writes between the copy and
        the swap are not copied: stop the ingest workers first."""
        old = list(self.client.indices.get_alias(name=self.alias))
        new = f"{self.alias}-{time.strftime('%Y%m%d%H%M%S')}-r"
        self.client.indices.create(index=new, **index_settings())
        self.client.reindex(source={"index": self.alias}, dest={"index": new},
                            wait_for_completion=True, refresh=True)
        self.client.indices.update_aliases(actions=[
            *({"remove": {"index": index, "alias": self.alias}} for index in old),
            {"add": {"index": new, "alias": self.alias, "is_write_index": True}}])
        return new

    # -- write side ------------------------------------------------------------------------

    def states(self, ids: Sequence[str]) -> dict[str, StoredState]:
        """Stored states, with this batch's own writes over them (the ingest sink orders the changes
        after a truncate against it); remembers the version read for ``commit``'s compare-and-set."""
        read = self._read(ids)
        self._tokens.update({doc_id: stored.token for doc_id, stored in read.items()})
        found = {doc_id: stored.state for doc_id, stored in read.items() if stored.state is not None}
        found.update({doc_id: _pending_state(self._pending[doc_id]) for doc_id in ids if doc_id in self._pending})
        return found

    def live_ids(self, table: str) -> list[str]:
        """Live ids of the table, committed (refreshed first, so none is missed whatever the refresh
        policy) or written in this batch."""
        from elasticsearch.helpers import scan

        self.client.indices.refresh(index=self.alias)
        query = {"query": {"bool": {"filter": [LIVE, {"term": {"table": table}}]}}, "_source": False}
        committed = [hit["_id"] for hit in scan(self.client, index=self.alias, query=query)]
        live = [doc_id for doc_id in committed if not isinstance(self._pending.get(doc_id), Deletion)]
        return live + [doc_id for doc_id, change in self._pending.items()
                       if isinstance(change, Upsert) and change.document.table == table and doc_id not in committed]

    def write_batch(self, upserts: Sequence[Upsert], deletions: Sequence[Deletion]) -> None:
        for upsert in upserts:
            previous = self._pending.get(upsert.document.id)
            if upsert.vector is None and isinstance(previous, Upsert) and previous.vector is not None:
                upsert = Upsert(upsert.document, previous.vector)  # its stored vector is the one still pending
            self._pending[upsert.document.id] = upsert
        for deletion in deletions:
            self._pending[deletion.id] = deletion

    def commit(self, offsets: Mapping[str, int]) -> None:
        """See the module docstring."""
        pending, self._pending = self._pending, {}
        try:
            if pending:
                self._write_documents(pending)
            self._write_offsets(offsets)
        finally:
            self._tokens = {}

    def _write_documents(self, changes: dict[str, Upsert | Deletion]) -> None:
        unread = [doc_id for doc_id in changes if doc_id not in self._tokens]
        self._tokens.update({doc_id: stored.token for doc_id, stored in self._read(unread).items()})
        vectors = self._stored_vectors([doc_id for doc_id, change in changes.items()
                                        if isinstance(change, Upsert) and change.vector is None])
        now_ms, refused, todo = int(time.time() * 1000), {}, changes
        for _ in range(CONFLICT_ROUNDS):
            result = self._bulk(
                [write_action(self.alias, doc_id, document_source(change, _vector(change, vectors), now_ms),
                              self._tokens.get(doc_id)) for doc_id, change in todo.items()],
                refresh=REFRESH_ON_BULK[self.refresh])
            if result.failures:
                raise BulkWriteFailed(result.failures)  # transient: the caller rolls back and applies the batch again
            refused.update(result.refused)
            if not result.conflicted:
                break
            todo = self._decide_again({doc_id: todo[doc_id] for doc_id in result.conflicted}, vectors)
        else:
            raise BulkWriteFailed([{"_id": doc_id, "error": "still conflicting after re-reading"} for doc_id in todo])
        if refused:
            raise RefusedChanges(refused)

    def _decide_again(self, conflicted: dict[str, Upsert | Deletion],
                      vectors: dict[str, list[float]]) -> dict[str, Upsert | Deletion]:
        """After a 409: read the ids again and keep only the changes still newer than what is stored."""
        fresh = self._read(list(conflicted), with_vectors=True)
        retry, stale = {}, 0
        for doc_id, change in conflicted.items():
            stored = fresh[doc_id]
            self._tokens[doc_id] = stored.token
            if stored.state is not None and not is_newer(_position(change), stored.state.position):
                stale += 1
                continue
            if isinstance(change, Upsert) and change.vector is None:
                if stored.state is None or stored.state.content_hash != change.document.content_hash \
                        or stored.vector is None:  # the text changed since the sink decided to keep the vector
                    raise BulkWriteFailed([{"_id": doc_id, "error": "rewritten by another writer with other "
                                                                    "text: the vector must be computed again"}])
                vectors[doc_id] = stored.vector
            retry[doc_id] = change
        if stale:
            log.info("%d changes were overtaken by newer ones another writer stored meanwhile: dropped", stale)
        return retry

    def _write_offsets(self, offsets: Mapping[str, int]) -> None:
        todo = {key: offset for key, offset in offsets.items() if self._offsets.get(key, (None,))[0] != offset}
        for _ in range(CONFLICT_ROUNDS):
            if not todo:
                return
            result = self._bulk([write_action(self.offsets_index, key, {"key": key, "offset": offset},
                                              self._offsets.get(key, (None, None))[1])
                                 for key, offset in todo.items()])
            failures = result.failures + [{"_id": key, "error": reason} for key, reason in result.refused.items()]
            if failures:
                raise BulkWriteFailed(failures)
            self._offsets.update({key: (todo[key], token) for key, token in result.written.items()})
            fresh = self._read_offsets(result.conflicted)
            self._offsets.update(fresh)
            todo = {key: todo[key] for key in result.conflicted
                    if key not in fresh or fresh[key][0] < todo[key]}  # a larger one stays
        if todo:
            raise BulkWriteFailed([{"_id": key, "error": "still conflicting after re-reading"} for key in todo])

    def rollback(self) -> None:
        """Writes wait in ``_pending`` until ``commit`` sends them: dropping those is the rollback."""
        self._pending, self._tokens = {}, {}

    def ids_to_reembed(self) -> list[str]:
        """Text, vector and row are one Elasticsearch document, written at once: none to repair."""
        return []

    def is_unavailable(self, exc: BaseException) -> bool:
        """The cluster unreachable, overloaded or failing (transport errors, 408, 429, 5xx, bulk
        items failing that way, writes still conflicting), not a document it refuses."""
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        if isinstance(exc, ApiError):
            return exc.status_code in (408, 429) or exc.status_code >= 500
        return isinstance(exc, (TransportError, BulkWriteFailed, OSError))

    def committed_offsets(self) -> dict[str, int]:
        """Every partition's offset document (the small offsets index is refreshed first so a
        document just written by any worker is seen); remembers their versions for the next write."""
        from elasticsearch.helpers import scan

        self.client.indices.refresh(index=self.offsets_index)
        hits = scan(self.client, index=self.offsets_index, query={"query": {"match_all": {}},
                                                                  "seq_no_primary_term": True})
        self._offsets = {hit["_id"]: (hit["_source"]["offset"], _token(hit)) for hit in hits}
        return {key: offset for key, (offset, _) in self._offsets.items()}

    def _read_offsets(self, keys: Sequence[str]) -> dict[str, tuple[int, Token]]:
        if not keys:
            return {}
        found = self.client.mget(index=self.offsets_index, ids=list(keys))["docs"]
        return {hit["_id"]: (hit["_source"]["offset"], _token(hit)) for hit in found if hit.get("found")}

    def _read(self, ids: Sequence[str], with_vectors: bool = False) -> dict[str, Stored]:
        """Each id's version and state as stored now (realtime, no refresh needed), absent ones included."""
        if not ids:
            return {}
        fields = ["position", "deleted", "content_hash", *(["vector"] if with_vectors else [])]
        found = self.client.mget(index=self.alias, ids=list(ids), source_includes=fields)["docs"]
        read = {doc_id: Stored(None, None) for doc_id in ids}
        for hit in found:
            if hit.get("found"):
                source = hit["_source"]
                state = StoredState(hit["_id"], tuple(json.loads(source["position"])), source["deleted"],
                                    source.get("content_hash"))
                read[hit["_id"]] = Stored(_token(hit), state, source.get("vector"))
        return read

    def _bulk(self, actions: list[dict], refresh: str | None = None) -> BulkResult:
        """Send the actions (transport errors and 429s retried with backoff) and sort the items'
        outcomes: written (with their new version), conflicted, refused for good, failed."""
        from elasticsearch.helpers import streaming_bulk

        result = BulkResult({}, [], {}, [])
        options = {"refresh": refresh} if refresh else {}
        for ok, item in streaming_bulk(self.client, actions, raise_on_error=False, raise_on_exception=True,
                                       max_retries=5, initial_backoff=0.5, max_backoff=10, **options):
            outcome = next(iter(item.values()))
            status = outcome.get("status", 0)
            if ok:
                result.written[outcome["_id"]] = _token(outcome)
            elif status == CONFLICT:
                result.conflicted.append(outcome["_id"])
            elif 400 <= status < 500 and status != 429:
                result.refused[outcome["_id"]] = json.dumps(outcome.get("error"))[:1000]
            else:
                result.failures.append(outcome)
        return result

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
        """Drawn here from every live id, as the embedded index draws. Not ``random_score``: over a
        filter-only query it scores every document 0 (``boost_mode`` multiply), so each seed gave
        the same first documents; and the emulator the tests run on ignores its seed."""
        from elasticsearch.helpers import scan

        query = {"query": {"bool": {"filter": [LIVE]}}, "_source": False}
        ids = sorted(hit["_id"] for hit in scan(self.client, index=self.alias, query=query, size=5000))
        if len(ids) > limit:
            ids = [ids[i] for i in sorted(np.random.default_rng(seed).choice(len(ids), limit, replace=False))]
        return self.vectors(ids)

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


def _token(hit: Mapping) -> Token:
    return hit["_seq_no"], hit["_primary_term"]


def _position(change: Upsert | Deletion) -> tuple:
    return change.document.position if isinstance(change, Upsert) else change.position


def _vector(change: Upsert | Deletion, stored_vectors: Mapping[str, list[float]]) -> Sequence[float] | None:
    """An upsert's own vector, else (title and text unchanged) the stored one; a tombstone has none."""
    if isinstance(change, Deletion):
        return None
    return change.vector if change.vector is not None else stored_vectors.get(change.document.id)


def _pending_state(change: Upsert | Deletion) -> StoredState:
    if isinstance(change, Deletion):
        return StoredState(change.id, change.position, True, None)
    return StoredState(change.document.id, change.document.position, False, change.document.content_hash)


def _document(source: dict) -> Document:
    return Document(id=source["id"], table=source["table"], title=source["title"], text=source["text"],
                    metadata=source.get("metadata") or {}, position=tuple(json.loads(source["position"])),
                    source_ts_ms=source.get("source_ts_ms"))
