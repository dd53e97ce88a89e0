"""The feedback stream through the real broker and worker: join (late impressions too), dedup,
feedback on unshown documents, dead letters, examples and the window trigger that publishes
training requests; and the expiry sweep when a dead letter or the online metrics fail."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import faust
import pytest

from autoglm.debezium import change_event, producer
from autoglm.interactions import Feedback, Impression, ShownHit
from autoglm.broker import EmbeddedBroker
from autoglm.settings import Settings
from autoglm.topics import DEAD_LETTERS, FEEDBACK, IMPRESSIONS, PLATFORM_TOPICS, TRAINING, ensure_topics
from feedback.join import Interaction, JoinLimits
from feedback.sqlite_store import SqliteExampleStore
from streams.feedback import FeedbackProcessor
from tests.conftest import WorkerProcess, group_for, read_topic, wait_until

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


def test_feedback_waits_for_a_late_impression(worker, kafka, broker):
    """Feedback that waited is joined when its impression comes, and what the impression did not
    show is a dead letter then, not a minute later."""
    query_id, before = str(uuid.uuid4()), examples(worker)
    waiting = worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="waiting")
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:2", 2, "late-user"))
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:9", 3, "late-user"))
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="waiting")
               >= waiting + 2, 20, 0.1, "feedback to wait for its impression")
    impression = Impression(query_id=query_id, query="enzyme", mode="hybrid", model_version="base",
                            session_id="late-user", hits=[ShownHit(doc_id="join.docs:1", position=1, score=1.0),
                                                          ShownHit(doc_id="join.docs:2", position=2, score=0.5)])
    send(kafka, IMPRESSIONS, query_id, impression.model_dump_json().encode())
    wait_until(lambda: examples(worker) == before + 1, 20, 0.1, "the late join to produce an example")
    [(key, value, headers)] = dead_letters_for(broker, query_id, 1, 5)  # --feedback-max-wait is 2 s
    assert key == query_id.encode() and json.loads(value)["doc_id"] == "join.docs:9"
    assert headers["error"] == f"feedback on a document not shown: doc_id 'join.docs:9' was not shown for " \
                               f"query_id '{query_id}'"


def test_clicks_on_unshown_documents_do_not_crowd_out_a_genuine_click(worker, kafka, broker):
    """100 clicks on documents the impression never showed filled the per-query cap, and the
    user's genuine click after them was refused: it made no example."""
    query_id, before = str(uuid.uuid4()), examples(worker)
    impressions = worker.metric("autoglm_feedback_events_total", kind="impression", outcome="joined")
    send(kafka, IMPRESSIONS, query_id, shown(query_id))
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="impression", outcome="joined")
               > impressions, 20, 0.1, "the impression to be joined")
    for i in range(100):
        kafka.produce(FEEDBACK, key=query_id.encode(),
                      value=json.dumps(click(query_id, f"unshown:{i}", 1, "crowder")).encode())
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:3", 1, "crowder"))
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:2", 2, "genuine"))
    wait_until(lambda: examples(worker) == before + 1, 20, 0.1, "the genuine click to make an example")
    letters = dead_letters_for(broker, query_id, 101)
    reasons = sorted(h["error"].split(":")[0] for _, _, h in letters)
    assert reasons == ["feedback on a document not shown"] * 100 + ["feedback position does not match the impression"]


def test_invalid_and_orphan_feedback_go_to_dead_letters(worker, kafka, broker):
    orphan = str(uuid.uuid4())
    send(kafka, FEEDBACK, "bad", b'{"event_id": "nope"}')
    send(kafka, IMPRESSIONS, "bad", b"not json at all")
    send(kafka, FEEDBACK, orphan, click(orphan, "join.docs:1", 1, "nobody"))
    # No later record comes: the processor's own clock expires the orphan after --feedback-max-wait.
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", outcome="no_impression") >= 1, 20, 0.2,
               "the orphan to expire")
    letters = read_topic(broker, DEAD_LETTERS, lambda v: True, 1000, 2, bytes)
    reasons = {(k, h["source.topic"], h["error"].split(":")[0]) for k, _, h in letters}
    assert (b"bad", FEEDBACK, "invalid feedback") in reasons
    assert (b"bad", IMPRESSIONS, "invalid impression") in reasons
    assert (orphan.encode(), FEEDBACK, "no impression for query_id within 2 s") in reasons
    assert worker.client.get("/healthz").status_code == 200


def shown(query_id: str, docs: int = 3) -> bytes:
    return Impression(query_id=query_id, query="enzyme", mode="hybrid", model_version="base", session_id="u",
                      hits=[ShownHit(doc_id=f"join.docs:{rank}", position=rank, score=1.0 / rank)
                            for rank in range(1, docs + 1)]).model_dump_json().encode()


