"""Render the MLflow model page that shows the aliases, for the README's promotion flow.

Starts a throwaway `mlflow server`, registers two versions of autoglm-query-encoder (the base
weights, then the same weights as a stand-in challenger), points `champion` at version 1 and
`challenger` at version 2, and has headless Chromium (Debian's package) render the registered
model page to docs/mlflow-model-page.png.

    apt-get install -y chromium && .venv/bin/python docs/screenshot_mlflow.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from autoglm.encoder import Encoder
from registry.models import CHALLENGER, CHAMPION, MODEL_NAME, ModelRegistry
from registry.server import MlflowServer

OUT = Path(__file__).resolve().parent / "mlflow-model-page.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1500,900", "--virtual-time-budget=15000"]


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs Debian's chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        server = MlflowServer(Path(scratch)).start()
        try:
            registry = ModelRegistry(server.url)
            state = Encoder().model.state_dict()
            for gate in (0.6859, 0.7226):
                run_id = registry.log_training({"lr": 1e-5, "epochs": 2}, [3.5, 3.0], {"gate.ndcg@10": gate},
                                               {"parent_version": "base"}, state)
                version = registry.register(run_id, {"gate": "passed"})
            registry.set_alias(CHAMPION, "1")
            registry.set_alias(CHALLENGER, version)
            profile = Path(scratch) / "chromium-profile"
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={OUT}",
                            f"{server.url}/#/models/{MODEL_NAME}"], check=True, timeout=120,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            server.stop()
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
