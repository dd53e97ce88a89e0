"""The query encoder's versions in the MLflow model registry: log a training, register, alias, load.

Vocabulary:
- a *training* is one MLflow run in EXPERIMENT_NAME: params, the loss curve (one metric, one step
  per point), final metrics, lineage (as tags and as params), the state_dict as the run's logged
  MLflow model, and extra files (e.g. the replay reservoir) under ``extras/``;
- a *version* of MODEL_NAME is registered from a training's logged model;
- *aliases* name the versions in use: CHAMPION serves queries, CHALLENGER is being evaluated;
- a *rejected* candidate keeps its run, tagged with the reason, and gets no version.

Versions are str everywhere: MLflow returns ints from a direct sqlite store, strings over HTTP.
Metric, param and lineage names pass through ``mlflow_key`` ("ndcg@10" is stored as "ndcg_at_10").
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from autoglm.encoder import Encoder
from registry.pyfunc_model import STATE_DICT_PATH, save_encoder_model
from search.serving import CHALLENGER, CHAMPION  # noqa: F401  # the aliases are named after the serving arms

MODEL_NAME = "autoglm-query-encoder"

EXPERIMENT_NAME = "autoglm-training"
LOSS_METRIC = "train_loss"
LINEAGE_PREFIX = "lineage."
EXTRAS_DIR = "extras"
DECISION_TAG = "autoglm.decision"  # on the run: "registered" or "rejected"
REJECTION_REASON_TAG = "autoglm.rejection_reason"
PREVIOUS_CHAMPION_TAG = "autoglm.previous_champion"  # on a version: the champion it replaced
ROLLBACK_TAG = "autoglm.rollback"  # on a version: why it was taken out of serving


class ModelNotFound(LookupError):
    """The alias names no version, or the run logged no model."""


class ModelRegistry:
    """MLflow client for one tracking URI (a sqlite URI, or a tracking server's http URL)."""

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None):
        """``artifact_root``: where a direct sqlite store puts the training experiment's artifacts
        when it creates it. Leave None with a tracking server: the server decides."""
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.artifact_root = artifact_root

    # Trainings --------------------------------------------------------------------------------

    def log_training(self, params: dict, loss_curve: list[float], metrics: dict[str, float],
                     lineage: dict[str, str], state_dict: dict[str, torch.Tensor],
                     extra_artifacts: dict[str, Path] | None = None) -> str:
        """Record one training as one run and return its id; the run is FAILED if logging fails."""
        experiment_id = self._experiment_id()
        lineage = {mlflow_key(f"{LINEAGE_PREFIX}{key}"): str(value) for key, value in lineage.items()}
        run_id = self.client.create_run(experiment_id, tags=lineage).info.run_id
        try:
            now = _now_ms()
            self.client.log_batch(
                run_id,
                metrics=[Metric(LOSS_METRIC, value, now, step) for step, value in enumerate(loss_curve)]
                + _metrics(metrics, now),
                params=[Param(mlflow_key(key), str(value)) for key, value in {**params, **lineage}.items()],
            )
            self._log_model(experiment_id, run_id, state_dict)
            self._log_extras(run_id, extra_artifacts or {})
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id)
        return run_id

    def record_rejection(self, run_id: str, reason: str, metrics: dict[str, float]) -> None:
        """A candidate that failed its gate: the run keeps the evidence, no version is made."""
        now = _now_ms()
        self.client.log_batch(run_id, metrics=_metrics(metrics, now),
                              tags=[RunTag(DECISION_TAG, "rejected"), RunTag(REJECTION_REASON_TAG, reason)])

    def decided_training(self, request: str) -> str | None:
        """The run that already trained and judged the training request ``request`` (its
        ``lineage.request`` tag), if any: a learner that took over a request its predecessor
        finished, but had not yet marked done, does not train it twice."""
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            return None
        runs = self.client.search_runs([experiment.experiment_id],
                                       filter_string=f"tags.`{LINEAGE_PREFIX}request` = '{request}'"
                                                     f" and tags.`{DECISION_TAG}` != ''", max_results=1)
        return runs[0].info.run_id if runs else None

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is not None:
            return experiment.experiment_id
        location = self.artifact_root.resolve().as_uri() if self.artifact_root else None
        return self.client.create_experiment(EXPERIMENT_NAME, artifact_location=location)

    def _log_model(self, experiment_id: str, run_id: str, state_dict: dict[str, torch.Tensor]) -> None:
        """The steps of ``mlflow.pyfunc.log_model`` with this client: the fluent API would log to
        the process-global tracking URI instead of this registry's."""
        model = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
        with tempfile.TemporaryDirectory() as scratch:
            model_dir = Path(scratch, "model")
            save_encoder_model(model_dir, state_dict, model)
            self.client.log_model_artifacts(model.model_id, str(model_dir))
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)

    def _log_extras(self, run_id: str, extra_artifacts: dict[str, Path]) -> None:
        """Each file or directory lands at ``extras/<name>`` whatever its local name."""
        if not extra_artifacts:
            return
        with tempfile.TemporaryDirectory() as scratch:
            for name, path in extra_artifacts.items():
                if Path(name).name != name or name in (".", ".."):
                    raise ValueError(f"extra artifact name must be a plain file name, got {name!r}")
                (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, Path(scratch, name))
            self.client.log_artifacts(run_id, scratch, EXTRAS_DIR)

    # Versions and aliases ---------------------------------------------------------------------

    def register(self, run_id: str, tags: dict[str, str]) -> str:
        """Make a new version of MODEL_NAME from the run's logged model; returns its number."""
        model = self._logged_model(run_id)
        try:
            self.client.create_registered_model(MODEL_NAME)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Source is the artifact location, not models:/<model_id>: a sqlite registry resolves
        # that URI through the process-global tracking URI, which this client does not set.
        version = self.client.create_model_version(
            MODEL_NAME, source=model.artifact_location, run_id=run_id, model_id=model.model_id,
            tags={mlflow_key(key): str(value) for key, value in tags.items()})
        self.client.set_tag(run_id, DECISION_TAG, "registered")
        return str(version.version)

    def _logged_model(self, run_id: str) -> LoggedModel:
        outputs = self.client.get_run(run_id).outputs
        if outputs is None or not outputs.model_outputs:
            raise ModelNotFound(f"run {run_id} has no logged model")
        return self.client.get_logged_model(outputs.model_outputs[-1].model_id)

    def set_alias(self, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``, moving it off any other version."""
        self.client.set_registered_model_alias(MODEL_NAME, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self.client.delete_registered_model_alias(MODEL_NAME, alias)

    def tag_version(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(MODEL_NAME, str(version), key, value)

    def version_tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(MODEL_NAME, str(version)).tags)

    def version_for(self, alias: str) -> str | None:
        """The version ``alias`` points at; None when the alias (or the model) does not exist."""
        try:
            return str(self.client.get_model_version_by_alias(MODEL_NAME, alias).version)
        except MlflowException as error:
            if error.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
                return None
            raise

    def versions(self) -> list[dict]:
        """Every version, newest first, with its aliases, tags, run and the run's final metrics."""
        try:
            aliases = self.client.get_registered_model(MODEL_NAME).aliases
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        listing = []
        # Versions from a search carry no aliases (sqlite): the registered model has them.
        for version in self.client.search_model_versions(f"name = '{MODEL_NAME}'",
                                                         order_by=["version_number DESC"]):
            listing.append({
                "version": str(version.version),
                "aliases": sorted(alias for alias, target in aliases.items()
                                  if str(target) == str(version.version)),
                "tags": dict(version.tags),
                "run_id": version.run_id,
                "created_ms": version.creation_timestamp,
                "metrics": self.client.get_run(version.run_id).data.metrics,
            })
        return listing

    # Loading ----------------------------------------------------------------------------------

    def load_encoder(self, alias_or_version: str) -> Encoder:
        """The encoder of a version (``"3"``) or of the version an alias names (``"champion"``).

        Downloads only the state_dict file and builds the Encoder from it: the generic
        ``mlflow.pyfunc.load_model`` fetches the whole model directory and unpickles the wrapper.
        """
        version = self._resolve(alias_or_version)
        model_uri = self.client.get_model_version_download_uri(MODEL_NAME, version)
        with tempfile.TemporaryDirectory() as scratch:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/{STATE_DICT_PATH}",
                                                       dst_path=scratch, tracking_uri=self.tracking_uri)
            state_dict = torch.load(path, weights_only=True)
        return Encoder(state_dict=state_dict, version=version_uri(version))

    def download_artifact(self, version: str, name: str, dst_dir: Path | None = None) -> Path:
        """A copy of the extra artifact ``name`` logged with ``version``'s training, in ``dst_dir``
        (a new temporary directory by default, which the caller owns)."""
        run_id = self.client.get_model_version(MODEL_NAME, str(version)).run_id
        dst_dir = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="autoglm-artifact-"))
        dst_dir.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, f"{EXTRAS_DIR}/{name}", str(dst_dir)))

    def latest_training_artifact(self, name: str, dst_dir: Path) -> Path | None:
        """The extra artifact ``name`` of the newest finished training run that logged one,
        whichever learner ran it, copied into ``dst_dir``; None when no run has it."""
        experiment = self.client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            return None
        for run in self.client.search_runs([experiment.experiment_id], filter_string="status = 'FINISHED'",
                                           order_by=["attributes.start_time DESC"], max_results=5):
            if any(item.path == f"{EXTRAS_DIR}/{name}"
                   for item in self.client.list_artifacts(run.info.run_id, EXTRAS_DIR)):
                dst_dir.mkdir(parents=True, exist_ok=True)
                return Path(self.client.download_artifacts(run.info.run_id, f"{EXTRAS_DIR}/{name}", str(dst_dir)))
        return None

    def _resolve(self, alias_or_version: str) -> str:
        if str(alias_or_version).isdigit():
            return str(alias_or_version)
        version = self.version_for(alias_or_version)
        if version is None:
            raise ModelNotFound(f"no version of {MODEL_NAME} has the alias {alias_or_version!r}")
        return version


def version_uri(version: str) -> str:
    """How a served version names itself in answers and impressions: ``models:/<name>/<version>``."""
    return f"models:/{MODEL_NAME}/{version}"


def registry_version(served_version: str) -> str | None:
    """The registry's version of a served version (the inverse of ``version_uri``); None for the base model."""
    prefix = version_uri("")
    return served_version[len(prefix):] if served_version.startswith(prefix) else None


def mlflow_key(name: str) -> str:
    """MLflow names allow only alphanumerics and ``_ - . : /`` and spaces; "@" becomes "_at_" and
    any other character "_", so callers keep their usual metric names."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def _metrics(metrics: dict[str, float], timestamp_ms: int) -> list[Metric]:
    return [Metric(mlflow_key(key), value, timestamp_ms, 0) for key, value in metrics.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
