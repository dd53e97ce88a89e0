"""End to end: Debezium events through the real broker and a real Faust worker to /search and /documents."""

from __future__ import annotations

import json

import pytest

from autoglm.debezium import change_event
from autoglm.topics import DEAD_LETTERS, ensure_topics
from tests.conftest import WorkerProcess, read_topic, wait_until

TABLES = ["lifecycle", "snapshot", "order", "wrapped", "truncate", "bad", "reuse", "mapped"]


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    """One worker for the module; each test writes to its own table (topic cdc.e2e.<table>)."""
    ensure_topics(broker, [f"cdc.e2e.{table}" for table in TABLES], partitions=1)
    root = tmp_path_factory.mktemp("e2e")
    mapping = root / "mapping.toml"
    mapping.write_text('[tables."e2e.mapped"]\nid = ["sku"]\ntitle = "headline"\n'
                       'text = ["summary", "details"]\nmetadata = ["price"]\n')
    running = WorkerProcess(broker, root / "data", root / "worker.log", ["--mapping", str(mapping)])
    yield running.wait_healthy()
    running.stop()


@pytest.fixture
def send(publish):
    def send_event(table: str, op: str, pk, after=None, before=None, lsn=None, key=True, **kwargs):
        key_bytes, value = change_event(op, "e2e", table, {"id": pk}, after=after, before=before,
                                        lsn=lsn, **kwargs)
        publish(f"cdc.e2e.{table}", key_bytes if key else None, value)
    return send_event


def row(pk, title, text="", **extra):
    return {"id": pk, "title": title, "body": text, **extra}


def wait_for_title(worker: WorkerProcess, doc_id: str, title: str | None, timeout: float = 30):
    """Wait until /documents shows the title (None: until the document is gone)."""
    def matches():
        doc = worker.document(doc_id)
        return (doc is None) if title is None else (doc is not None and doc["title"] == title)
    wait_until(matches, timeout, message=f"{doc_id} to have title {title!r}")


def test_create_update_delete_round_trip(worker, send, publish):
    send("lifecycle", "c", 1, after=row(1, "Photosynthesis in algae", "Light reactions split water.",
                                        author="kim"), lsn=100)
    wait_for_title(worker, "e2e.lifecycle:1", "Photosynthesis in algae")
    doc = worker.document("e2e.lifecycle:1")
    assert doc["metadata"] == {"id": 1, "author": "kim"}
    assert doc["source"]["table"] == "e2e.lifecycle" and doc["source"]["position"] == ["lsn", 100]
    assert worker.search_ids("algae photosynthesis", mode="bm25")[0] == "e2e.lifecycle:1"
    assert "e2e.lifecycle:1" in worker.search_ids("how do plants turn light into energy", mode="dense")

    send("lifecycle", "u", 1, after=row(1, "Glaciers retreating", "Ice sheets melt faster."), lsn=200)
    wait_for_title(worker, "e2e.lifecycle:1", "Glaciers retreating")
    assert "e2e.lifecycle:1" not in worker.search_ids("algae photosynthesis", mode="bm25")
    assert worker.search_ids("glaciers melt", mode="hybrid")[0] == "e2e.lifecycle:1"

    send("lifecycle", "d", 1, before=row(1, "Glaciers retreating"), lsn=300)
    wait_for_title(worker, "e2e.lifecycle:1", None)
    assert worker.client.get("/documents/e2e.lifecycle:1").status_code == 404
    for mode in ("bm25", "dense", "hybrid"):
        assert "e2e.lifecycle:1" not in worker.search_ids("glaciers melt", mode=mode)

    # Debezium follows a delete with a tombstone (null value); it changes nothing.
    publish("cdc.e2e.lifecycle", json.dumps({"id": 1}).encode(), None)
    send("lifecycle", "c", 1, after=row(1, "Recreated row"), lsn=400)
    wait_for_title(worker, "e2e.lifecycle:1", "Recreated row")
    worker.client.get("/healthz").raise_for_status()


def test_tombstone_is_a_no_op(worker, send, publish):
    send("snapshot", "r", 1, after=row(1, "Snapshot row one"), lsn=50)
    wait_for_title(worker, "e2e.snapshot:1", "Snapshot row one")
    before = worker.metric("autoglm_events_received_total", op="tombstone")
    publish("cdc.e2e.snapshot", json.dumps({"id": 1}).encode(), None)
    send("snapshot", "r", 2, after=row(2, "Snapshot row two"), lsn=50)
    wait_for_title(worker, "e2e.snapshot:2", "Snapshot row two")
    assert worker.metric("autoglm_events_received_total", op="tombstone") == before + 1
    assert worker.document("e2e.snapshot:1")["title"] == "Snapshot row one"


