"""The command line as a user runs it: `autoglm broker`, `autoglm up`, `autoglm search`."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from autoglm.broker import free_port
from autoglm.debezium import change_event, producer
from autoglm.topics import ensure_topics
from tests.conftest import REPO, wait_until

AUTOGLM = [sys.executable, "-m", "roles.cli"]


def descendants(pid: int) -> set[int]:
    """Pids of all processes below pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class LineReader:
    """Collects a process's output lines in the background so a test can wait for one."""

    def __init__(self, process: subprocess.Popen):
        import threading

        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process):
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        def find():
            return next((m for m in map(re.compile(pattern).search, list(self.lines)) if m), None)
        return wait_until(find, timeout, 0.1, f"output matching {pattern!r}")


def test_broker_command_prints_its_address():
    port = free_port()
    process = subprocess.Popen([*AUTOGLM, "broker", "--port", str(port)], stdout=subprocess.PIPE, text=True,
                               cwd=REPO)
    try:
        LineReader(process).wait_for(rf"^broker: 127\.0\.0\.1:{port}$", 30)
        ensure_topics(f"127.0.0.1:{port}", ["probe"])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0 or process.returncode == -signal.SIGTERM


def test_up_runs_the_loop_refuses_a_second_up_and_stops_cleanly_on_sigterm(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    up = subprocess.Popen([*AUTOGLM, "up", "--data-dir", str(data_dir), "--api-port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    output = LineReader(up)
    try:
        broker = output.wait_for(r"^broker: (127\.0\.0\.1:\d+)").group(1)
        mlflow = output.wait_for(r"^mlflow: (http://127\.0\.0\.1:\d+)$").group(1)
        api = output.wait_for(rf"^api: (http://127\.0\.0\.1:{port})$").group(1)
        assert httpx.get(f"{mlflow}/health").status_code == 200
        assert httpx.get(f"{api}/healthz").json()["status"] == "ok"

        second = subprocess.run([*AUTOGLM, "up", "--data-dir", str(data_dir), "--api-port", str(free_port())],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert second.returncode == 2 and "is in use" in second.stderr

        # A CDC topic created after start is followed, as the default --cdc-topics regex says.
        ensure_topics(broker, ["cdc.late.notes"])
        key, value = change_event("c", "late", "notes", {"id": 1},
                                  after={"id": 1, "title": "Late topic note", "body": "Found anyway."}, lsn=1)
        kafka = producer(broker)
        kafka.produce("cdc.late.notes", key=key, value=value)
        kafka.flush(10)
        del kafka  # before the broker stops, or its client logs reconnect attempts
        wait_until(lambda: httpx.get(f"{api}/documents/late.notes:1").status_code == 200, 60, 0.2,
                   "the late topic's document")

        search = subprocess.run([*AUTOGLM, "search", "late topic note", "--api", api, "-k", "3"],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert search.returncode == 0 and "late.notes:1" in search.stdout and "Late topic note" in search.stdout
        as_json = subprocess.run([*AUTOGLM, "search", "late topic note", "--api", api, "--json", "--mode", "bm25"],
                                 capture_output=True, text=True, timeout=60, cwd=REPO)
        assert json.loads(as_json.stdout)["hits"][0]["id"] == "late.notes:1"

        children = descendants(up.pid)
        assert len(children) >= 2  # the broker and the worker
        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=15)
        assert time.monotonic() - started < 10
        wait_until(lambda: not any(alive(pid) for pid in children), 5, 0.1, "no orphan processes")
    finally:
        if up.poll() is None:
            up.kill()
