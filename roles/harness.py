"""A process role as a child process: the one harness tests, benchmarks and the demo start and stop.

``RoleProcess("serve", broker, data_dir, log, [...])`` runs ``python -m roles.cli serve`` on a
free port of 127.0.0.1, with its output in a log file, and dies with its parent (so a test that
fails half-way leaves nothing behind). It waits for /healthz, reads /metrics and JSON routes,
and stops with SIGTERM (or is killed with SIGKILL, as a crash would). ``RoleProcess("up", None,
...)`` runs ``autoglm up``, which starts its own broker and MLflow server and prints their
addresses: ``printed`` finds them in the log.

The JSON helpers use urllib. ``client``, ``document`` and ``search_ids`` share one keep-alive
httpx client (httpx is imported when first used), so a benchmark times the API, not a new
connection per request.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from autoglm.broker import free_port
from autoglm.metrics import sample_value
from autoglm.process import die_with_parent

if TYPE_CHECKING:
    import httpx

REPO = Path(__file__).resolve().parent.parent


class RoleExited(RuntimeError):
    pass


class RoleProcess:
    def __init__(self, role: str, broker: str | None, data_dir: Path, log_path: Path, args: Sequence[str] = (),
                 port: int | None = None, http_timeout: float = 30.0):
        """``broker`` None leaves --broker out (``up`` then starts the embedded one); ``http_timeout``
        is the client's default per request."""
        self.role, self.broker, self.data_dir, self.log_path = role, broker, data_dir, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http_timeout = http_timeout
        self._client: httpx.Client | None = None
        # Absolute: the child runs in the repository, the caller's relative paths would point elsewhere.
        command = [sys.executable, "-m", "roles.cli", role, *(["--broker", broker] if broker else []),
                   "--data-dir", str(Path(data_dir).resolve()), "--port", str(self.port), *args]
        self._log = open(log_path, "ab")
        self._log_start = self._log.tell()  # the log may hold earlier runs: printed() reads this one's
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                        preexec_fn=die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def client(self) -> "httpx.Client":
        """A keep-alive httpx client on this process's URL, closed by stop() and kill()."""
        if self._client is None:
            import httpx

            self._client = httpx.Client(base_url=self.url, timeout=self.http_timeout)
        return self._client

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

    def printed(self, pattern: str, timeout: float = 60.0) -> re.Match:
        """The first line this run wrote to its log that matches ``pattern`` (``^broker: (\\S+)`` of ``up``)."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.process.poll() is not None  # read after: a line written before exiting still counts
            with open(self.log_path, "rb") as log:
                log.seek(self._log_start)
                for line in log.read().decode(errors="replace").splitlines():
                    if match := re.search(pattern, line):
                        return match
            if exited:
                raise RoleExited(f"{self.role} exited with {self.process.returncode} before printing "
                                 f"{pattern!r}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.role} printed no {pattern!r} in {timeout:.0f} s; log:\n{self.log_tail()}")
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

    def document(self, doc_id: str) -> dict | None:
        """GET /documents/{doc_id}, None when the index does not hold it."""
        response = self.client.get(f"/documents/{doc_id}")
        return response.json() if response.status_code == 200 else None

    def search_ids(self, query: str, mode: str = "hybrid", k: int = 10, log: bool = True) -> list[str]:
        """Ids of the hits, best first; ``log`` False keeps an evaluation out of the impression stream."""
        response = self.client.get("/search", params={"q": query, "mode": mode, "k": k, "log": str(log).lower()})
        response.raise_for_status()
        return [hit["id"] for hit in response.json()["hits"]]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing of the process's shutdown runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig``, and SIGKILL after ``timeout`` s (so -SIGKILL after a SIGTERM means it hung)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close()
        return self.process.returncode

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._log.close()
