"""/healthz tells which part is down."""

from autoglm.broker import EmbeddedBroker
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
