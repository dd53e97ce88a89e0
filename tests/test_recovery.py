"""Recovery: kill -9 of the worker in the middle of a stream, and a data dir restored from a
backup, each followed by a restart that must leave exactly the state the stream describes."""

import random
import shutil
import signal

import pytest

from autoglm.broker import EmbeddedBroker
from autoglm.debezium import change_event, producer
from autoglm.settings import Settings
from autoglm.topics import ensure_topics
from tests.conftest import WorkerProcess, wait_until

EVENTS = 2000
KEYS = 400


def scripted_events(count: int = EVENTS, seed: int = 7):
    """Creates, updates and deletes over 400 keys, and the final state they must leave
    (the first n events are the same for every count)."""
    rng = random.Random(seed)
    final: dict[int, str | None] = {}
    events = []
    for lsn in range(1, count + 1):
        pk = rng.randrange(KEYS)
        if final.get(pk) and rng.random() < 0.2:
            events.append(change_event("d", "crash", "items", {"id": pk}, before={"id": pk}, lsn=lsn))
            final[pk] = None
        else:
            title = f"item {pk} revision {lsn}"
            op = "u" if final.get(pk) else "c"
            events.append(change_event(op, "crash", "items", {"id": pk},
                                       after={"id": pk, "title": title, "body": f"text of revision {lsn}"},
                                       lsn=lsn))
            final[pk] = title
    return events, {f"crash.items:{pk}": title for pk, title in final.items() if title}


def live_titles(worker) -> dict[str, str]:
    """The title of every live document the scripted events can touch, as the worker serves it."""
    live = {doc_id: worker.document(doc_id) for doc_id in (f"crash.items:{pk}" for pk in range(KEYS))}
    return {doc_id: doc["title"] for doc_id, doc in live.items() if doc is not None}


def assert_comes_to_serve(worker, expected: dict[str, str], timeout: float) -> None:
    """Wait until the worker serves exactly ``expected``; on timeout, fail showing what differs
    and the worker's log."""
    try:
        wait_until(lambda: live_titles(worker) == expected, timeout, 0.5, "the index to catch up")
    except pytest.fail.Exception:
        pass  # the assertion below shows what differs
    assert live_titles(worker) == expected, worker.log_tail(60)


def publish_all(broker: str, topic: str, events) -> None:
    kafka = producer(broker)
    for key, value in events:
        kafka.produce(topic, key=key, value=value)
    kafka.flush(30)


def test_kill_9_mid_stream_then_restart_loses_nothing_and_adds_nothing(broker, start_worker, tmp_path):
    topic = "cdc.crash.items"
    ensure_topics(broker, [topic], partitions=1)
    events, expected = scripted_events()
    data_dir = tmp_path / "crash-data"
    only_this_topic = ["--cdc-topics", r"^cdc\.crash\."]  # the session's broker has other tests' topics
    worker = start_worker(data_dir, only_this_topic)

    publish_all(broker, topic, events)

    # Kill once part of the stream is applied, but well before the end.
    def applied():
        count = worker.metric("autoglm_events_total", outcome="applied")
        return count if count >= 300 else None
    applied_before_kill = wait_until(applied, 120, 0.01, "the worker to apply part of the stream")
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait()
    assert worker.process.returncode == -signal.SIGKILL
    assert applied_before_kill < EVENTS - 500, "the kill came too late to test recovery"

    restarted = start_worker(data_dir, only_this_topic)
    wait_until(lambda: restarted.client.get("/metrics").status_code == 200, 30)
    marker_key, marker = change_event("c", "crash", "items", {"id": "marker"},
                                      after={"id": "marker", "title": "end of stream"}, lsn=EVENTS + 1)
    publish_all(broker, topic, [(marker_key, marker)])
    wait_until(lambda: restarted.document("crash.items:marker"), 300, 0.2, "the end-of-stream marker")

    # The marker comes last in the partition: everything before it has been read.
    assert live_titles(restarted) == expected, restarted.log_tail(60)
    assert restarted.metric("autoglm_documents") == len(expected) + 1
    # What was durable before the kill is replayed as duplicates, not embedded again
    # (the batch in flight at the kill, at most batch_max changes, may be embedded twice).
    in_flight = Settings().batch_max
    assert restarted.metric("autoglm_documents_embedded_total") <= EVENTS + 1 - applied_before_kill + in_flight
    hits = restarted.search_ids("item revision", mode="bm25", k=100)
    assert all(doc_id in expected or doc_id == "crash.items:marker" for doc_id in hits)


