"""docker-compose.yml, validated by Debian's docker-compose (`config` needs no engine) and read
back: every service has an image (or this repository's build) and a healthcheck, and starts
only once what it needs is healthy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def text(command: str | list[str]) -> str:
    return command if isinstance(command, str) else " ".join(command)


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make test` installs Debian's package")
    result = subprocess.run(["docker-compose", "--env-file", "deploy/autoglm.env.example", "config"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_every_service_has_an_image_and_a_healthcheck(compose):
    services = compose["services"]
    assert set(services) == {"kafka", "postgres", "connect", "connect-init", "elasticsearch", "mlflow-db", "mlflow",
                             "worker", "api"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert service["healthcheck"]["test"], name
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    assert "wal_level=logical" in services["postgres"]["command"]
    assert services["elasticsearch"]["environment"]["discovery.type"] == "single-node"
    assert "postgresql://" in text(services["mlflow"]["command"])


def test_services_start_in_dependency_order(compose):
    services = compose["services"]

    def needs(name: str) -> dict:
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert needs("connect") == {"kafka": "service_healthy", "postgres": "service_healthy"}
    assert needs("connect-init") == {"connect": "service_healthy"}
    assert needs("mlflow") == {"mlflow-db": "service_healthy"}
    assert needs("worker") == {"kafka": "service_healthy", "elasticsearch": "service_healthy",
                               "mlflow": "service_healthy", "connect-init": "service_healthy"}
    assert needs("api") == {"worker": "service_healthy"}


def test_workers_scale_against_enough_partitions_and_the_connector_is_registered(compose):
    services = compose["services"]
    worker = text(services["worker"]["command"])
    assert "--index elasticsearch" in worker and "--broker kafka:9092" in worker
    assert "ports" not in services["worker"]  # replicas would clash on a host port; the api fronts them
    assert int(services["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"]) >= 3
    connector = (REPO / "deploy" / "postgres-connector.json").read_text()
    assert '"connector.class": "io.debezium.connector.postgresql.PostgresConnector"' in connector
    assert "connector.json" in text(services["connect-init"]["entrypoint"])
