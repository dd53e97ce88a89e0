"""An Elasticsearch for the tests: the cluster at $AUTOGLM_ES_URL when set, else the noida-db
emulator (PyPI noida-db, pinned in the dev extra), which speaks Elasticsearch 8.15's wire
protocol; /work/shared/notes/elasticsearch.md lists where it differs from a real cluster."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Iterator

import httpx

from autoglm.broker import free_port
from autoglm.process import die_with_parent

START_TIMEOUT_S = 30.0


@contextmanager
def elasticsearch_url(data_dir: Path) -> Iterator[str]:
    """Yield the URL of a running Elasticsearch; an emulator started here is stopped at the end."""
    if os.environ.get("AUTOGLM_ES_URL"):
        yield os.environ["AUTOGLM_ES_URL"]
        return
    # The binary itself, in the foreground, rather than `noida-db up`: the package's wrapper and
    # `up` would leave a server running after a test run that was killed; this one dies with it.
    binary = str(files("noida_db").joinpath("noida-db"))
    port = free_port()
    log_path = data_dir / "noida-db.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen([binary, "start", "--data-dir", str(data_dir), "--only", "elasticsearch",
                                   "--elasticsearch-port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server, log_path)
        yield url
    finally:
        subprocess.run([binary, "down", "--data-dir", str(data_dir)], capture_output=True, timeout=30)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_ready(url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"noida-db exited with {server.returncode}: {log_path.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"noida-db did not answer on {url} within {START_TIMEOUT_S:.0f} s")
