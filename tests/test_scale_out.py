"""Scale out (issue 10): 3 ingest, 2 serve and 2 learn processes on one broker, one Elasticsearch
(the emulator, or AUTOGLM_ES_URL) and one MLflow server, as a deployment runs them.

The tests run in file order on one cluster, each on data of its own:
1. 5,000 CDC changes (inserts, updates, deletes) over 6 partitions while one ingest worker is
   killed with SIGKILL: the other two take its partitions and the index equals the source;
2. both serve replicas answer every probe identically;
3. an alias moved in MLflow is served by both replicas within 2 s by webhook, and within one
   poll interval once the webhooks are gone;
4. feedback through both replicas lands in one window that is trained exactly once;
5. the active learner is killed mid-window: the standby takes over within 30 s and the next
   training includes the examples stored before the kill.
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
import torch

from autoglm.broker import EmbeddedBroker
from autoglm.debezium import change_event, producer
from autoglm.encoder import Encoder
from autoglm.topics import ensure_topics
from registry.models import CHALLENGER, CHAMPION, ModelRegistry, version_uri
from registry.server import MlflowServer
from roles.harness import RoleProcess
from tests.conftest import wait_until

pytestmark = pytest.mark.slow

PARTITIONS = 6
CHANGES = 5000
WINDOW = 6
POLL_S = 5.0
NAME = f"scale-{uuid.uuid4().hex[:8]}"
TOPIC = f"cdc.{NAME}.public.items"


class Cluster:
    def __init__(self, broker: str, es_url: str, mlflow_url: str, work):
        from elasticsearch import Elasticsearch

        self.es = Elasticsearch(es_url, request_timeout=30)
        self.registry = ModelRegistry(mlflow_url)
        common = ["--index", "elasticsearch", "--es-url", es_url, "--es-index", NAME,
                  "--group-id", f"{NAME}-ingest", "--learn-group-id", f"{NAME}-learn", "--mlflow-uri", mlflow_url]
        role = lambda kind, n, *args: RoleProcess(kind, broker, work / f"{kind}{n}", work / f"{kind}{n}.log",
                                                  [*common, *args])
        self.ingest = [role("ingest", n, "--cdc-topics", rf"^cdc\.{NAME}\.") for n in range(3)]
        self.serve = [role("serve", n, "--alias-poll", str(POLL_S)) for n in range(2)]
        self.learn = [role("learn", n, "--window-size", str(WINDOW), "--train-seconds", "20",
                           "--alias-poll", str(POLL_S)) for n in range(2)]
        self.processes = [*self.ingest, *self.serve, *self.learn]

    def active_learners(self) -> list[RoleProcess]:
        return [p for p in self.learn if p.process.poll() is None and (p.health() or {}).get("active")]

    def search(self, replica: RoleProcess, query: str, session: str) -> dict:
        return replica.get_json("/search", q=query, k=5, session=session)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.es.close()


@pytest.fixture(scope="module")
def cluster(es_url, tmp_path_factory):
    work = tmp_path_factory.mktemp("scale")
    mlflow = MlflowServer(work / "mlflow").start()
    with EmbeddedBroker(log_file=work / "broker.log") as broker:
        ensure_topics(broker.address, [TOPIC], partitions=PARTITIONS)
        cluster = Cluster(broker.address, es_url, mlflow.url, work)
        try:
            for process in cluster.processes:
                process.wait_healthy(300)
            wait_until(lambda: len(cluster.active_learners()) == 1, 60, 0.5, "one learner to be active")
            cluster.broker = broker.address
            yield cluster
        finally:
            cluster.stop()
            mlflow.stop()


def source_changes(seed: int = 7) -> tuple[list[tuple[bytes, bytes]], dict[str, str]]:
    """CHANGES changes on live rows only, as a database emits them, and the final live titles."""
    rng, live, changes, lsn = random.Random(seed), {}, [], 1000
    for n in range(CHANGES):
        lsn += 1
        roll = rng.random()
        if not live or roll < 0.5:
            pk = len(changes)
            op, after = "c", {"id": pk, "title": f"item {pk} first", "body": f"scaleword{pk} shared text"}
        elif roll < 0.86:
            pk = rng.choice(list(live))
            op, after = "u", {"id": pk, "title": f"item {pk} update {n}", "body": f"scaleword{pk} shared text"}
        else:
            pk = rng.choice(list(live))
            op, after = "d", None
        before = None if op == "c" else {"id": pk}
        changes.append(change_event(op, "public", "items", {"id": pk}, after=after, before=before, lsn=lsn))
        if after:
            live[pk] = after["title"]
        else:
            del live[pk]
    return changes, {f"public.items:{pk}": title for pk, title in live.items()}


def indexed_titles(cluster: Cluster) -> dict[str, str]:
    from elasticsearch.helpers import scan

    cluster.es.indices.refresh(index=NAME)
    query = {"query": {"term": {"deleted": False}}, "_source": ["title"]}
    return {hit["_id"]: hit["_source"]["title"] for hit in scan(cluster.es, index=NAME, query=query)}


def test_ingest_workers_share_partitions_and_survive_a_kill(cluster):
    changes, expected = source_changes()
    kafka = producer(cluster.broker)
    victim = cluster.ingest[0]
    for start in range(0, CHANGES, 500):
        for key, value in changes[start:start + 500]:
            kafka.produce(TOPIC, key=key, value=value)
        kafka.flush(30)
        if start == 1500:  # mid-stream, once the victim has applied some of its share
            wait_until(lambda: victim.metric("autoglm_events_total", outcome="applied") > 0, 120, 0.2,
                       "the victim to apply changes")
            victim.kill()
        time.sleep(0.5)
    survivors = cluster.ingest[1:]

    def converged():
        return indexed_titles(cluster) == expected

    wait_until(converged, 300, 2.0, "the index to equal the source")
    found = indexed_titles(cluster)
    assert len(found) == len(expected)  # 0 lost, 0 ghosts, every title the newest
    assert all(p.process.poll() is None for p in survivors)
    assert sum(p.metric("autoglm_events_total", outcome="applied") for p in survivors) > 0


def test_serve_replicas_answer_every_probe_identically(cluster):
    probes = [f"scaleword{pk} shared text" for pk in range(0, 3000, 97)] + ["item update", "shared text"]

    def answers(replica):
        return [[(hit["id"], round(hit["score"], 5)) for hit in cluster.search(replica, q, "probe")["hits"]]
                for q in probes]

    first, second = (answers(replica) for replica in cluster.serve)
    assert first == second and any(first)
    versions = {cluster.search(replica, "shared text", "probe")["model_version"] for replica in cluster.serve}
    assert len(versions) == 1
    models = [replica.get_json("/models") for replica in cluster.serve]
    assert models[0] == models[1]


def register_version(registry: ModelRegistry, seed: int) -> str:
    """A registered version whose weights differ a little from the base model's."""
    state = Encoder().model.state_dict()
    layer = "encoder.layer.5.output.dense.weight"
    state[layer] = state[layer] + 0.05 * torch.randn(state[layer].shape, generator=torch.Generator().manual_seed(seed))
    run_id = registry.log_training({"lr": 1e-5}, [1.0], {}, {"parent_version": "base", "request": f"fixture-{seed}"},
                                   state)
    return registry.register(run_id, {"gate": "passed", "fixture": str(seed)})


