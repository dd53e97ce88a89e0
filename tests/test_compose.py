"""docker-compose.yml, validated by Debian's docker-compose (`config` needs no engine) and read
back for what a running stack depends on: each role (`ingest`, `serve`, `learn`) runs its own
command bound to the container's network, `ingest` and `serve` can scale, `learn` has a standby,
MLflow accepts the roles' calls and their webhooks, Prometheus scrapes every replica, nginx
fronts every `serve` replica, Kafka has a partition for every ingest replica, and what must
survive a restart is on a named volume. No Docker engine runs here: the stack is not started."""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def text(command: str | list[str]) -> str:
    return command if isinstance(command, str) else " ".join(command)


def argv(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(args: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value`, else None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume, in either the short or the long syntax of `config`."""
    pairs = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            pairs.append((str(volume.get("source", "")), volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            pairs.append((source, target))
    return pairs


def replicas(service: dict) -> int:
    return int((service.get("deploy") or {}).get("replicas", service.get("scale", 1)))


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def nginx_version(image: str) -> tuple[int, ...]:
    match = re.match(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?", image)
    assert match, f"api should run a versioned nginx image, not {image}"
    return tuple(int(part or 0) for part in match.groups())


@pytest.fixture(scope="module")
def compose() -> dict:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: `make test` installs Debian's package")
    result = subprocess.run(["docker-compose", "--env-file", "deploy/autoglm.env.example", "config"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def roles(services) -> dict[str, str]:
    """Service name -> the autoglm role it runs, for every service that runs one."""
    return {name: args[1] for name, service in services.items()
            if (args := argv(service))[:1] == ["autoglm"] and len(args) > 1}


def test_every_service_has_an_image_and_a_healthcheck(services):
    assert set(services) == {"kafka", "postgres", "connect", "connect-init", "elasticsearch", "mlflow-db", "mlflow",
                             "ingest", "serve", "learn", "learn-standby", "api", "prometheus"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert service["healthcheck"]["test"], name
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert "KAFKA_PROCESS_ROLES" in services["kafka"]["environment"]  # KRaft, no ZooKeeper
    assert "wal_level=logical" in services["postgres"]["command"]
    assert services["elasticsearch"]["environment"]["discovery.type"] == "single-node"
    assert "postgresql://" in text(services["mlflow"]["command"])


def test_services_start_in_dependency_order(services):
    def needs(name: str) -> dict:
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    healthy = "service_healthy"
    assert needs("connect") == {"kafka": healthy, "postgres": healthy}
    assert needs("connect-init") == {"connect": healthy}
    assert needs("mlflow") == {"mlflow-db": healthy}
    assert needs("ingest") == {"kafka": healthy, "elasticsearch": healthy, "connect-init": healthy}
    for name in ("serve", "learn", "learn-standby"):
        assert needs(name) == {"kafka": healthy, "elasticsearch": healthy, "mlflow": healthy}, name
    assert needs("api") == {"serve": healthy}


def test_each_role_runs_its_command_on_the_containers_network(services, roles):
    assert roles == {"ingest": "ingest", "serve": "serve", "learn": "learn", "learn-standby": "learn"}
    es_indexes = set()
    for name in roles:
        args = argv(services[name])
        # a role bound to 127.0.0.1 answers nobody outside its container: not nginx, not Prometheus, not MLflow
        assert option(args, "--host") == "0.0.0.0", name
        assert option(args, "--port") == "8000", name
        assert option(args, "--broker") == "kafka:9092", name
        assert option(args, "--index") == "elasticsearch", name
        assert option(args, "--es-url") == "http://elasticsearch:9200", name
        assert "localhost:8000/healthz" in text(services[name]["healthcheck"]["test"]), name
        es_indexes.add(option(args, "--es-index"))
        if roles[name] != "ingest":
            assert option(args, "--mlflow-uri") == "http://mlflow:5000", name
    assert len(es_indexes) == 1  # ingest writes the alias that serve and learn read


def test_ingest_and_serve_scale_out(services):
    for name in ("ingest", "serve"):
        service = services[name]
        # replicas would clash on a fixed host port, container name or hostname
        assert "ports" not in service, name
        assert "container_name" not in service, name
        assert "hostname" not in service, name
        assert service.get("network_mode") != "host", name
        assert replicas(service) >= 2, name


def test_learn_has_a_standby(services, roles):
    learners = [name for name, role in roles.items() if role == "learn"]
    assert sum(replicas(services[name]) for name in learners) >= 2


def test_mlflow_accepts_the_host_names_it_is_called_by(services, roles):
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    mlflow = services["mlflow"]
    allowed = (option(argv(mlflow), "--allowed-hosts") or environment(mlflow).get("MLFLOW_SERVER_ALLOWED_HOSTS"))
    allowed_hosts = [host.strip() for host in allowed.split(",")] if allowed else get_default_allowed_hosts()
    callers = {urlsplit(option(argv(services[name]), "--mlflow-uri")).netloc
               for name in roles if option(argv(services[name]), "--mlflow-uri")}
    assert callers == {"mlflow:5000"}
    for host in callers | {"mlflow", "localhost:5000"}:  # the roles, and a browser on the published port
        assert is_allowed_host_header(allowed_hosts, host), f"MLflow would answer Host {host} with 403"


def test_mlflow_accepts_a_webhook_at_each_serve_replica(services, monkeypatch):
    from cryptography.fernet import Fernet
    from mlflow.utils.validation import _validate_webhook_url

    serve, mlflow = services["serve"], services["mlflow"]
    args = argv(serve)
    # Without --advertise-url a replica on a wildcard host advertises its container hostname, which
    # is its own (no `hostname:` shared by every replica) and resolves from MLflow's container.
    assert "hostname" not in serve and option(args, "--host") == "0.0.0.0"
    assert set(serve.get("networks") or {"default"}) & set(mlflow.get("networks") or {"default"})
    advertised = option(args, "--advertise-url") or f"http://3f2a9c1b7d4e:{option(args, '--port')}"
    assert not is_loopback(urlsplit(advertised).hostname), f"{advertised} would point MLflow at itself"
    for name, service in services.items():  # no URL a service is given points inside its own container
        for value in argv(service) + list(environment(service).values()):
            if "://" in value:
                assert not is_loopback(urlsplit(value).hostname or ""), f"{name}: {value}"
    env = environment(mlflow)
    Fernet(env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"].encode())  # a valid key, the same for every worker
    for key in ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"):
        if key in env:
            monkeypatch.setenv(key, env[key])
        else:
            monkeypatch.delenv(key, raising=False)
    _validate_webhook_url(f"{advertised}/hooks/mlflow")  # MLflow's own check when a replica registers


def test_every_service_restarts_and_has_resource_limits(services):
    for name, service in services.items():
        deploy = service.get("deploy") or {}
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"} or "restart_policy" in deploy, name
        limits = (deploy.get("resources") or {}).get("limits") or {}
        assert limits.get("memory") or service.get("mem_limit"), name
        assert float(limits.get("cpus") or service.get("cpus") or 0) > 0, name


def test_prometheus_scrapes_every_replica_of_every_role(services, roles):
    prometheus = services["prometheus"]
    assert (str(REPO / "deploy" / "prometheus.yml"), "/etc/prometheus/prometheus.yml") in mounts(prometheus)
    jobs = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    static_hosts = {target.rsplit(":", 1)[0] for job in jobs for group in job.get("static_configs", [])
                    for target in group["targets"]}
    # one static target for a scaled service is one random replica per scrape (or nginx's)
    assert not static_hosts & (set(roles) | {"api"})
    covered = {}
    for job in jobs:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type") == "A", job["job_name"]  # one address per replica
            for name in sd["names"]:
                covered.setdefault(name, []).append((job["job_name"], sd["port"]))
    for name in roles:
        assert len(covered.get(name, [])) == 1, f"{name} scraped by {covered.get(name)}"
        (job_name, port), = covered[name]
        assert job_name == roles[name] and str(port) == option(argv(services[name]), "--port"), name
    assert ("prometheus-data", "/prometheus") in mounts(prometheus)


def test_kafka_has_a_partition_for_every_ingest_replica(services):
    kafka = environment(services["kafka"])
    partitions = int(kafka["KAFKA_NUM_PARTITIONS"])
    assert kafka.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true") == "true"  # Debezium's topics get that count
    header = (REPO / "docker-compose.yml").read_text().split("\nservices:")[0]
    documented = [int(n) for n in re.findall(r"--scale ingest=(\d+)", header)]
    assert documented, "the header should tell how to scale ingest"
    for count in documented + [replicas(services["ingest"])]:
        assert count <= partitions, f"{count} ingest replicas, {partitions} partitions: the rest idle"


def test_nginx_fronts_every_serve_replica(services):
    api = services["api"]
    assert (str(REPO / "deploy" / "nginx.conf"), "/etc/nginx/conf.d/default.conf") in mounts(api)
    assert nginx_version(api["image"]) >= (1, 27, 3)  # `server ... resolve` in open-source nginx
    conf = re.sub(r"#.*", "", (REPO / "deploy" / "nginx.conf").read_text())
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\b", conf, re.M), "Docker's DNS finds new replicas"
    upstream = re.search(r"upstream\s+(\S+)\s*\{([^}]*)\}", conf)
    assert upstream, "nginx should balance over an upstream"
    name, body = upstream.groups()
    serve_port = option(argv(services["serve"]), "--port")
    assert re.search(rf"^\s*server\s+serve:{serve_port}\b[^;]*\bresolve\b", body, re.M)
    assert re.search(r"^\s*zone\s", body, re.M)  # `resolve` needs a shared zone
    assert re.search(rf"location\s+/\s*\{{[^}}]*proxy_pass\s+http://{re.escape(name)}\s*;", conf)


def test_what_must_survive_is_on_named_volumes(compose, services, roles):
    expected = {"kafka": "/var/lib/kafka/data", "postgres": "/var/lib/postgresql/data",
                "elasticsearch": "/usr/share/elasticsearch/data", "mlflow-db": "/var/lib/postgresql/data",
                "mlflow": option(argv(services["mlflow"]), "--artifacts-destination"), "prometheus": "/prometheus"}
    expected |= {name: option(argv(services[name]), "--data-dir") for name, role in roles.items() if role == "learn"}
    named = set(compose.get("volumes") or {})
    owners: dict[str, str] = {}
    for name, target in expected.items():
        sources = [source for source, mounted in mounts(services[name]) if mounted == target]
        assert sources and sources[0] in named, f"{name}: {target} is not on a named volume"
        assert owners.setdefault(sources[0], name) == name, f"{sources[0]} shared by {owners[sources[0]]} and {name}"


def test_the_image_holds_every_package_and_runs_unprivileged():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY\s+(\S+)\s+\1\s*$", dockerfile, re.M))
    assert {pattern.rstrip("*") for pattern in packages["include"]} <= copied
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"}


def test_the_connector_is_registered(services):
    connector = (REPO / "deploy" / "postgres-connector.json").read_text()
    assert '"connector.class": "io.debezium.connector.postgresql.PostgresConnector"' in connector
    assert "connector.json" in text(services["connect-init"]["entrypoint"])
