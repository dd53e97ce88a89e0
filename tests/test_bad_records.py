"""Bad records through the real broker and worker: whatever is wrong with a record, and however
large it is, it ends up in autoglm.dlq exactly once and the records after it are indexed."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest
from hypothesis import assume, given, settings, strategies as st

from autoglm.debezium import change_event, producer
from autoglm.topics import DEAD_LETTERS, ensure_topics
from search.protocol import RefusedChanges
from streams.cdc import isolate_culprits
from tests.conftest import WorkerProcess, read_topic, wait_until

PREFIX = "cdc.badrec"
LARGE = 5_000_000
REFERENCE_BYTES = 65_536


@pytest.fixture(scope="module")
def worker(broker, tmp_path_factory):
    root = tmp_path_factory.mktemp("badrec")
    running = WorkerProcess(broker, root / "data", root / "worker.log", ["--cdc-topics", rf"^{PREFIX}\."])
    yield running.wait_healthy()
    running.stop()


def publish_in_order(broker: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """One record per batch, so that record i sits at offset i; allows records of 6 MB."""
    ensure_topics(broker, [topic], partitions=1)
    kafka = producer(broker, **{"message.max.bytes": 6_000_000})
    for key, value in records:
        kafka.produce(topic, key=key, value=value)
        kafka.flush(30)


def good(table: str, pk: int, lsn: int) -> tuple[bytes, bytes]:
    return change_event("c", "badrec", table, {"id": pk}, after={"id": pk, "title": f"good {pk}"}, lsn=lsn)


def dead_letters_of(broker: str, topic: str, at_least: int) -> list[tuple[bytes, bytes, dict]]:
    letters = read_topic(broker, DEAD_LETTERS, lambda _: True, expected=10_000, timeout=5, decode=bytes)
    mine = [letter for letter in letters if letter[2].get("source.topic") == topic]
    assert len(mine) >= at_least, f"{len(mine)} dead letters of {topic}"
    return mine


def wait_for_good(worker: WorkerProcess, table: str, pks) -> None:
    for pk in pks:
        wait_until(lambda: worker.document(f"badrec.{table}:{pk}"), 60, 0.2,
                   f"badrec.{table}:{pk} to be indexed; log:\n{worker.log_tail(30)}")


def test_any_failure_of_a_record_sends_it_to_dead_letters_once_and_later_records_flow(worker, broker):
    """Records that made parsing raise something other than BadEvent used to crash the agent, which
    restarted past them: neither indexed nor dead-lettered. One the index cannot store (a lone
    surrogate in its title) was retried forever and stopped the partition."""
    topic, table = f"{PREFIX}.mixed", "mixed"
    _, bad_ts = change_event("c", "badrec", table, {"id": 100}, after={"id": 100, "title": "bad ts"},
                             lsn=2, ts_ms="abc")
    _, shell = change_event("c", "badrec", table, {"id": 101}, after={"id": 101, "title": "deep", "x": "NEST"},
                            lsn=4)
    deep = shell.replace(b'"NEST"', b"[" * 100_000 + b"]" * 100_000)
    _, unstorable = change_event("c", "badrec", table, {"id": 102}, after={"id": 102, "title": "lone \ud800"},
                                 lsn=6)
    records = [good(table, 1, 1), (b'{"id": 100}', bad_ts), good(table, 2, 3), (b'{"id": 101}', deep),
               good(table, 3, 5), (b'{"id": 102}', unstorable), good(table, 4, 7)]
    bad_offsets = {1, 3, 5}
    publish_in_order(broker, topic, records)

    wait_for_good(worker, table, [1, 2, 3, 4])
    letters = dead_letters_of(broker, topic, len(bad_offsets))
    assert sorted(int(headers["source.offset"]) for _, _, headers in letters) == sorted(bad_offsets)
    for key, value, headers in letters:
        original_key, original_value = records[int(headers["source.offset"])]
        assert (key, value) == (original_key, original_value)
        assert headers["error"] and headers["source.partition"] == "0"
    assert all(worker.document(f"badrec.{table}:{pk}") is None for pk in (100, 101, 102))
    assert worker.client.get("/healthz").status_code == 200


def test_a_record_too_large_for_the_dead_letter_topic_is_dead_lettered_as_a_reference(worker, broker):
    """A 5 MB invalid record's dead letter was larger than the producer accepts; its send was
    retried forever and nothing after it on the partition was indexed."""
    topic, table = f"{PREFIX}.large", "large"
    key, value = b'{"id": "huge"}', b"{" + b"x" * (LARGE - 1)
    publish_in_order(broker, topic, [(key, value), good(table, 1, 1)])

    wait_for_good(worker, table, [1])
    [(letter_key, letter_value, headers)] = dead_letters_of(broker, topic, 1)
    assert headers["error"].startswith("invalid JSON in value")
    assert headers["source.offset"] == "0" and headers["source.partition"] == "0"
    assert letter_key == key and letter_value == value[:REFERENCE_BYTES]
    assert headers["original.value.size"] == str(LARGE)
    assert headers["original.value.sha256"] == hashlib.sha256(value).hexdigest()
    assert headers["original.key.size"] == str(len(key))
    assert headers["original.key.sha256"] == hashlib.sha256(key).hexdigest()


@pytest.mark.slow
def test_a_dead_letter_the_producer_refuses_as_too_large_is_sent_as_a_reference(broker, start_worker):
    """With the configured limit above what the producer accepts (1 MB), the refusal itself
    turns the dead letter into a reference instead of a send retried forever."""
    topic, table = "cdc.refused.refused", "refused"  # not the module worker's: one worker reads it
    value = json.dumps({"not": "an envelope", "padding": "p" * 1_500_000}).encode()
    worker = start_worker(extra_args=["--cdc-topics", r"^cdc\.refused\.",
                                      "--dead-letter-max-bytes", "20000000"])
    publish_in_order(broker, topic, [(b"k", value), good(table, 1, 1)])

    wait_for_good(worker, table, [1])
    [(_, letter_value, headers)] = dead_letters_of(broker, topic, 1)
    assert headers["error"].startswith("not a Debezium change event envelope")
    assert letter_value == value[:REFERENCE_BYTES] and headers["original.value.size"] == str(len(value))


def is_platform(exc: BaseException) -> bool:
    return isinstance(exc, OSError)


def failure_of(apply, items):
    try:
        asyncio.run(apply(items))
    except Exception as exc:
        return exc
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_a_batch_the_sink_fails_on_is_bisected_down_to_the_changes_that_fail_alone(poisoned):
    """Every change the sink fails on is blamed with the exception it raised; every other one is applied."""
    assume(any(poisoned))
    applied = []

    async def apply(part):
        if any(poisoned[i] for i in part):
            raise ValueError(f"cannot store {next(i for i in part if poisoned[i])}")
        applied.extend(part)

    items = list(range(len(poisoned)))
    culprits = asyncio.run(isolate_culprits(items, failure_of(apply, items), apply, lambda i: None, is_platform))
    assert culprits == [(i, f"ingest failed: ValueError: cannot store {i}") for i in items if poisoned[i]]
    assert sorted(set(applied)) == [i for i in items if not poisoned[i]]


def test_isolation_blames_what_the_index_refused_and_stops_at_a_platform_failure():
    refused = RefusedChanges({"doc:2": "mapper_parsing_exception"})
    culprits = asyncio.run(isolate_culprits(["doc:1", "doc:2"], refused, None, lambda doc_id: doc_id, is_platform))
    assert culprits == [("doc:2", "index refused the change: mapper_parsing_exception")]

    async def disk_full(part):
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError):
        asyncio.run(isolate_culprits([1, 2, 3], ValueError("bug"), disk_full, lambda i: None, is_platform))
