"""Shared fixtures: a real embedded broker, real worker processes, real index files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import hashlib
from pathlib import Path
from typing import Callable

import httpx
import pytest

from autoglm.broker import EmbeddedBroker, free_port
from autoglm.metrics import sample_value
from autoglm.process import die_with_parent
from autoglm.topics import ensure_topics
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


class WorkerProcess:
    """`autoglm worker` as a subprocess, with an HTTP client for its API."""

    def __init__(self, broker: str, data_dir: Path, log_path: Path, extra_args: list[str] = ()):
        self.broker, self.data_dir, self.log_path = broker, data_dir, log_path
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.api, timeout=30)
        command = [sys.executable, "-m", "roles.cli", "worker", "--broker", broker,
                   "--data-dir", str(data_dir), "--api-port", str(self.port),
                   "--group-id", group_for(data_dir), *extra_args]
        self.log = open(log_path, "ab")
        # Dies with the test process: a fixture that fails half-way must not leave a worker behind.
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                        preexec_fn=die_with_parent)

    def wait_healthy(self, timeout: float = 120.0) -> "WorkerProcess":
        def healthy():
            if self.process.poll() is not None:
                pytest.fail(f"worker exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(healthy, timeout, 0.2, "worker health")
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def document(self, doc_id: str) -> dict | None:
        response = self.client.get(f"/documents/{doc_id}")
        return response.json() if response.status_code == 200 else None

    def search_ids(self, query: str, mode: str = "hybrid", k: int = 10) -> list[str]:
        response = self.client.get("/search", params={"q": query, "mode": mode, "k": k})
        response.raise_for_status()
        return [hit["id"] for hit in response.json()["hits"]]

    def metric(self, name: str, **labels: str) -> float:
        return sample_value(self.client.get("/metrics").text, name, **labels)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        self.log.close()
        return self.process.returncode


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
