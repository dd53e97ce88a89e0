"""The feedback stream through the real broker and worker: join (late impressions too), dedup,
dead letters, examples and the window trigger that publishes training requests."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from autoglm.debezium import change_event, producer
from autoglm.interactions import Impression, ShownHit
from autoglm.topics import DEAD_LETTERS, FEEDBACK, IMPRESSIONS, TRAINING, ensure_topics
from tests.conftest import WorkerProcess, read_topic, wait_until

WINDOW = 4


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    ensure_topics(broker, ["cdc.join.docs"])
    root = tmp_path_factory.mktemp("join")
    running = WorkerProcess(broker, root / "data", root / "worker.log",
                            ["--cdc-topics", r"^cdc\.join\.", "--window-size", str(WINDOW),
                             "--feedback-max-wait", "2"])
    yield running.wait_healthy()
    running.stop()


@pytest.fixture(scope="module")
def kafka(broker):
    client = producer(broker)
    yield client
    client.flush(10)


def send(kafka, topic: str, key: str, value: dict | bytes) -> None:
    kafka.produce(topic, key=key.encode(), value=value if isinstance(value, bytes) else json.dumps(value))
    kafka.flush(10)


def click(query_id: str, doc_id: str, position: int, session: str, event_id: str | None = None, **extra) -> dict:
    return {"event_id": event_id or str(uuid.uuid4()), "query_id": query_id, "doc_id": doc_id, "type": "click",
            "position": position, "session_id": session, **extra}


def examples(worker) -> float:
    return worker.metric("autoglm_training_examples_total")


def test_clicks_after_real_searches_become_examples_and_fill_a_window(worker, kafka, broker):
    for pk in range(1, 6):
        key, value = change_event("c", "join", "docs", {"id": pk},
                                  after={"id": pk, "title": f"Enzyme kinetics note {pk}"}, lsn=pk)
        kafka.produce("cdc.join.docs", key=key, value=value)
    kafka.flush(10)
    wait_until(lambda: worker.document("join.docs:5"), message="documents indexed")

    before = examples(worker)
    answers = [worker.client.get("/search", params={"q": f"enzyme kinetics {i}", "k": 5},
                                 headers={"X-Session-Id": f"user-{i}"}).json() for i in range(WINDOW)]
    for i, answer in enumerate(answers):
        hit = answer["hits"][2]
        body = click(answer["query_id"], hit["id"], 3, f"user-{i}")
        assert worker.client.post("/feedback", json=body).status_code == 202
        # the same event again, as a retrying client would send it: ignored
        assert worker.client.post("/feedback", json=body).status_code == 202
    wait_until(lambda: examples(worker) >= before + WINDOW, 30, 0.2, "examples from the clicks")
    assert worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="duplicate") >= WINDOW

    requests = read_topic(broker, TRAINING, lambda v: True, expected=1, timeout=30)
    assert requests, "a full window publishes a training request"
    _, request, _ = requests[0]
    assert request["examples"] == WINDOW and request["reason"] == "size" and request["sessions"] == WINDOW
    assert examples(worker) == before + WINDOW  # duplicates added nothing


def test_feedback_waits_for_a_late_impression(worker, kafka):
    query_id, before = str(uuid.uuid4()), examples(worker)
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:2", 2, "late-user"))
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="waiting") >= 1,
               20, 0.1, "feedback to wait for its impression")
    impression = Impression(query_id=query_id, query="enzyme", mode="hybrid", model_version="base",
                            session_id="late-user", hits=[ShownHit(doc_id="join.docs:1", position=1, score=1.0),
                                                          ShownHit(doc_id="join.docs:2", position=2, score=0.5)])
    send(kafka, IMPRESSIONS, query_id, impression.model_dump_json().encode())
    wait_until(lambda: examples(worker) == before + 1, 20, 0.1, "the late join to produce an example")


def test_invalid_and_orphan_feedback_go_to_dead_letters(worker, kafka, broker):
    orphan = str(uuid.uuid4())
    send(kafka, FEEDBACK, "bad", b'{"event_id": "nope"}')
    send(kafka, IMPRESSIONS, "bad", b"not json at all")
    send(kafka, FEEDBACK, orphan, click(orphan, "join.docs:1", 1, "nobody"))
    time.sleep(2.5)  # past --feedback-max-wait; the next record lets the processor sweep
    later = str(uuid.uuid4())
    send(kafka, FEEDBACK, later, click(later, "join.docs:1", 1, "someone"))
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", outcome="no_impression") >= 1, 20, 0.2,
               "the orphan to expire")
    letters = read_topic(broker, DEAD_LETTERS, lambda v: True, 1000, 2, bytes)
    reasons = {(k, h["source.topic"], h["error"].split(":")[0]) for k, _, h in letters}
    assert (b"bad", FEEDBACK, "invalid feedback") in reasons
    assert (b"bad", IMPRESSIONS, "invalid impression") in reasons
    assert (orphan.encode(), FEEDBACK, "no impression for query_id within 2 s") in reasons
    assert worker.client.get("/healthz").status_code == 200
