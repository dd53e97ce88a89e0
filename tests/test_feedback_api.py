"""Impressions from /search and feedback through POST /feedback, read back from their real topics."""

from __future__ import annotations

import json
import uuid

import pytest
from autoglm.debezium import change_event
from autoglm.topics import FEEDBACK, IMPRESSIONS, ensure_topics
from tests.conftest import WorkerProcess, read_topic, wait_until


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    ensure_topics(broker, ["cdc.fb.docs"])
    root = tmp_path_factory.mktemp("feedback")
    running = WorkerProcess(broker, root / "data", root / "worker.log", ["--cdc-topics", r"^cdc\.fb\."])
    yield running.wait_healthy()
    running.stop()


def feedback(query_id: str, **overrides) -> dict:
    return {"event_id": str(uuid.uuid4()), "query_id": query_id, "doc_id": "fb.docs:1", "type": "click",
            "position": 1, "session_id": "s-1", **overrides}


def test_every_search_answer_is_published_as_an_impression(worker, broker, publish):
    for pk, title in ((1, "Insulin resistance in muscle"), (2, "Insulin signalling in liver")):
        key, value = change_event("c", "fb", "docs", {"id": pk}, after={"id": pk, "title": title}, lsn=pk)
        publish("cdc.fb.docs", key, value)
    wait_until(lambda: worker.document("fb.docs:2"), message="documents indexed")

    answer = worker.client.get("/search", params={"q": "insulin", "k": 2, "mode": "bm25"},
                               headers={"X-Session-Id": "session-42"}).json()
    by_param = worker.client.get("/search", params={"q": "liver insulin", "session": "session-43"}).json()
    [(key, impression, _)] = read_topic(broker, IMPRESSIONS, lambda v: v["query_id"] == answer["query_id"], 1)
    assert key.decode() == answer["query_id"] and impression["query"] == "insulin"
    assert impression["session_id"] == "session-42" and impression["mode"] == "bm25"
    assert impression["model_version"] == answer["model_version"] and impression["arm"] == "champion"
    assert [(h["doc_id"], h["position"]) for h in impression["hits"]] == \
        [(hit["id"], rank) for rank, hit in enumerate(answer["hits"], start=1)]
    [(_, other, _)] = read_topic(broker, IMPRESSIONS, lambda v: v["query_id"] == by_param["query_id"], 1)
    assert other["session_id"] == "session-43"


def test_feedback_is_validated_and_published(worker, broker):
    query_id = str(uuid.uuid4())
    batch = [feedback(query_id), feedback(query_id, type="dwell", value=42.5, position=2),
             feedback(query_id, type="rating", value=5)]
    response = worker.client.post("/feedback", json=batch)
    assert response.status_code == 202 and response.json() == {"accepted": 3}
    single = worker.client.post("/feedback", json=feedback(query_id, type="skip", position=3))
    assert single.status_code == 202 and single.json() == {"accepted": 1}
    published = read_topic(broker, FEEDBACK, lambda v: v["query_id"] == query_id, 4)
    assert sorted(value["type"] for _, value, _ in published) == ["click", "dwell", "rating", "skip"]
    assert all(key.decode() == query_id for key, _, _ in published)


@pytest.mark.parametrize("bad, reason", [
    ({"type": "purchase"}, "type"),
    ({"position": 0}, "position"),
    ({"event_id": "not-a-uuid"}, "event_id"),
    ({"type": "rating", "value": 9}, "rating needs value between 1 and 5"),
    ({"type": "dwell"}, "dwell needs value"),
    ({"surprise": 1}, "surprise"),
    # Each of these was accepted (202) and then dead-lettered, or worse (issue 9).
    ({"type": "dwell", "value": float("nan")}, "value: Input should be a finite number"),
    ({"type": "rating", "value": float("inf")}, "value: Input should be a finite number"),
    ({"type": "dwell", "value": 86401}, "dwell needs value between 0 and 86400"),
    ({"position": True}, "position: Input should be a valid integer"),
    ({"position": "3"}, "position: Input should be a valid integer"),
    ({"position": 3.0}, "position: Input should be a valid integer"),
    ({"position": 10**9}, "position: Input should be less than or equal to 1000"),
    ({"position": 10**30}, "position: Input should be less than or equal to 1000"),
    ({"ts": "0001-01-01T00:00:00Z"}, "ts is older than the feedback retention"),
    ({"ts": "9999-12-31T23:59:59Z"}, "ts is more than 300 s in the future"),
    ({"doc_id": "d" * 257}, "doc_id: String should have at most 256 characters"),
    ({"session_id": "s" * 257}, "session_id: String should have at most 256 characters"),
])
def test_invalid_feedback_is_refused_with_a_reason_per_item(worker, broker, bad, reason):
    query_id = str(uuid.uuid4())
    body = json.dumps([feedback(query_id), feedback(query_id, **bad)])  # NaN and Infinity as JSON literals
    response = worker.client.post("/feedback", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    body = response.json()
    assert [item["index"] for item in body["rejected"]] == [1] and reason in body["rejected"][0]["reason"]
    assert read_topic(broker, FEEDBACK, lambda v: v["query_id"] == query_id, 1, timeout=3) == []


def test_empty_feedback_body_is_refused(worker):
    assert worker.client.post("/feedback", json=[]).status_code == 422
