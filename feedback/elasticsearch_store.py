"""The example store in Elasticsearch: shared by every learner, so the one that takes over from a
dead one sees every example and window (feedback/store.py says what a store does).

Three indices beside the documents' alias ``<name>``:
- ``<name>-examples``: one document per example, id = example_id (created with
  ``op_type=create``, so a replayed example is a 409 and adds nothing), with its ``seq`` (order
  of arrival) and ``window_id``: 0 while pending, W once in window W, -W when window W's session
  cap left it out;
- ``<name>-windows``: one document per window, id = window id, created with ``op_type=create``
  (two learners can never both make window W), listing the examples it kept and dropped;
- ``<name>-learn-stats``: the rank statistics of log-estimated propensities.

Closing a window, in order (a learner killed anywhere in between loses nothing):
1. refresh the examples index and read every pending example in ``seq`` order;
2. apply the session cap;
3. create the window document (the window now exists, with its members);
4. mark its examples ``window_id`` = W (kept) or -W (dropped) and refresh.
Opening the store repeats step 4 for the newest window (idempotent), which finishes a close cut
short between steps 3 and 4. Rank statistics are written at most every ``stats_flush_s`` and on
close: a crash loses at most that much of them (they are estimates, see feedback/propensity.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator

from feedback.examples import TrainingExample
from feedback.store import Window, example_from_dict, session_capped

_PAGE = 1000
_EXAMPLES = {"dynamic": "strict", "properties": {
    "seq": {"type": "long"}, "window_id": {"type": "long"}, "session_id": {"type": "keyword"},
    "created_at": {"type": "double"}, "body": {"type": "object", "enabled": False}}}
_WINDOWS = {"dynamic": "strict", "properties": {
    "window_id": {"type": "long"}, "first_seq": {"type": "long"}, "last_seq": {"type": "long"},
    "examples": {"type": "long"}, "sessions": {"type": "long"}, "dropped_by_session_cap": {"type": "long"},
    "reason": {"type": "keyword"}, "created_at": {"type": "double"},
    "kept_ids": {"type": "keyword", "index": False}, "dropped_ids": {"type": "keyword", "index": False}}}
_STATS = {"dynamic": "strict", "properties": {"shown": {"type": "object", "enabled": False},
                                              "clicked": {"type": "object", "enabled": False}}}


class ElasticsearchExampleStore:
    def __init__(self, url: str, name: str = "autoglm-documents", stats_flush_s: float = 2.0, client=None):
        from elasticsearch import Elasticsearch

        self.client = client or Elasticsearch(url, request_timeout=30, retry_on_timeout=True, max_retries=3)
        self.examples_index, self.windows_index = f"{name}-examples", f"{name}-windows"
        self.stats_index, self.stats_flush_s = f"{name}-learn-stats", stats_flush_s
        for index, mappings in ((self.examples_index, _EXAMPLES), (self.windows_index, _WINDOWS),
                                (self.stats_index, _STATS)):
            if not self.client.indices.exists(index=index):
                self.client.options(ignore_status=400).indices.create(
                    index=index, mappings=mappings, settings={"index": {"number_of_replicas": 0}})
        self._shown, self._clicked = self._read_rank_stats()
        self._stats_written_at = time.monotonic()
        self._stats_dirty = False
        last = self.last_window()
        if last is not None:
            self._mark_members(self._window_source(last.window_id))  # finish a close cut short
        self.resume()

    def add(self, examples: list[TrainingExample]) -> int:
        from elasticsearch.helpers import streaming_bulk

        if not examples:
            return 0
        now = time.time()
        actions = [{"_op_type": "create", "_index": self.examples_index, "_id": e.example_id,
                    "_source": {"seq": self._next_seq + i, "window_id": 0, "session_id": e.session_id,
                                "created_at": now, "body": asdict(e)}} for i, e in enumerate(examples)]
        self._next_seq += len(examples)
        created, failures = 0, []
        for ok, item in streaming_bulk(self.client, actions, raise_on_error=False, max_retries=3):
            result = item["create"]
            if ok:
                created += 1
            elif result.get("status") != 409:  # 409: the example is stored already
                failures.append(result)
        if failures:  # the join dead-letters the record; a redelivery retries what failed
            raise RuntimeError(f"{len(failures)} examples not stored: {str(failures[0])[:300]}")
        self._pending += created
        return created

    def resume(self) -> None:
        """Another learner may have added examples and closed windows since: count from them."""
        self.client.indices.refresh(index=self.examples_index)
        self._next_seq = self._max_seq() + 1
        self._pending = self._count(0)

    def pending(self) -> int:
        return self._pending

    def last_window(self) -> Window | None:
        self.client.indices.refresh(index=self.windows_index)
        hits = self.client.search(index=self.windows_index, sort=[{"window_id": "desc"}], size=1,
                                  source_excludes=["kept_ids", "dropped_ids"])["hits"]["hits"]
        return _window(hits[0]["_source"]) if hits else None

    def close_window(self, reason: str, max_session_share: float) -> Window | None:
        from elasticsearch import ConflictError

        self.client.indices.refresh(index=self.examples_index)
        rows = [(hit["_id"], hit["_source"]["seq"], hit["_source"].get("session_id"))
                for hit in self._pending_hits()]
        if not rows:
            self._pending = 0
            return None
        kept, sessions = session_capped([((doc_id, seq), session) for doc_id, seq, session in rows],
                                        max_session_share)
        kept_ids = [doc_id for doc_id, _ in kept]
        dropped_ids = sorted({doc_id for doc_id, _, _ in rows} - set(kept_ids))
        while True:
            last = self.last_window()
            window = Window((last.window_id if last else 0) + 1, rows[0][1], rows[-1][1], len(kept_ids),
                            sessions, len(dropped_ids), reason, time.time())
            try:
                self.client.create(index=self.windows_index, id=str(window.window_id), refresh="true",
                                   document={**asdict(window), "kept_ids": kept_ids, "dropped_ids": dropped_ids})
                break
            except ConflictError:  # another learner (one that lost its lease) made that id first
                continue
        self._mark_members(self._window_source(window.window_id))
        self._pending = self._count(0)
        return window

    def examples_in(self, window_id: int) -> list[TrainingExample]:
        source = self._window_source(window_id)
        if source is None:
            return []
        ids = source["kept_ids"]
        found = {}
        for start in range(0, len(ids), _PAGE):
            docs = self.client.mget(index=self.examples_index, ids=ids[start:start + _PAGE])["docs"]
            found.update({doc["_id"]: doc["_source"] for doc in docs if doc.get("found")})
        ordered = sorted(found.values(), key=lambda s: s["seq"])
        return [example_from_dict(s["body"]) for s in ordered]

    def add_rank_stats(self, shown_ranks: int = 0, clicked_rank: int | None = None) -> None:
        for rank in range(1, shown_ranks + 1):
            self._shown[rank] = self._shown.get(rank, 0) + 1
        if clicked_rank is not None:
            self._clicked[clicked_rank] = self._clicked.get(clicked_rank, 0) + 1
        self._stats_dirty = True
        if time.monotonic() - self._stats_written_at >= self.stats_flush_s:
            self._write_rank_stats()

    def rank_stats(self) -> tuple[dict[int, int], dict[int, int]]:
        return dict(self._shown), dict(self._clicked)

    def close(self) -> None:
        if self._stats_dirty:
            self._write_rank_stats()
        self.client.close()

    # -- helpers ---------------------------------------------------------------------------

    def _pending_hits(self) -> Iterator[dict]:
        """Pending examples in seq order, page by page."""
        after = None
        while True:
            page = self.client.search(index=self.examples_index, query={"term": {"window_id": 0}},
                                      sort=[{"seq": "asc"}], size=_PAGE, source_includes=["seq", "session_id"],
                                      **({"search_after": after} if after else {}))["hits"]["hits"]
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1]["sort"]

    def _window_source(self, window_id: int) -> dict | None:
        found = self.client.options(ignore_status=404).get(index=self.windows_index, id=str(window_id)).body
        return found["_source"] if found.get("found") else None

    def _mark_members(self, source: dict | None) -> None:
        from elasticsearch.helpers import bulk

        if not source:
            return
        window_id = source["window_id"]
        actions = [{"_op_type": "update", "_index": self.examples_index, "_id": doc_id,
                    "doc": {"window_id": sign * window_id}}
                   for ids, sign in ((source["kept_ids"], 1), (source["dropped_ids"], -1)) for doc_id in ids]
        if actions:
            bulk(self.client, actions, refresh="true", max_retries=3)

    def _count(self, window_id: int) -> int:
        return self.client.count(index=self.examples_index, query={"term": {"window_id": window_id}})["count"]

    def _max_seq(self) -> int:
        found = self.client.search(index=self.examples_index, size=0, aggs={"top": {"max": {"field": "seq"}}})
        return int(found["aggregations"]["top"]["value"] or 0)

    def _read_rank_stats(self) -> tuple[dict[int, int], dict[int, int]]:
        found = self.client.options(ignore_status=404).get(index=self.stats_index, id="rank_stats").body
        if not found.get("found"):
            return {}, {}
        source = found["_source"]
        return ({int(r): int(n) for r, n in source.get("shown", {}).items()},
                {int(r): int(n) for r, n in source.get("clicked", {}).items()})

    def _write_rank_stats(self) -> None:
        self.client.index(index=self.stats_index, id="rank_stats",
                          document={"shown": {str(r): n for r, n in self._shown.items()},
                                    "clicked": {str(r): n for r, n in self._clicked.items()}})
        self._stats_written_at, self._stats_dirty = time.monotonic(), False


def _window(source: dict) -> Window:
    return Window(**{field: source[field] for field in Window.__dataclass_fields__})
