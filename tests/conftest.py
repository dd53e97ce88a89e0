"""Shared fixtures: a real embedded broker, real worker processes, real index files."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import pytest

from autoglm.broker import EmbeddedBroker
from autoglm.topics import ensure_topics
from roles.harness import RoleProcess
from tests.es_server import elasticsearch_url

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05,
               message: str = "condition"):
    """Poll until condition() is truthy and return its value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


def group_for(data_dir: Path) -> str:
    """One consumer group per data dir: a restarted worker resumes, other workers stay apart."""
    return "test-" + hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as running:
        yield running.address


@pytest.fixture(scope="session")
def es_url(tmp_path_factory):
    """An Elasticsearch URL shared by the session: $AUTOGLM_ES_URL, else an emulator (tests/es_server.py)."""
    with elasticsearch_url(tmp_path_factory.mktemp("elasticsearch")) as url:
        yield url


class WorkerProcess(RoleProcess):
    """`autoglm worker` in the consumer group of its data dir (group_for), through the one harness."""

    def __init__(self, broker: str, data_dir: Path, log_path: Path, extra_args: list[str] = ()):
        super().__init__("worker", broker, data_dir, log_path, ["--group-id", group_for(data_dir), *extra_args])


@pytest.fixture
def start_worker(broker, tmp_path):
    """Factory: start a worker (on a data dir, default a fresh one); all are stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(data_dir: Path | None = None, extra_args: list[str] = (), healthy: bool = True) -> WorkerProcess:
        data = data_dir or tmp_path / f"data{len(started)}"
        worker = WorkerProcess(broker, data, tmp_path / f"worker{len(started)}.log", list(extra_args))
        started.append(worker)
        return worker.wait_healthy() if healthy else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def publish(broker):
    """Publish (key, value) byte pairs to a topic and wait for delivery."""
    from autoglm.debezium import producer

    kafka = producer(broker)

    def send(topic: str, key: bytes | None, value: bytes | None) -> None:
        kafka.produce(topic, key=key, value=value)
        kafka.flush(10)

    yield send
    kafka.flush(10)


def fresh_topic(broker: str, name: str) -> str:
    ensure_topics(broker, [name], partitions=1)
    return name


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def read_topic(broker: str, topic: str, match: Callable[[object], bool], expected: int,
               timeout: float = 20.0, decode: Callable[[bytes], object] = json.loads) -> list:
    """Records of a topic (from the beginning, every partition) whose decoded value matches,
    as (key, value, headers) tuples, once `expected` of them arrived or timeout passed."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker, "group.id": "test-reader", "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found, deadline = [], time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            try:  # other tests share the broker and its topics: skip records this reader cannot read
                value = decode(message.value()) if message.value() is not None else None
                wanted = match(value)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            if wanted:
                headers = {name: raw.decode() for name, raw in message.headers() or []}
                found.append((message.key(), value, headers))
    finally:
        consumer.close()
    return found
