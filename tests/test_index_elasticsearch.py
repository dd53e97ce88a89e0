"""The Elasticsearch backend: the shared conformance suite against a real cluster when
AUTOGLM_ES_URL is set (none can run on the development machines), and its request bodies,
which need no server."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from search.elasticsearch import (ElasticsearchIndex, bulk_actions, index_name_for, index_settings, knn_query,
                                  position_version, rrf_query, text_query)
from search.protocol import Deletion, Upsert
from tests.conformance import IndexConformance, doc, unit_vector

ES_URL = os.environ.get("AUTOGLM_ES_URL")


@pytest.mark.skipif(not ES_URL, reason="no Elasticsearch here: set AUTOGLM_ES_URL to run the conformance suite")
class TestElasticsearchIndex(IndexConformance):
    @pytest.fixture
    def open_index(self):
        return lambda path: ElasticsearchIndex(ES_URL, index_name_for(path))


def test_mapping_is_english_bm25_and_384_d_cosine_hnsw():
    mapping = index_settings()["mappings"]["properties"]
    assert mapping["title"] == {"type": "text", "analyzer": "english"} == mapping["text"]
    assert mapping["vector"]["dims"] == 384 and mapping["vector"]["similarity"] == "cosine"
    assert mapping["vector"]["index_options"]["type"] == "hnsw"
    assert mapping["id"]["type"] == mapping["table"]["type"] == "keyword"
    assert {"position", "deleted", "updated_at", "source_ts_ms"} <= set(mapping)
    assert index_settings()["mappings"]["dynamic"] == "strict"


def test_writes_carry_the_source_position_as_an_external_version():
    upsert = Upsert(doc("public.items:1", "Coral", "Reefs", position=42), unit_vector(1))
    keep = Upsert(doc("public.items:2", "Same text", position=43), None)
    deletion = Deletion("public.items:3", "public.items", ("lsn", 44))
    actions = bulk_actions("docs", [upsert, keep], [deletion], {"public.items:2": [0.5] * 384}, now_ms=7)
    assert [(a["_id"], a["version"], a["version_type"]) for a in actions] == [
        ("public.items:1", 42, "external_gte"), ("public.items:2", 43, "external_gte"),
        ("public.items:3", 44, "external_gte")]
    first, kept, tombstone = (a["_source"] for a in actions)
    assert np.allclose(first["vector"], unit_vector(1)) and json.loads(first["position"]) == ["lsn", 42]
    assert kept["vector"] == [0.5] * 384  # an unchanged text keeps its stored vector
    assert tombstone["deleted"] is True and "vector" not in tombstone  # deletes stay as tombstones


def test_positions_become_ordered_versions():
    assert position_version(("lsn", 5)) < position_version(("lsn", 6))
    binlog = [("binlog", "mysql-bin.000003", 900, 2), ("binlog", "mysql-bin.000003", 1200, 0),
              ("binlog", "mysql-bin.000004", 4, 0)]
    assert [position_version(p) for p in binlog] == sorted(position_version(p) for p in binlog)
    assert position_version(("binlog", "mysql-bin.000003", 900, 1)) < position_version(binlog[0])
    with pytest.raises(ValueError):
        position_version(("scn", 1))


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