def served_by_both(cluster: Cluster, version: str) -> bool:
    """Both replicas embed queries with ``version`` (a dense search: no BM25 or fusion to wait for)."""
    return all(replica.get_json("/search", q="shared text", k=1, mode="dense", log="false",
                                session="probe")["model_version"] == version_uri(version)
               for replica in cluster.serve)


def loaded_as_challenger(cluster: Cluster, version: str) -> bool:
    return all(replica.metric("autoglm_serving_version", arm=CHALLENGER, version=version_uri(version)) == 1
               for replica in cluster.serve)


def promotion_seconds(cluster: Cluster, version: str, timeout: float) -> float:
    """Seconds from moving the champion alias to ``version`` to both replicas serving it; the
    version is the challenger first, as in the usual flow, so this is the alias, not a download."""
    cluster.registry.set_alias(CHALLENGER, version)
    wait_until(lambda: loaded_as_challenger(cluster, version), 120, 0.2, f"version {version} to load")
    started = time.monotonic()
    cluster.registry.set_alias(CHAMPION, version)
    wait_until(lambda: served_by_both(cluster, version), timeout + 5, 0.05, f"both replicas to serve {version}")
    seconds = time.monotonic() - started
    assert seconds <= timeout, f"both replicas served version {version} after {seconds:.2f} s, not {timeout} s"
    return seconds


def test_an_alias_move_reaches_both_replicas_by_webhook_and_by_polling(cluster):
    by_webhook = promotion_seconds(cluster, register_version(cluster.registry, 1), 2.0)
    client = cluster.registry.client
    ours = [hook for hook in client.list_webhooks() if hook.name.startswith("autoglm-serving-")]
    assert len(ours) == 2 and len({hook.url for hook in ours}) == 2  # one per replica, at its own URL
    for hook in ours:  # deliveries lost: polling must carry the next move
        client.delete_webhook(hook.webhook_id)
    by_polling = promotion_seconds(cluster, register_version(cluster.registry, 2), POLL_S + 1.0)
    print(f"\nalias move to both replicas: webhook {by_webhook:.2f} s, polling {by_polling:.2f} s "
          f"(poll every {POLL_S:.0f} s)")
    cluster.registry.delete_alias(CHALLENGER)