def test_a_restored_or_rebuilt_data_dir_reads_from_where_its_own_index_ends(broker, start_worker, tmp_path):
    """The consumer group's Kafka offset is past the backup, or past everything for an index
    rebuilt from nothing: resuming there would silently skip what the index never applied."""
    topic = "cdc.restore.items"
    ensure_topics(broker, [topic], partitions=1)
    first_half, state_at_backup = scripted_events(EVENTS // 2)
    events, expected = scripted_events()
    data_dir, backup = tmp_path / "data", tmp_path / "backup"
    only_this_topic = ["--cdc-topics", r"^cdc\.restore\."]

    worker = start_worker(data_dir, only_this_topic)
    publish_all(broker, topic, first_half)
    wait_until(lambda: live_titles(worker) == state_at_backup, 120, 0.5, "the first half of the stream")
    assert worker.stop() == 0
    shutil.copytree(data_dir, backup)

    worker = start_worker(data_dir, only_this_topic)
    publish_all(broker, topic, events[len(first_half):])
    wait_until(lambda: live_titles(worker) == expected, 120, 0.5, "the second half of the stream")
    assert worker.stop() == 0

    shutil.rmtree(data_dir)
    shutil.copytree(backup, data_dir)
    restored = start_worker(data_dir, only_this_topic)
    assert_comes_to_serve(restored, expected, 120)
    assert restored.metric("autoglm_documents") == len(expected)
    # Only the second half is read again, not the part the backup already holds.
    read_again = restored.metric("autoglm_events_received_total")
    assert 0 < read_again <= len(events) - len(first_half)

    assert restored.stop() == 0
    shutil.rmtree(data_dir)
    rebuilt = start_worker(data_dir, only_this_topic)
    assert_comes_to_serve(rebuilt, expected, 180)
    assert rebuilt.metric("autoglm_events_received_total") == len(events)


@pytest.mark.slow
def test_a_source_reset_under_the_index_is_read_again_from_its_start(tmp_path):
    """The embedded broker starts empty after a restart while the index's manifest still holds
    the old offsets: new events at offsets below them used to be skipped, without a word."""
    topic, only_this_topic = "cdc.reset.items", ["--cdc-topics", r"^cdc\.reset\."]
    data_dir = tmp_path / "data"
    before_reset, live_before_reset = scripted_events(30)
    with EmbeddedBroker() as first:
        ensure_topics(first.address, [topic], partitions=1)
        worker = WorkerProcess(first.address, data_dir, tmp_path / "first.log", only_this_topic).wait_healthy()
        publish_all(first.address, topic, before_reset)
        wait_until(lambda: worker.metric("autoglm_documents") == len(live_before_reset), 120, 0.2,
                   "the events before the reset")
        assert worker.stop() == 0

    after_reset = [change_event("c", "crash", "items", {"id": f"new{n}"},
                                after={"id": f"new{n}", "title": f"after the reset {n}"}, lsn=100 + n)
                   for n in range(5)]
    with EmbeddedBroker() as second:
        ensure_topics(second.address, [topic], partitions=1)
        worker = WorkerProcess(second.address, data_dir, tmp_path / "second.log", only_this_topic).wait_healthy()
        try:
            publish_all(second.address, topic, after_reset)
            for n in range(5):
                wait_until(lambda: worker.document(f"crash.items:new{n}"), 60, 0.2,
                           f"event {n} after the reset; log:\n{worker.log_tail(30)}")
            log = worker.log_path.read_text()
            assert f"{topic}:0" in log and "reset" in log and "offset 30" in log, worker.log_tail(30)
            assert worker.metric("autoglm_documents") == len(live_before_reset) + len(after_reset)
        finally:
            worker.stop()
