"""The model registry against real MLflow stores: a sqlite file, then a tracking server over HTTP."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from autoglm.encoder import Encoder
from registry.models import (CHALLENGER, CHAMPION, DECISION_TAG, EXPERIMENT_NAME, LOSS_METRIC, MODEL_NAME,
                             REJECTION_REASON_TAG, ModelNotFound, ModelRegistry)
from registry.server import MlflowServer, ensure_sqlite_schema, webhook_secret_key
from tests.conftest import wait_until

QUERIES = ["how do vaccines train the immune system", "graphene conductivity at room temperature"]
PERTURBED = "encoder.layer.5.output.dense.weight"


@pytest.fixture(scope="module")
def base() -> Encoder:
    return Encoder()


@pytest.fixture(scope="module")
def tuned_state(base) -> dict[str, torch.Tensor]:
    """The base weights with one matrix nudged: a stand-in for a fine-tuned query encoder."""
    state = {key: tensor.clone() for key, tensor in base.model.state_dict().items()}
    state[PERTURBED] += 0.05 * torch.randn(state[PERTURBED].shape, generator=torch.Generator().manual_seed(7))
    return state


@pytest.fixture(scope="module")
def tuned_vectors(tuned_state) -> np.ndarray:
    return Encoder(state_dict=tuned_state).embed(QUERIES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> ModelRegistry:
    root = tmp_path_factory.mktemp("registry")
    ensure_sqlite_schema(root / "mlflow.db")
    return ModelRegistry(f"sqlite:///{root / 'mlflow.db'}", artifact_root=root / "artifacts")


def log(registry: ModelRegistry, state: dict[str, torch.Tensor], extra: dict[str, Path] | None = None) -> str:
    return registry.log_training(params={"lr": 2e-5, "batch_size": 16}, loss_curve=[0.9, 0.6, 0.4],
                                 metrics={"ndcg@10": 0.71},
                                 lineage={"parent_version": "base", "feedback_offset": "42"},
                                 state_dict=state, extra_artifacts=extra)


# Direct sqlite store ------------------------------------------------------------------------


def test_log_training_records_one_run(registry, tuned_state, tmp_path):
    reservoir = tmp_path / "local-name.jsonl"
    reservoir.write_text('{"query": "q1"}\n')
    run_id = log(registry, tuned_state, {"replay.jsonl": reservoir})

    run = registry.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert registry.client.get_experiment(run.info.experiment_id).name == EXPERIMENT_NAME
    assert run.data.params["lr"] == "2e-05"
    assert run.data.params["lineage.parent_version"] == run.data.tags["lineage.parent_version"] == "base"
    assert run.data.tags["lineage.feedback_offset"] == "42"
    assert run.data.metrics["ndcg_at_10"] == 0.71  # "@" is not allowed in MLflow names
    curve = registry.client.get_metric_history(run_id, LOSS_METRIC)
    assert sorted((point.step, point.value) for point in curve) == [(0, 0.9), (1, 0.6), (2, 0.4)]
    assert [item.path for item in registry.client.list_artifacts(run_id, "extras")] == ["extras/replay.jsonl"]


def test_register_tags_alias_and_load(registry, base, tuned_state, tuned_vectors, tmp_path):
    reservoir = tmp_path / "reservoir.jsonl"
    reservoir.write_text('{"query": "q2"}\n')
    run_id = log(registry, tuned_state, {"replay.jsonl": reservoir})

    version = registry.register(run_id, tags={"gate": "passed", "feedback_events": "120"})
    assert isinstance(version, str) and version.isdigit()
    assert registry.client.get_model_version(MODEL_NAME, version).tags == {"gate": "passed",
                                                                           "feedback_events": "120"}
    assert registry.client.get_run(run_id).data.tags[DECISION_TAG] == "registered"

    registry.set_alias(CHALLENGER, version)
    assert registry.version_for(CHALLENGER) == version

    encoder = registry.load_encoder(CHALLENGER)
    assert encoder.version == f"models:/{MODEL_NAME}/{version}"
    vectors = encoder.embed(QUERIES)
    np.testing.assert_allclose(vectors, tuned_vectors, atol=1e-6)
    assert not np.allclose(vectors, base.embed(QUERIES), atol=1e-3)
    np.testing.assert_allclose(registry.load_encoder(version).embed(QUERIES), tuned_vectors, atol=1e-6)

    copy = registry.download_artifact(version, "replay.jsonl", tmp_path / "download")
    assert copy == tmp_path / "download" / "replay.jsonl"
    assert copy.read_text() == '{"query": "q2"}\n'


def test_logged_model_loads_as_generic_pyfunc(registry, tuned_state, tuned_vectors):
    """What `mlflow models serve` would see: a list of texts or a "text" column in, vectors out."""
    version = registry.register(log(registry, tuned_state), tags={})
    model = mlflow.pyfunc.load_model(registry.client.get_model_version_download_uri(MODEL_NAME, version))
    for model_input in (QUERIES, pd.DataFrame({"text": QUERIES})):
        np.testing.assert_allclose(model.predict(model_input), tuned_vectors, atol=1e-6)


def test_missing_alias_is_none_and_load_says_which(registry):
    assert registry.version_for("no-such-alias") is None
    with pytest.raises(ModelNotFound, match="no-such-alias"):
        registry.load_encoder("no-such-alias")


def test_rejection_tags_the_run_and_creates_no_version(registry, tuned_state):
    before = len(registry.versions())
    run_id = log(registry, tuned_state)
    registry.record_rejection(run_id, "ndcg@10 fell by 0.04 on the holdout", {"holdout_ndcg@10": 0.67})

    run = registry.client.get_run(run_id)
    assert run.data.tags[DECISION_TAG] == "rejected"
    assert run.data.tags[REJECTION_REASON_TAG] == "ndcg@10 fell by 0.04 on the holdout"
    assert run.data.metrics["holdout_ndcg_at_10"] == 0.67
    assert len(registry.versions()) == before
    assert run_id not in {entry["run_id"] for entry in registry.versions()}


def test_versions_list_aliases_as_they_move(registry, tuned_state):
    first = registry.register(log(registry, tuned_state), tags={"role": "first"})
    second = registry.register(log(registry, tuned_state), tags={"role": "second"})
    registry.set_alias(CHAMPION, first)
    registry.set_alias(CHALLENGER, second)

    listing = {entry["version"]: entry for entry in registry.versions()}
    assert listing[first]["aliases"] == [CHAMPION] and listing[second]["aliases"] == [CHALLENGER]
    assert listing[first]["tags"] == {"role": "first"}
    assert listing[first]["metrics"] == {LOSS_METRIC: 0.4, "ndcg_at_10": 0.71}
    assert [entry["version"] for entry in registry.versions()] == sorted(listing, key=int, reverse=True)

    registry.set_alias(CHAMPION, second)  # promotion: the alias moves off the first version
    registry.delete_alias(CHALLENGER)
    listing = {entry["version"]: entry for entry in registry.versions()}
    assert listing[first]["aliases"] == [] and listing[second]["aliases"] == [CHAMPION]
    assert registry.version_for(CHALLENGER) is None


# Tracking server over HTTP ------------------------------------------------------------------


def test_server_serves_the_registry_over_http_and_stops_clean(tmp_path, tuned_state, tuned_vectors):
    """One server start (~5-10 s) for the whole lifecycle: answer, register, alias, load, stop."""
    with MlflowServer(tmp_path) as server:
        assert httpx.get(f"{server.url}/health").text == "OK"
        registry = ModelRegistry(server.url)
        assert registry.version_for(CHAMPION) is None  # before the registered model even exists

        version = registry.register(log(registry, tuned_state), tags={"gate": "passed"})
        assert isinstance(version, str)
        registry.set_alias(CHAMPION, version)
        assert registry.version_for(CHAMPION) == version
        np.testing.assert_allclose(registry.load_encoder(CHAMPION).embed(QUERIES), tuned_vectors, atol=1e-6)
        assert registry.versions()[0]["aliases"] == [CHAMPION]
        assert list(server.artifacts_dir.rglob("state_dict.pt")), "artifacts go to --artifacts-destination"

        group = server.pid
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10
    wait_until(lambda: not live_processes_in_group(group), 5, 0.1, "the server's processes to exit")


def test_schema_and_webhook_key_are_made_once(tmp_path):
    """A restart must neither migrate the db again nor change the key that decrypts webhook secrets."""
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"stand-in for an upgraded db")
    ensure_sqlite_schema(db)
    assert db.read_bytes() == b"stand-in for an upgraded db"
    key = webhook_secret_key(tmp_path / "webhook.key")
    assert webhook_secret_key(tmp_path / "webhook.key") == key and len(key) == 44
    assert (tmp_path / "webhook.key").stat().st_mode & 0o777 == 0o600


def live_processes_in_group(group: int) -> list[int]:
    """Pids in process group ``group`` that are not zombies (init reaps those a moment later)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            pids.append(int(entry))
    return pids
