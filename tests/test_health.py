"""/healthz tells which part is down."""

import re
import shutil

from autoglm.broker import EmbeddedBroker
from autoglm.debezium import change_event
from autoglm.topics import ensure_topics
from tests.conftest import WorkerProcess, wait_until


def test_healthz_names_the_broker_when_it_goes_away(tmp_path):
    broker = EmbeddedBroker().start()
    worker = WorkerProcess(broker.address, tmp_path / "data", tmp_path / "worker.log")
    try:
        worker.wait_healthy()
        body = worker.client.get("/healthz").json()
        assert body == {"status": "ok", "components": {"broker": "up", "worker": "up", "index": "up"}}
        broker.stop()
        response = wait_until(lambda: (r := worker.client.get("/healthz")).status_code == 503 and r, 30,
                              0.2, "healthz to report the broker down")
        components = response.json()["components"]
        assert "unreachable" in components["broker"] and components["index"] == "up"
    finally:
        worker.stop()
        broker.stop()


def test_healthz_names_the_step_that_keeps_failing_without_its_exception_text(broker, start_worker, publish):
    """The worker component said which exception a failing step raised, with its text (paths,
    excerpts of records); it now says which step is retrying, since when and how often."""
    topic = "cdc.health.items"
    ensure_topics(broker, [topic], partitions=1)
    worker = start_worker(extra_args=["--cdc-topics", r"^cdc\.health\."])
    publish(topic, *change_event("c", "health", "items", {"id": 1}, after={"id": 1, "title": "first"}, lsn=1))
    wait_until(lambda: worker.document("health.items:1"), 60, 0.2, "the first event")

    manifest = worker.data_dir / "index" / "manifest.json"
    recorded = manifest.read_bytes()
    manifest.unlink()
    manifest.mkdir()  # the index can no longer record its commits: a storage failure
    (manifest / "in-the-way").touch()
    publish(topic, *change_event("c", "health", "items", {"id": 2}, after={"id": 2, "title": "second"}, lsn=2))

    def retrying():
        response = worker.client.get("/healthz")
        return response.status_code == 503 and "attempts" in response.text and response.json()
    body = wait_until(retrying, 30, 0.2, "healthz to report the ingest retrying")
    assert body["components"]["broker"] == "up"
    assert re.fullmatch(r"ingest retrying for \d+ s after \d+ failed attempts \(IsADirectoryError\)",
                        body["components"]["worker"]), body
    assert "Is a directory" in worker.log_path.read_text()  # the log keeps the whole exception

    shutil.rmtree(manifest)
    manifest.write_bytes(recorded)
    wait_until(lambda: worker.document("health.items:2"), 60, 0.2, "the second event once storage works")
    wait_until(lambda: worker.client.get("/healthz").status_code == 200, 10, 0.2, "healthz to recover")
