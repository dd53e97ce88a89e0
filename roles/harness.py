"""A process role as a child process: what tests, benchmarks and the demo start and stop.

``RoleProcess("serve", broker, data_dir, log, [...])`` runs ``python -m roles.cli serve`` on a
free port of 127.0.0.1, with its output in a log file, and dies with its parent (so a test that
fails half-way leaves nothing behind). It waits for /healthz, reads /metrics and JSON routes,
and stops with SIGTERM (or is killed with SIGKILL, as a crash would).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from autoglm.broker import free_port
from autoglm.metrics import sample_value
from autoglm.process import die_with_parent

REPO = Path(__file__).resolve().parent.parent


class RoleExited(RuntimeError):
    pass


class RoleProcess:
    def __init__(self, role: str, broker: str, data_dir: Path, log_path: Path, args: Sequence[str] = (),
                 port: int | None = None):
        self.role, self.broker, self.data_dir, self.log_path = role, broker, data_dir, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "roles.cli", role, "--broker", broker, "--data-dir", str(data_dir),
                   "--port", str(self.port), *args]
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                        preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self) -> dict | None:
        """The /healthz body (whatever its status), or None while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def wait_healthy(self, timeout: float = 180.0) -> "RoleProcess":
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RoleExited(f"{self.role} exited with {self.process.returncode}; log:\n{self.log_tail()}")
            health = self.health()
            if health and health.get("status") == "ok":
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} not healthy after {timeout:.0f} s ({health}); log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def get_json(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=30) as response:
            return json.load(response)

    def post_json(self, path: str, body) -> int:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            return sample_value(response.read().decode(), name, **labels)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the process's shutdown runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