def test_out_of_order_and_duplicates_keep_the_newest_state(worker, send):
    send("order", "c", 1, after=row(1, "version three"), lsn=3000)
    send("order", "u", 1, after=row(1, "version two"), lsn=2000)       # older: ignored
    send("order", "c", 1, after=row(1, "version three"), lsn=3000)     # duplicate: no-op
    send("order", "c", 2, after=row(2, "to be deleted"), lsn=1000)
    send("order", "d", 2, before=row(2, "to be deleted"), lsn=5000)
    send("order", "c", 2, after=row(2, "late resurrection"), lsn=4000)  # older than the delete
    send("order", "c", 3, after=row(3, "marker"), lsn=1)
    wait_for_title(worker, "e2e.order:3", "marker")
    assert worker.document("e2e.order:1")["title"] == "version three"
    assert worker.document("e2e.order:1")["source"]["position"] == ["lsn", 3000]
    assert worker.document("e2e.order:2") is None
    assert "e2e.order:2" not in worker.search_ids("late resurrection", mode="bm25")
    assert worker.metric("autoglm_events_total", outcome="stale") >= 2
    assert worker.metric("autoglm_events_total", outcome="duplicate") >= 1


def test_keys_and_values_with_and_without_schema_wrapper(worker, publish):
    for pk, wrapped in ((1, False), (2, True)):
        key, value = change_event("c", "e2e", "wrapped", {"id": pk}, after=row(pk, f"wrapped {wrapped}"),
                                  lsn=10 + pk, with_schema=wrapped)
        publish("cdc.e2e.wrapped", key, value)
    # A wrapped value with an unwrapped key, and a scalar key.
    _, value = change_event("c", "e2e", "wrapped", {}, after=row(3, "mixed"), lsn=20, with_schema=True)
    publish("cdc.e2e.wrapped", json.dumps({"id": 3}).encode(), value)
    wait_for_title(worker, "e2e.wrapped:1", "wrapped False")
    wait_for_title(worker, "e2e.wrapped:2", "wrapped True")
    wait_for_title(worker, "e2e.wrapped:3", "mixed")


def test_truncate_removes_the_tables_documents(worker, send, publish):
    for pk in (1, 2, 3):
        send("truncate", "c", pk, after=row(pk, f"row {pk} before truncate"), lsn=pk)
    wait_for_title(worker, "e2e.truncate:3", "row 3 before truncate")
    _, value = change_event("t", "e2e", "truncate", {}, lsn=100)
    publish("cdc.e2e.truncate", None, value)
    send("truncate", "c", 4, after=row(4, "after truncate"), lsn=200)
    wait_for_title(worker, "e2e.truncate:4", "after truncate")
    assert [worker.document(f"e2e.truncate:{pk}") for pk in (1, 2, 3)] == [None, None, None]
    send("truncate", "u", 2, after=row(2, "stale update from before the truncate"), lsn=50)
    send("truncate", "c", 5, after=row(5, "marker"), lsn=300)
    wait_for_title(worker, "e2e.truncate:5", "marker")
    assert worker.document("e2e.truncate:2") is None


