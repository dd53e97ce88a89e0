"""Build Debezium change events (Kafka Connect JSON) the way a Postgres connector writes them.

Used to publish a dataset as a snapshot, by the quickstart, the tests and the benchmarks.
Production events come from Debezium itself; this module only writes what it would.
"""

from __future__ import annotations

import json
import time
from typing import Any

from confluent_kafka import Producer


def change_event(op: str, schema: str, table: str, key: dict[str, Any], *, after: dict | None = None,
                 before: dict | None = None, lsn: int | None = None, ts_ms: int | None = None,
                 with_schema: bool = False) -> tuple[bytes, bytes]:
    """(key, value) bytes of one change event; ``with_schema`` adds Kafka Connect's wrapper."""
    ts_ms = int(time.time() * 1000) if ts_ms is None else ts_ms
    source = {"version": "3.6.3.Final", "connector": "postgresql", "name": "cdc", "ts_ms": ts_ms,
              "snapshot": "true" if op == "r" else "false", "db": "app", "schema": schema,
              "table": table, "lsn": lsn}
    payload = {"before": before, "after": after, "source": source, "op": op, "ts_ms": ts_ms}
    if with_schema:
        return (json.dumps({"schema": {"type": "struct", "optional": False}, "payload": key}).encode(),
                json.dumps({"schema": {"type": "struct", "optional": False}, "payload": payload}).encode())
    return json.dumps(key).encode(), json.dumps(payload).encode()


def topic_for(prefix: str, schema: str, table: str) -> str:
    """Debezium's topic naming: <topic.prefix>.<schema>.<table>."""
    return f"{prefix}.{schema}.{table}"


def producer(broker: str, **config: Any) -> Producer:
    return Producer({"bootstrap.servers": broker, "enable.idempotence": True, "linger.ms": 5, **config})
