"""Serving follows the MLflow aliases: promotion by webhook and by polling, the challenger's
sticky share of traffic, and a version that fails to load (issue 4).

The alias moves are made with MlflowClient against a real `mlflow server`: the same REST call
(POST /api/2.0/mlflow/registered-models/alias) the UI makes when a person edits an alias.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
import torch

from autoglm.encoder import Encoder
from registry.models import CHALLENGER, CHAMPION, ModelRegistry, version_uri
from registry.server import MlflowServer
from registry.webhooks import rejection, signature
from search.embedded import EmbeddedIndex
from search.protocol import Document, Upsert
from search.query import SearchService
from search.serving import ServedModels, sticky_point
from autoglm.debezium import change_event, producer
from autoglm.topics import ensure_topics
from tests.conftest import WorkerProcess, wait_until


class Named:
    """A query encoder stand-in for routing tests: only its version matters there."""

    def __init__(self, version: str):
        self.version = version

    def embed_one(self, text: str) -> np.ndarray:
        return np.ones(384, dtype=np.float32) / np.sqrt(384)


def test_the_challenger_gets_its_share_of_searches_sticky_per_session(tmp_path):
    index = EmbeddedIndex(tmp_path / "index")
    index.write_batch([Upsert(Document(id=f"t.docs:{n}", table="t.docs", title=f"note {n}", text="canary words"),
                              np.eye(384, dtype=np.float32)[n]) for n in range(5)], [])
    index.commit({})
    models = ServedModels(Named("models:/m/1"), Named("models:/m/2"), challenger_share=0.05)
    service = SearchService(index, models)
    arms_by_session: dict[str, set[str]] = {}
    for search in range(4000):
        session = f"session-{search % 1000}"
        result = service.search("canary words", k=3, mode="bm25", session_id=session)
        assert result.model_version == ("models:/m/2" if result.arm == CHALLENGER else "models:/m/1")
        arms_by_session.setdefault(session, set()).add(result.arm)
    assert all(len(arms) == 1 for arms in arms_by_session.values()), "a session changed arms"
    share = sum(CHALLENGER in arms for arms in arms_by_session.values()) / len(arms_by_session)
    assert abs(share - 0.05) <= 0.015, share

    anonymous = [service.search("canary words", k=3, mode="bm25").arm for _ in range(4000)]
    assert abs(anonymous.count(CHALLENGER) / 4000 - 0.05) <= 0.015  # no session: routed by query id

    models.swap(CHALLENGER, None)
    assert {service.search("canary words", mode="bm25", session_id=s).arm for s in arms_by_session} == {CHAMPION}
    index.close()


def test_webhook_signatures_are_checked():
    body, now = b'{"entity": "model_version_alias", "action": "created"}', time.time()
    headers = {"X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": str(int(now))}
    good = {**headers, "X-MLflow-Signature": signature("s3cret", "d1", headers["X-MLflow-Timestamp"], body)}
    assert good["X-MLflow-Signature"] == _generate_hmac_signature("s3cret", "d1", headers["X-MLflow-Timestamp"],
                                                                  body.decode())  # MLflow's own signer
    assert rejection("s3cret", good, body, now) is None
    assert "does not match" in rejection("other", good, body, now)
    assert "does not match" in rejection("s3cret", good, body + b" ", now)
    assert "from now" in rejection("s3cret", good, body, now + 3600)  # a replay, an hour later
    assert "missing" in rejection("s3cret", headers, body, now)
    assert "from now" in rejection("s3cret", {**good, "X-MLflow-Timestamp": "²"}, body, now)
    assert "does not match" in rejection("s3cret", {**good, "X-MLflow-Signature": "v1,é"}, body, now)


# A real MLflow server, three versions, and workers that follow its aliases --------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def versions(mlflow_server) -> dict[str, str]:
    """'base' and 'same' (the base weights twice), 'tuned' (one matrix nudged), 'corrupt' (every
    weight drowned in noise: it ranks at random) and 'broken' (weights of the wrong shape)."""
    registry = ModelRegistry(mlflow_server.url)
    state = Encoder().model.state_dict()
    noise = torch.Generator().manual_seed(3)
    nudged = {name: tensor.clone() for name, tensor in state.items()}
    nudged["encoder.layer.5.output.dense.weight"] += 0.05 * torch.randn(
        nudged["encoder.layer.5.output.dense.weight"].shape, generator=noise)
    corrupt = {name: tensor + torch.randn(tensor.shape, generator=noise) if tensor.dtype.is_floating_point else tensor
               for name, tensor in state.items()}
    broken = {"embeddings.word_embeddings.weight": torch.zeros(10, 384)}
    made = {}
    for name, weights in (("base", state), ("same", state), ("tuned", nudged), ("corrupt", corrupt),
                          ("broken", broken)):
        run_id = registry.log_training({"lr": 1e-5}, [1.0], {"gate.ndcg@10": 0.7}, {"parent_version": "base"}, weights)
        made[name] = registry.register(run_id, {"gate": "passed", "fixture": name})
    registry.set_alias(CHAMPION, made["base"])
    return made


def answer(worker: WorkerProcess, session: str | None = None) -> dict:
    params = {"q": "alias follow", "k": 3, "mode": "dense", "log": "false", **({"session": session} if session else {})}
    response = worker.client.get("/search", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def serves(worker: WorkerProcess, version: str, timeout: float, session: str | None = None) -> float:
    """Seconds until /search answers from ``version`` (fails after ``timeout``)."""
    started = time.monotonic()
    wait_until(lambda: answer(worker, session)["model_version"] == version_uri(version), timeout, 0.05,
               f"/search to answer from version {version}")
    return time.monotonic() - started


def cli(*arguments: str) -> str:
    result = subprocess.run([sys.executable, "-m", "roles.cli", *arguments], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def start_follower(broker, mlflow_server, tmp_path, *options: str) -> WorkerProcess:
    return WorkerProcess(broker, tmp_path / "data", tmp_path / "worker.log",
                         ["--cdc-topics", r"^cdc\.serving\.", "--mlflow-uri", mlflow_server.url,
                          "--challenger-share", "0.05", *options]).wait_healthy()


def test_promotion_by_webhook_challenger_share_and_a_broken_version(broker, mlflow_server, versions, tmp_path):
    registry = ModelRegistry(mlflow_server.url)
    worker = start_follower(broker, mlflow_server, tmp_path, "--alias-poll", "600")  # webhooks only
    try:
        assert answer(worker)["model_version"] == version_uri(versions["base"])

        # A fresh version promoted straight to champion: loaded, compiled and swapped in.
        registry.set_alias(CHAMPION, versions["tuned"])
        cold = serves(worker, versions["tuned"], 10)

        # The usual flow: a version serves as challenger first, then a person promotes it.
        compiled = worker.metric("autoglm_model_loads_total", arm="challenger", outcome="compiled")
        registry.set_alias(CHALLENGER, versions["base"])
        in_canary = next(s for s in (f"user-{n}" for n in range(1000)) if sticky_point(s) < 0.05)
        elsewhere = next(s for s in (f"user-{n}" for n in range(1000)) if sticky_point(s) >= 0.05)
        serves(worker, versions["base"], 10, session=in_canary)
        wait_until(lambda: worker.metric("autoglm_model_loads_total", arm="challenger", outcome="compiled") > compiled,
                   20, 0.1, "the challenger to be compiled, as one that has served a while is")
        assert answer(worker, in_canary)["arm"] == CHALLENGER
        assert answer(worker, elsewhere)["arm"] == CHAMPION
        assert answer(worker, elsewhere)["model_version"] == version_uri(versions["tuned"])
        registry.set_alias(CHAMPION, versions["base"])
        warm = serves(worker, versions["base"], 2)
        print(f"\nwebhook promotion to /search: cold {cold:.2f} s, challenger promoted {warm:.2f} s")
        registry.delete_alias(CHALLENGER)
        wait_until(lambda: answer(worker, in_canary)["arm"] == CHAMPION, 5, 0.05, "the challenger to retire")

        # A version that cannot load: the old one keeps serving, and the failure is counted.
        registry.set_alias(CHAMPION, versions["broken"])
        wait_until(lambda: worker.metric("autoglm_model_loads_total", arm="champion", outcome="failed") >= 1,
                   10, 0.1, "the broken version's load to fail")
        assert answer(worker)["model_version"] == version_uri(versions["base"])
        assert "loading version" in worker.log_tail(200)

        forged = worker.client.post("/hooks/mlflow", content=b"{}", headers={
            "X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": str(uuid.uuid4()),
            "X-MLflow-Timestamp": str(int(time.time()))})
        assert forged.status_code == 401 and "signature" in forged.json()["error"]
    finally:
        worker.stop()
        registry.set_alias(CHAMPION, versions["base"])


def test_promotion_by_polling_without_webhooks(broker, mlflow_server, versions, tmp_path):
    registry = ModelRegistry(mlflow_server.url)
    registry.set_alias(CHAMPION, versions["base"])
    worker = start_follower(broker, mlflow_server, tmp_path, "--no-webhooks", "--alias-poll", "3")
    try:
        assert answer(worker)["model_version"] == version_uri(versions["base"])
        registry.set_alias(CHAMPION, versions["tuned"])
        took = serves(worker, versions["tuned"], 3 + 8)  # one poll interval, plus loading the version
        print(f"\npolling promotion to /search: {took:.2f} s (poll every 3 s)")

        # The command line: list, roll back to the predecessor the worker recorded, promote again.
        listing = cli("models", "--api", worker.url)
        assert f"champion: {version_uri(versions['tuned'])}" in listing and "gate nDCG@10" in listing
        rolled = cli("rollback", "--api", worker.url, "--reason", "test")
        assert f"champion version {versions['tuned']} replaced by version {versions['base']}" in rolled
        serves(worker, versions["base"], 3 + 8)
        assert registry.version_tags(versions["tuned"])["autoglm.rollback"] == "manual: test"
        cli("promote", versions["tuned"], "--api", worker.url)
        serves(worker, versions["tuned"], 3 + 8)

        # No champion alias at all: the base model serves.
        registry.delete_alias(CHAMPION)
        wait_until(lambda: answer(worker)["model_version"] == "base:all-MiniLM-L6-v2", 3 + 8, 0.05,
                   "the base model to serve without a champion")
    finally:
        worker.stop()
        registry.set_alias(CHAMPION, versions["base"])


SUBJECTS = ["enzyme kinetics", "glacier melt", "protein folding", "volcanic ash", "coral bleaching",
            "neutron stars", "soil bacteria", "malaria vaccines", "solar wind", "river deltas",
            "bird migration", "gut microbiome", "ocean acidity", "dark matter", "insulin signalling"]


def start_with_notes(broker, mlflow_server, tmp_path, *options: str) -> WorkerProcess:
    """A worker serving one note per subject (the notes are published again: replays are no-ops)."""
    ensure_topics(broker, ["cdc.serving.notes"])
    kafka = producer(broker)
    for pk, subject in enumerate(SUBJECTS, start=1):
        key, value = change_event("c", "serving", "notes", {"id": pk},
                                  after={"id": pk, "title": f"A note on {subject}", "body": f"All about {subject}."},
                                  lsn=pk)
        kafka.produce("cdc.serving.notes", key=key, value=value)
    kafka.flush(10)
    worker = WorkerProcess(broker, tmp_path / "data", tmp_path / "worker.log",
                           ["--cdc-topics", r"^cdc\.serving\.", "--mlflow-uri", mlflow_server.url,
                            "--online-settle", "1", *options]).wait_healthy()
    try:
        wait_until(lambda: worker.document(f"serving.notes:{len(SUBJECTS)}"), 60, 0.2, "the notes to be indexed")
    except BaseException:
        worker.stop()
        raise
    return worker


def users(worker: WorkerProcess, count: int, first: int) -> int:
    """Search and click as count users would: a user clicks the note the query names when it is
    ranked first. Returns how many answers the challenger gave."""
    challenger_answers = 0
    for n in range(first, first + count):
        pk = n % len(SUBJECTS) + 1
        result = worker.client.get("/search", params={"q": SUBJECTS[pk - 1], "k": 10, "mode": "dense"},
                                   headers={"X-Session-Id": f"reader-{n}"}).json()
        challenger_answers += result["arm"] == CHALLENGER
        if result["hits"] and result["hits"][0]["id"] == f"serving.notes:{pk}":
            feedback = {"event_id": str(uuid.uuid4()), "query_id": result["query_id"],
                        "doc_id": result["hits"][0]["id"], "type": "click", "position": 1,
                        "session_id": f"reader-{n}"}
            assert worker.client.post("/feedback", json=feedback).status_code == 202
    return challenger_answers


def online_impressions(worker: WorkerProcess, version: str, arm: str) -> int:
    rows = worker.client.get("/models").json()["online"]
    return next((row["impressions"] for row in rows
                 if row["version"] == version_uri(version) and row["arm"] == arm), 0)


def test_a_worse_challenger_is_rolled_back_and_an_equal_one_is_not(broker, mlflow_server, versions, tmp_path):
    """The base model ranks the named note first; the corrupt one ranks at random, so its CTR@10
    falls and the guard removes it."""
    registry = ModelRegistry(mlflow_server.url)
    registry.set_alias(CHAMPION, versions["base"])
    worker = start_with_notes(broker, mlflow_server, tmp_path, "--challenger-share", "0.5")
    try:
        # An equal challenger: same weights, same clicks, never rolled back.
        registry.set_alias(CHALLENGER, versions["same"])
        wait_until(lambda: worker.client.get("/models").json()["arms"]["challenger"] == version_uri(versions["same"]),
                   10, 0.1, "the equal challenger to serve")
        challenger_answers = users(worker, 400, 0)
        assert 150 <= challenger_answers <= 250  # sticky by session, half the sessions
        # Every answer settles --online-settle after it was joined, with no later traffic to wake the processor.
        wait_until(lambda: online_impressions(worker, versions["same"], CHALLENGER) == challenger_answers, 30, 0.5,
                   "every challenger impression to settle")
        wait_until(lambda: "challenger" in (worker.client.get("/models").json()["canary"] or "")
                   and "too few" not in worker.client.get("/models").json()["canary"], 10, 0.2,
                   "the guard to compare the arms")
        time.sleep(3)  # more guard ticks
        assert registry.version_for(CHALLENGER) == versions["same"]
        assert "autoglm.rollback" not in registry.version_tags(versions["same"])

        # A corrupt challenger: removed automatically, the reason on its version.
        registry.set_alias(CHALLENGER, versions["corrupt"])
        wait_until(lambda: worker.client.get("/models").json()["arms"]["challenger"] == version_uri(versions["corrupt"]),
                   10, 0.1, "the corrupt challenger to serve")
        searched = 0
        while registry.version_for(CHALLENGER) is not None and searched < 1200:
            users(worker, 100, 1000 + searched)
            searched += 100
        wait_until(lambda: registry.version_for(CHALLENGER) is None, 10, 0.2, "the corrupt challenger's rollback")
        reason = registry.version_tags(versions["corrupt"])["autoglm.rollback"]
        assert reason.startswith("automatic: ctr@10: challenger"), reason
        wait_until(lambda: worker.client.get("/models").json()["arms"]["challenger"] is None, 10, 0.1,
                   "all traffic back on the champion")
        print(f"\ncorrupt challenger rolled back after {searched} searches: {reason}")
        assert worker.metric("autoglm_rollbacks_total", arm="challenger", cause="automatic") == 1
    finally:
        worker.stop()


def test_a_new_champion_worse_than_its_predecessor_gives_the_alias_back(broker, mlflow_server, versions, tmp_path):
    """The champion watch: for its first --champion-watch impressions a promoted champion is
    compared with the one it replaced. An equal one stays; a corrupt one is replaced by it."""
    registry = ModelRegistry(mlflow_server.url)
    registry.set_alias(CHAMPION, versions["base"])
    if registry.version_for(CHALLENGER) is not None:
        registry.delete_alias(CHALLENGER)
    worker = start_with_notes(broker, mlflow_server, tmp_path, "--champion-watch", "300")

    def champion_serving(version: str) -> bool:
        return worker.client.get("/models").json()["arms"]["champion"] == version_uri(version)

    def watch_verdict() -> str:
        return worker.client.get("/models").json()["champion_watch"] or ""

    try:
        # The predecessor's record as champion. The worker also joins the impressions and clicks
        # earlier tests left on the shared topics, so counts are at least, not exactly, ours.
        users(worker, 200, 0)
        wait_until(lambda: online_impressions(worker, versions["base"], CHAMPION) >= 200, 30, 0.5,
                   "the base version's impressions to settle")

        # An equal champion (same weights): watched for 300 impressions, then kept.
        registry.set_alias(CHAMPION, versions["same"])
        wait_until(lambda: champion_serving(versions["same"]), 10, 0.1, "the equal champion to serve")
        # Counted from the moment the guard saw the promotion, so exactly our 300 from here.
        wait_until(lambda: "(0 new champion, " in watch_verdict(), 10, 0.2, "the guard to watch the new champion")
        users(worker, 300, 200)
        wait_until(lambda: "new champion 1.000" in watch_verdict() and "after 300 / " in watch_verdict(),
                   30, 0.5, "the guard to compare the equal champion's 300 impressions with its predecessor's")
        time.sleep(3)  # more guard ticks: the watch is over
        assert registry.version_for(CHAMPION) == versions["same"]
        assert "autoglm.rollback" not in registry.version_tags(versions["same"])

        # A corrupt champion: the alias goes back to the one it replaced, the reason on its version.
        registry.set_alias(CHAMPION, versions["corrupt"])
        wait_until(lambda: champion_serving(versions["corrupt"]), 30, 0.1, "the corrupt champion to serve")
        wait_until(lambda: "(0 new champion, " in watch_verdict(), 10, 0.2, "the guard to watch the new champion")
        searched = 0
        while registry.version_for(CHAMPION) == versions["corrupt"] and searched < 1000:
            users(worker, 50, 1000 + searched)
            searched += 50
        wait_until(lambda: registry.version_for(CHAMPION) == versions["same"], 10, 0.2,
                   "the champion alias back on its predecessor")
        reason = registry.version_tags(versions["corrupt"])["autoglm.rollback"]
        assert reason.startswith("automatic: ctr@10: new champion"), reason
        wait_until(lambda: champion_serving(versions["same"]), 10, 0.1, "the predecessor to serve again")
        print(f"\ncorrupt champion replaced by its predecessor after {searched} searches: {reason}")
        assert worker.metric("autoglm_rollbacks_total", arm="champion", cause="automatic") == 1
        time.sleep(3)  # going back is not a promotion: nothing more moves
        assert registry.version_for(CHAMPION) == versions["same"]
    finally:
        worker.stop()
        registry.set_alias(CHAMPION, versions["base"])