def test_bad_events_go_to_the_dead_letter_topic_and_good_ones_keep_flowing(worker, send, publish, broker):
    topic = "cdc.e2e.bad"
    good_key, unknown_op = change_event("x", "e2e", "bad", {"id": 9}, after=row(9, "unknown op"), lsn=1)
    _, no_key = change_event("c", "e2e", "bad", {}, after={"title": "row without any id"}, lsn=2)
    _, unmappable = change_event("c", "e2e", "bad", {"id": 8}, after={"id": 8, "price": 3}, lsn=3)
    bad = [
        (b"k1", b"{not json", "invalid JSON in value"),
        (b"k2", json.dumps({"hello": "world"}).encode(), "not a Debezium change event envelope"),
        (good_key, unknown_op, "unknown op 'x'"),
        (None, no_key, "missing key"),
        (json.dumps({"id": 8}).encode(), unmappable, "unmappable row"),
    ]
    dead_before = worker.metric("autoglm_dead_letters_total")
    for key, value, _ in bad:
        publish(topic, key, value)
    send("bad", "c", 1, after=row(1, "good event after bad ones"), lsn=10)
    wait_for_title(worker, "e2e.bad:1", "good event after bad ones")

    letters = read_topic(broker, DEAD_LETTERS, lambda _: True, expected=100, timeout=5, decode=bytes)
    letters = [letter for letter in letters if letter[2].get("source.topic") == topic]
    assert len(letters) == len(bad)
    for (key, value, reason), (letter_key, letter_value, headers) in zip(bad, letters):
        assert letter_key == key and letter_value == value
        assert headers["error"].startswith(reason), headers["error"]
        assert headers["source.partition"] == "0" and headers["source.offset"].isdigit()
    assert worker.metric("autoglm_dead_letters_total") == dead_before + len(bad)
    assert worker.client.get("/healthz").status_code == 200


def test_unchanged_text_reuses_the_stored_vector(worker, send):
    send("reuse", "c", 1, after=row(1, "Stable title", "Stable text", views=1), lsn=1)
    wait_for_title(worker, "e2e.reuse:1", "Stable title")
    embedded, reused = (worker.metric("autoglm_documents_embedded_total"),
                        worker.metric("autoglm_vectors_reused_total"))
    send("reuse", "u", 1, after=row(1, "Stable title", "Stable text", views=2), lsn=2)
    wait_until(lambda: worker.document("e2e.reuse:1")["metadata"]["views"] == 2, message="metadata update")
    assert worker.metric("autoglm_vectors_reused_total") == reused + 1
    assert worker.metric("autoglm_documents_embedded_total") == embedded
    assert worker.search_ids("stable title", mode="dense")[0] == "e2e.reuse:1"


def test_mapping_file_chooses_id_title_text_and_metadata(worker, publish):
    after = {"sku": "A-7", "headline": "Solar kettle", "summary": "Boils water.", "details": "Uses mirrors.",
             "price": 12, "internal_note": "not exported"}
    _, value = change_event("c", "e2e", "mapped", {}, after=after, lsn=1)
    publish("cdc.e2e.mapped", None, value)  # no message key: the mapping's id fields name the row
    wait_for_title(worker, "e2e.mapped:A-7", "Solar kettle")
    doc = worker.document("e2e.mapped:A-7")
    assert doc["text"] == "Boils water.\n\nUses mirrors." and doc["metadata"] == {"price": 12}


def test_search_api_validates_input_and_treats_query_syntax_as_text(worker, send):
    send("lifecycle", "c", 50, after=row(50, "Vitamin D and bone density", "Calcium absorption."), lsn=5000)
    wait_for_title(worker, "e2e.lifecycle:50", "Vitamin D and bone density")
    for params, fragment in (({"q": ""}, "q"), ({"q": "   "}, "blank"), ({"q": "x", "k": 0}, "k"),
                             ({"q": "x", "k": 101}, "k"), ({"q": "x", "mode": "fuzzy"}, "mode")):
        response = worker.client.get("/search", params=params)
        assert response.status_code == 422, params
        assert fragment in response.json()["error"]
    for query in ['vitamin: "bone (density*', "~^ - AND OR NOT", "bone AND", "NOT", ":", "\"", "*"]:
        for mode in ("bm25", "dense", "hybrid"):
            response = worker.client.get("/search", params={"q": query, "mode": mode})
            assert response.status_code == 200, (query, mode, response.text)
    body = worker.client.get("/search", params={"q": 'vitamin: "bone (density*', "k": 3}).json()
    assert body["hits"][0]["id"] == "e2e.lifecycle:50"
    assert set(body) == {"query_id", "model_version", "arm", "mode", "hits"}
    assert set(body["hits"][0]) == {"id", "score", "title", "snippet", "metadata", "source"}
    assert body["hits"][0]["source"] == {"table": "e2e.lifecycle", "position": ["lsn", 5000]}


def test_metrics_expose_pipeline_health(worker):
    text = worker.client.get("/metrics").text
    for name in ("autoglm_events_total", "autoglm_dead_letters_total", "autoglm_batch_size_bucket",
                 "autoglm_commit_seconds_bucket", "autoglm_freshness_seconds_bucket"):
        assert name in text
    assert worker.metric("autoglm_freshness_seconds_count") > 0
