"""The online metrics and the rollback guard's verdicts, published by the active learner on a
compacted topic so that every serve replica shows the same ``/models``.

Only the learner sees every impression and feedback event (it owns the join), so only it can
count the arms. It publishes one record per key when the value changed, at most once per
``interval_s``: ``arm:<version>|<arm>`` holds that arm's counts (feedback/online.py) and
``verdict:canary`` / ``verdict:champion_watch`` the guard's last reasons. A serve replica reads
the topic from its start and keeps the newest record per key. The counts themselves live in the
join's changelog-backed table, so a standby learner that takes over continues them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from autoglm import topics
from feedback.online import ArmStats

log = logging.getLogger(__name__)

VERDICTS = ("canary", "champion_watch")
Snapshot = Callable[[], dict[str, dict]]  # key -> JSON-able value


def arm_key(version: str, arm: str) -> str:
    return f"arm:{version}|{arm}"


def board_snapshot(online: dict[tuple[str, str], ArmStats], verdicts: dict[str, str | None]) -> dict[str, dict]:
    """What the learner publishes: every arm's counts and the guard's verdicts."""
    board = {arm_key(version, arm): stats.to_dict() for (version, arm), stats in online.items()}
    board.update({f"verdict:{name}": {"reason": reason} for name, reason in verdicts.items()})
    return board


class BoardPublisher:
    """A thread that publishes what changed in ``snapshot()`` while ``active()`` says so."""

    def __init__(self, broker: str, snapshot: Snapshot, active: Callable[[], bool], interval_s: float = 1.0):
        self.snapshot, self.active, self.interval_s = snapshot, active, interval_s
        self._producer = Producer({"bootstrap.servers": broker, "linger.ms": 5, "log_level": 3})
        self._sent: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="online-board", daemon=True)

    def start(self) -> "BoardPublisher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._producer.flush(timeout)

    def publish_changes(self) -> int:
        """Send the keys whose value changed since the last send; returns how many."""
        changed = {key: value for key, value in self.snapshot().items() if self._sent.get(key) != value}
        for key, value in changed.items():
            self._producer.produce(topics.ONLINE, key=key.encode(),
                                   value=json.dumps({**value, "published_at": time.time()}).encode())
        self._producer.flush(5.0)
        self._sent.update(changed)
        return len(changed)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.active():
                self._sent.clear()  # on becoming active again, publish everything once
                continue
            try:
                self.publish_changes()
            except Exception:  # the broker may be away; the next round sends again
                log.exception("publishing the online metrics failed")


class BoardView:
    """The newest published value of every key, read by a thread from the topic's start."""

    def __init__(self, broker: str):
        self._consumer = Consumer({"bootstrap.servers": broker, "group.id": f"autoglm-board-{uuid.uuid4().hex}",
                                   "enable.auto.commit": False, "log_level": 3})
        self._consumer.assign([TopicPartition(topics.ONLINE, 0, OFFSET_BEGINNING)])
        self._values: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="online-view", daemon=True)

    def start(self) -> "BoardView":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self._consumer.close()

    def online(self) -> dict[tuple[str, str], ArmStats]:
        """(model version, arm) -> the learner's counts; the same on every replica once read."""
        with self._lock:
            items = list(self._values.items())
        found = {}
        for key, value in items:
            if key.startswith("arm:"):
                version, _, arm = key.removeprefix("arm:").rpartition("|")
                try:
                    found[(version, arm)] = ArmStats(**{k: v for k, v in value.items() if k != "published_at"})
                except TypeError:
                    log.warning("unreadable online metrics under %r: %.200r", key, value)
        return found

    def verdict(self, name: str) -> str | None:
        with self._lock:
            return (self._values.get(f"verdict:{name}") or {}).get("reason")

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._consumer.poll(0.5)
            if message is None:
                continue
            if message.error():
                if message.error().code() != KafkaError._PARTITION_EOF:
                    log.debug("online board: %s", message.error())
                continue
            try:
                value = json.loads(message.value())
                key = message.key().decode()
            except (ValueError, AttributeError, UnicodeDecodeError):
                log.warning("unreadable online board record at offset %d", message.offset())
                continue
            if isinstance(value, dict):
                with self._lock:
                    self._values[key] = value