def give_feedback(cluster: Cluster, replica: RoleProcess, pk: int) -> str:
    """A search and a click on its top hit through ``replica``, from a session of its own; the query id."""
    session = f"user-{uuid.uuid4().hex[:8]}"
    answer = cluster.search(replica, f"scaleword{pk} shared text", session)
    top = answer["hits"][0]
    status = replica.post_json("/feedback", {"event_id": str(uuid.uuid4()), "query_id": answer["query_id"],
                                             "doc_id": top["id"], "type": "click", "position": 1,
                                             "session_id": session})
    assert status == 202
    return answer["query_id"]


def runs_for(cluster: Cluster, window: int) -> list:
    experiment = cluster.registry.client.get_experiment_by_name("autoglm-training")
    if experiment is None:
        return []
    return [run for run in cluster.registry.client.search_runs([experiment.experiment_id])
            if str(window) in run.data.tags.get("lineage.request", "").removeprefix("windows-").split(",")
            and run.data.tags.get("autoglm.decision")]


def window_query_ids(cluster: Cluster, window: int) -> set[str]:
    found = cluster.es.options(ignore_status=404).get(index=f"{NAME}-windows", id=str(window)).body
    if not found.get("found"):
        return set()
    docs = cluster.es.mget(index=f"{NAME}-examples", ids=found["_source"]["kept_ids"])["docs"]
    return {doc["_source"]["body"]["query_id"] for doc in docs if doc.get("found")}


def pending_examples(cluster: Cluster) -> int:
    cluster.es.indices.refresh(index=f"{NAME}-examples")
    return cluster.es.count(index=f"{NAME}-examples", query={"term": {"window_id": 0}})["count"]


def live_ids(cluster: Cluster) -> list[int]:
    return sorted(int(doc_id.rsplit(":", 1)[1]) for doc_id in indexed_titles(cluster))


def test_feedback_through_both_replicas_is_one_window_trained_once(cluster):
    pks = live_ids(cluster)[:WINDOW]
    query_ids = {give_feedback(cluster, cluster.serve[n % 2], pk) for n, pk in enumerate(pks)}
    wait_until(lambda: runs_for(cluster, 1), 300, 1.0, "window 1 to be trained")
    assert window_query_ids(cluster, 1) == query_ids
    time.sleep(10)  # a second training of the same window would show by now
    [run] = runs_for(cluster, 1)
    assert run.data.tags["lineage.examples"] == str(WINDOW)
    logs = "".join(p.log_path.read_text(errors="replace") for p in cluster.learn)
    assert "another worker's request" not in logs


def test_the_standby_learner_takes_over_mid_window_and_trains_it(cluster):
    [active] = cluster.active_learners()
    [standby] = [p for p in cluster.learn if p is not active]
    pks = live_ids(cluster)[WINDOW:2 * WINDOW]
    half = WINDOW // 2
    before_kill = {give_feedback(cluster, cluster.serve[n % 2], pk) for n, pk in enumerate(pks[:half])}
    wait_until(lambda: pending_examples(cluster) == half, 60, 0.5, "the first half of window 2 to be stored")
    active.kill()
    killed_at = time.monotonic()
    wait_until(lambda: cluster.active_learners() == [standby], 30, 0.2, "the standby to become active")
    takeover = time.monotonic() - killed_at
    after_kill = {give_feedback(cluster, cluster.serve[n % 2], pk) for n, pk in enumerate(pks[half:])}
    wait_until(lambda: runs_for(cluster, 2), 300, 1.0, "window 2 to be trained by the new active learner")
    assert window_query_ids(cluster, 2) == before_kill | after_kill
    [run] = runs_for(cluster, 2)
    assert "2" in run.data.tags["lineage.windows"].split(",")
    assert int(run.data.tags["lineage.examples"]) >= WINDOW
    if run.data.tags["autoglm.decision"] == "passed":
        [version] = [v for v in cluster.registry.versions() if v["run_id"] == run.info.run_id]
        assert "2" in version["tags"]["windows"].split(",")
    trained = sum(standby.metric("autoglm_trainings_total", outcome=o) for o in ("registered", "rejected"))
    assert trained == 1  # the new active learner trained it, once
    print(f"\nlearner failover: standby active {takeover:.1f} s after the kill")