def dead_letters_for(broker: str, query_id: str, expected: int, timeout: float = 20) -> list:
    return read_topic(broker, DEAD_LETTERS, lambda v: query_id.encode() in v, expected, timeout, bytes)


def test_a_nan_dwell_is_a_dead_letter_and_later_clicks_on_its_query_still_join(worker, kafka, broker):
    """A literal NaN passed validation before, was stored as null, and failed every later record
    of its query_id with 'processing failed: ValidationError'."""
    query_id, before = str(uuid.uuid4()), examples(worker)
    send(kafka, IMPRESSIONS, query_id, shown(query_id))
    nan_dwell = json.dumps(click(query_id, "join.docs:1", 1, "nan-user", type="dwell", value=0.0))
    send(kafka, FEEDBACK, query_id, nan_dwell.replace('"value": 0.0', '"value": NaN').encode())
    send(kafka, FEEDBACK, query_id, click(query_id, "join.docs:2", 2, "nan-user"))
    wait_until(lambda: examples(worker) == before + 1, 20, 0.1, "the click after the NaN to make an example")
    [(_, _, headers)] = dead_letters_for(broker, query_id, 1)
    assert headers["error"].startswith("invalid feedback: value") and "finite" in headers["error"]


def test_a_flood_of_feedback_for_one_query_keeps_its_state_bounded(worker, kafka, broker):
    """Thousands of events for one query_id, straight onto the topic in large producer batches:
    the join refuses those on documents its impression did not show, keeps the first 100 distinct
    ones on shown documents (the cap: 60 hits x 4 types would allow more), counts repeats as
    duplicates, dead-letters the rest with a reason, its state stays one small changelog record,
    and the worker keeps going."""
    query_id, hits, unshown, repeats = str(uuid.uuid4()), 60, 3000, 1000
    before_examples = examples(worker)
    impressions = worker.metric("autoglm_feedback_events_total", kind="impression", outcome="joined")
    refused_before = worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="refused")
    duplicates_before = worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="duplicate")
    send(kafka, IMPRESSIONS, query_id, shown(query_id, hits))
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="impression", outcome="joined")
               > impressions, 20, 0.1, "the impression to be joined")
    batching = producer(broker, **{"linger.ms": 50, "batch.num.messages": 1000})
    first = click(query_id, "join.docs:2", 2, "flooder")
    flood = [first] + [first] * (repeats // 2) + [click(query_id, "join.docs:2", 2, "flooder")
                                                   for _ in range(repeats // 2)]
    flood += [click(query_id, f"flood:{i}:" + "x" * 150, 1, "flooder") for i in range(unshown)]
    flood += [click(query_id, f"join.docs:{rank}", rank, "flooder", type=kind, value=value)  # none positive
              for kind, value in (("skip", None), ("dwell", 1.0)) for rank in range(1, hits + 1)]
    for event in flood:
        batching.produce(FEEDBACK, key=query_id.encode(), value=json.dumps(event).encode())
    assert batching.flush(30) == 0

    over_cap = 1 + 2 * hits - 100
    wait_until(lambda: worker.metric("autoglm_feedback_events_total", kind="feedback", outcome="refused")
               >= refused_before + unshown + over_cap, 120, 0.5, "the excess to be refused")
    assert worker.metric("autoglm_feedback_events_total", kind="feedback",
                         outcome="duplicate") == duplicates_before + repeats
    assert examples(worker) == before_examples + 1  # the genuine click on a shown document
    letters = dead_letters_for(broker, query_id, unshown + over_cap, 60)
    reasons = [h["error"].split(":")[0] for _, _, h in letters]
    assert len(letters) == unshown + over_cap and reasons.count("feedback on a document not shown") == unshown
    assert reasons.count("too many feedback events for one query_id") == over_cap

    changelog = f"{group_for(worker.data_dir)}-interactions-changelog"
    states = read_topic(broker, changelog, lambda v: v is not None and query_id.encode() in v, 101, 20, bytes)
    assert len(states) >= 101  # the impression, then each of the 100 events it keeps
    assert max(len(value) for _, value, _ in states) < 64_000
    assert worker.client.get("/healthz").status_code == 200 and worker.process.poll() is None
    later = str(uuid.uuid4())
    send(kafka, IMPRESSIONS, later, shown(later))
    send(kafka, FEEDBACK, later, click(later, "join.docs:1", 1, "after-flood"))
    wait_until(lambda: examples(worker) == before_examples + 2, 30, 0.2, "a later query to still join")


@pytest.mark.slow
def test_a_window_closes_on_time_once_it_holds_the_minimum(tmp_path):
    """--window-minutes closes a window that never reaches --window-size, but only with at
    least --window-min examples in it. A broker of its own: a new consumer group reads the
    feedback topics from the start, and other tests' clicks would fill this window."""
    with EmbeddedBroker() as own_broker:
        ensure_topics(own_broker.address, PLATFORM_TOPICS)
        kafka = producer(own_broker.address)
        try:
            check_time_trigger(own_broker.address, kafka, tmp_path)
        finally:
            kafka.flush(10)


def check_time_trigger(broker: str, kafka, tmp_path) -> None:
    running = WorkerProcess(broker, tmp_path / "data", tmp_path / "worker.log",
                            ["--cdc-topics", r"^cdc\.timed\.", "--window-size", "1000",
                             "--window-minutes", "0.05", "--window-min", "2"])
    worker = running.wait_healthy()
    try:
        def impression_and_click(user: str) -> None:
            query_id = str(uuid.uuid4())
            impression = Impression(query_id=query_id, query=f"timed window {user}", mode="hybrid",
                                    model_version="base", session_id=user,
                                    hits=[ShownHit(doc_id="timed.docs:1", position=1, score=1.0)])
            send(kafka, IMPRESSIONS, query_id, impression.model_dump_json().encode())
            send(kafka, FEEDBACK, query_id, click(query_id, "timed.docs:1", 1, user))

        def timed_requests(wait: float) -> list:
            return read_topic(broker, TRAINING, lambda v: v["reason"] == "time", expected=1, timeout=wait)

        impression_and_click("timed-1")
        wait_until(lambda: examples(worker) == 1, 20, 0.2, "the first example")
        time.sleep(13)  # past the 3 s window and one 10 s timer tick: one example is below the minimum
        assert timed_requests(1) == []
        impression_and_click("timed-2")
        found = timed_requests(30)
        assert found, "the window closes on time once it holds two examples"
        assert found[0][1]["examples"] == 2 and found[0][1]["sessions"] == 2
        assert worker.metric("autoglm_training_windows_total", reason="time") == 1
    finally:
        running.stop()


class DeadLettersThatFailOnce:
    """The broker refusing one dead letter, which a real broker cannot be told to do on cue."""

    def __init__(self, fail_at: int):
        self.fail_at, self.calls, self.delivered = fail_at, 0, []

    async def send(self, message, reason: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("broker went away")
        self.delivered.append((message.offset, reason))


def test_the_expiry_sweep_neither_repeats_dead_letters_nor_keeps_what_it_cannot_count(tmp_path):
    """A send that failed half-way through the orphans made the next sweep send the earlier ones
    again; an interaction whose counting raised (arm counts another version wrote) stayed forever."""
    settings = Settings(feedback_max_wait_s=2, online_settle_s=5, impression_ttl_s=60)
    processor = FeedbackProcessor(faust.App("expiry-test"), settings, SqliteExampleStore(tmp_path / "examples.db"))
    letters = DeadLettersThatFailOnce(fail_at=2)
    join = processor.join
    join.interactions, processor.online_metrics.arm_stats, join.dead_letters = {}, {}, letters

    orphans = Interaction(opened_at=0.0)
    for offset in range(3):
        event = Feedback(event_id=uuid.uuid4(), query_id="orphan", doc_id=f"d{offset}", type="click", position=1)
        orphans.add_feedback(event, 0, offset, JoinLimits())
    processor.interactions["orphan"] = orphans.to_record()
    with pytest.raises(ConnectionError):
        asyncio.run(join.expire_one("orphan", processor.interactions["orphan"], 10.0))
    asyncio.run(join.expire_one("orphan", processor.interactions["orphan"], 11.0))
    assert [offset for offset, _ in letters.delivered] == [0, 1, 2]
    assert {reason for _, reason in letters.delivered} == {"no impression for query_id within 2 s"}
    assert "orphan" not in processor.interactions

    settled = Interaction(opened_at=0.0)
    settled.add_impression(Impression(query_id="settled", query="q", mode="hybrid", model_version="base",
                                      hits=[ShownHit(doc_id="d1", position=1, score=1.0)]), JoinLimits())
    processor.interactions["settled"] = settled.to_record()
    processor.online_metrics.arm_stats["base|champion"] = {"impressions": "many"}
    for now in (30.0, 45.0, 61.0):
        asyncio.run(join.expire_one("settled", processor.interactions["settled"], now))
    assert "settled" not in processor.interactions
