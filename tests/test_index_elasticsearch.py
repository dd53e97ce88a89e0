"""The Elasticsearch backend: the shared conformance suite against a server (the noida-db emulator,
or the cluster at AUTOGLM_ES_URL; see tests/es_server.py), its start-up and refresh policies, and
its request bodies."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from search.elasticsearch import (ElasticsearchIndex, document_source, index_name_for, index_settings, knn_query,
                                  rrf_query, text_query, write_action)
from search.protocol import Deletion, Upsert
from tests.conformance import IndexConformance, doc, unit_vector


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class TestElasticsearchIndex(IndexConformance):
    @pytest.fixture
    def open_index(self, es_url):
        name = fresh_name("conformance")  # each test its own index; reopening a path opens the same one
        return lambda path: ElasticsearchIndex(es_url, name)


def test_processes_starting_at_once_share_one_documents_index(es_url):
    """Workers of one deployment start together: all of them come up, on the same indices."""
    name, opened, errors = fresh_name("startup"), [], []
    start = threading.Barrier(6)

    def open_one():
        start.wait()
        try:
            opened.append(ElasticsearchIndex(es_url, name))
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == [] and len(opened) == 6
        assert list(opened[0].client.indices.get_alias(name=name)) == [f"{name}-000001"]
        opened[0].write_batch([Upsert(doc("public.items:1", "Shared index"), unit_vector(1))], [])
        opened[0].commit({"t:0": 1})
        assert opened[5].get("public.items:1").title == "Shared index"
        assert opened[5].committed_offsets() == {"t:0": 1}
    finally:
        for index in opened:
            index.close()


def test_refresh_false_leaves_visibility_to_the_refresh_interval(es_url):
    """With refresh "false" a commit does not refresh: the document is stored (a realtime get finds
    it) but searches see it only after a refresh, here never scheduled (refresh_interval -1);
    with "true" the commit's bulk request refreshes."""
    lazy = ElasticsearchIndex(es_url, fresh_name("refresh"), refresh="false")
    eager = ElasticsearchIndex(es_url, lazy.alias, refresh="true")
    try:
        lazy.client.indices.put_settings(index=lazy.alias, settings={"index": {"refresh_interval": "-1"}})
        lazy.write_batch([Upsert(doc("public.items:1", "Unrefreshed walrus"), unit_vector(1))], [])
        lazy.commit({"t:0": 1})
        assert lazy.get("public.items:1").title == "Unrefreshed walrus"
        assert lazy.search_text("walrus", 5) == [] and lazy.count() == 0
        eager.write_batch([Upsert(doc("public.items:2", "Refreshed walrus"), unit_vector(2))], [])
        eager.commit({"t:0": 2})
        assert sorted(hit.id for hit in eager.search_text("walrus", 5)) == ["public.items:1", "public.items:2"]
    finally:
        lazy.close()
        eager.close()


def test_an_unknown_refresh_policy_is_refused():
    with pytest.raises(ValueError, match="refresh"):
        ElasticsearchIndex("http://127.0.0.1:9", "never-opened", refresh="sometimes")


def test_mapping_is_english_bm25_and_384_d_cosine_hnsw():
    mapping = index_settings()["mappings"]["properties"]
    assert mapping["title"] == {"type": "text", "analyzer": "english"} == mapping["text"]
    assert mapping["vector"]["dims"] == 384 and mapping["vector"]["similarity"] == "cosine"
    assert mapping["vector"]["index_options"]["type"] == "hnsw"
    assert mapping["id"]["type"] == mapping["table"]["type"] == "keyword"
    assert {"position", "deleted", "updated_at", "source_ts_ms"} <= set(mapping)
    assert index_settings()["mappings"]["dynamic"] == "strict"


def test_writes_compare_and_set_instead_of_carrying_versions():
    """An id read before is written only if still at the version read; an absent one only if still
    absent. No external version: one number cannot order positions of different kinds."""
    upsert = Upsert(doc("public.items:1", "Coral", "Reefs", position=42), unit_vector(1))
    seen = write_action("docs", "public.items:1", document_source(upsert, upsert.vector, 7), (12, 3))
    absent = write_action("docs", "public.items:9", document_source(upsert, None, 7), None)
    assert (seen["_op_type"], seen["if_seq_no"], seen["if_primary_term"]) == ("index", 12, 3)
    assert absent["_op_type"] == "create" and "if_seq_no" not in absent
    assert not {"version", "version_type"} & (set(seen) | set(absent))
    assert np.allclose(seen["_source"]["vector"], unit_vector(1)) and seen["_source"]["position"] == '["lsn", 42]'
    assert "vector" not in absent["_source"]
    tombstone = document_source(Deletion("public.items:3", "public.items", ("ts_ms", 1_700_000_000_000, 5)), None, 7)
    assert tombstone["deleted"] is True and "vector" not in tombstone  # deletes stay, with their position
    assert tombstone["position"] == '["ts_ms", 1700000000000, 5]'


def test_queries_search_plain_text_and_skip_tombstones():
    body = text_query('vitamin: "D" AND (bone*)', 10)
    match = body["query"]["bool"]["must"]["multi_match"]
    assert match["query"] == 'vitamin: "D" AND (bone*)' and match["fields"] == ["title", "text"]  # no query_string
    assert {"term": {"deleted": False}} in body["query"]["bool"]["filter"] and body["size"] == 10
    knn = knn_query(unit_vector(1), 5)["knn"]
    assert knn["k"] == 5 and knn["num_candidates"] >= 5 and knn["filter"] == {"term": {"deleted": False}}
    rrf = rrf_query("bone density", unit_vector(1), 10, rrf_k=60, window=100)["retriever"]["rrf"]
    assert rrf["rank_constant"] == 60 and rrf["rank_window_size"] == 100
    assert [next(iter(r)) for r in rrf["retrievers"]] == ["standard", "knn"]


def test_index_names_are_valid_and_stable():
    name = index_name_for("/tmp/some/Path")
    assert name == index_name_for("/tmp/some/Path") and name.islower() and "/" not in name
