"""The MLflow tracking server as a child process: one data dir holds its sqlite store and artifacts.

Settings come from measurements (shared notes): without job execution and with two workers the
server is healthy in ~10 s at ~800 MB instead of ~28 s at ~2.5 GB, and the schema is created
once before any server or writer starts, because two processes migrating a fresh sqlite file at
the same time break it for good.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cryptography.fernet import Fernet

from autoglm.broker import free_port
from autoglm.process import die_with_parent

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The MLflow server exited or did not answer /health in time; the message has its log tail."""


class SchemaUpgradeError(RuntimeError):
    """`mlflow db upgrade` failed on a fresh sqlite file."""


def ensure_sqlite_schema(db_path: Path) -> None:
    """Create the MLflow schema in ``db_path`` unless the file exists.

    The upgrade runs on a temporary file that is renamed into place, so a crash mid-migration
    leaves no half-built database that a later start would take for a good one.
    """
    if db_path.exists():
        return
    db_path.parent.mkdir(parents=True, exist_ok=True)
    scratch = db_path.with_name(f"{db_path.name}.{os.getpid()}.tmp")
    scratch.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{scratch}"],
                            capture_output=True, text=True, preexec_fn=die_with_parent)
    if result.returncode != 0:
        scratch.unlink(missing_ok=True)
        raise SchemaUpgradeError(f"mlflow db upgrade failed ({result.returncode}):\n{result.stderr[-2000:]}")
    os.replace(scratch, db_path)


def webhook_secret_key(path: Path) -> str:
    """A Fernet key kept in the data dir: every worker and every restart must decrypt the webhook
    secrets with the same key, or deliveries fail silently."""
    if not path.exists():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as key_file:
            key_file.write(Fernet.generate_key())
    return path.read_text().strip()


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with the UI, REST API and proxied artifacts; a context manager.

    Layout under ``data_dir/mlflow``: ``mlflow.db`` (runs, models, aliases), ``artifacts/``
    (state dicts and other files), ``webhook.key`` and ``server.log``.
    """

    def __init__(self, data_dir: Path, port: int | None = None):
        self.root = Path(data_dir) / "mlflow"
        self.port = port or free_port()
        self.db_path = self.root / "mlflow.db"
        self.artifacts_dir = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The `mlflow server` CLI process, leader of the process group holding uvicorn and its workers."""
        return self._process.pid if self._process else None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        """Start the server and return once GET /health answers."""
        if self._process is not None:
            raise RuntimeError(f"mlflow server already started (pid {self.pid})")
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_sqlite_schema(self.db_path)
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhook_secret_key(self.root / "webhook.key"),
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            # Each server worker caches the webhook list (60 s by default): a receiver that
            # registers after an alias event would miss deliveries for that long.
            "MLFLOW_WEBHOOK_CACHE_TTL": "2",
        }
        command = [sys.executable, "-m", "mlflow", "server",
                   "--backend-store-uri", f"sqlite:///{self.db_path}",
                   "--artifacts-destination", str(self.artifacts_dir),
                   "--host", HOST, "--port", str(self.port), "--workers", "2"]
        with open(self.log_path, "ab") as log:
            # Own process group: the CLI forwards SIGTERM to uvicorn, and stop() can still kill
            # the whole tree (CLI, uvicorn, workers) if that forwarding hangs.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=die_with_parent, start_new_session=True)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise ServerStartError(f"mlflow server exited with code {code}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"mlflow server did not answer {self.url}/health within {timeout:.0f} s; "
                               f"log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM (graceful, forwarded to uvicorn), then SIGKILL to the whole process group."""
        if self._process is None:
            return
        group = self.pid
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(group, signal.SIGKILL)  # leftovers: workers that outlived the CLI
        except ProcessLookupError:
            pass
        self._process.wait()
        self._process = None

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
