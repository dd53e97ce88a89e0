"""Debezium change events, parsed once at the edge into typed values.

A Debezium value (Kafka Connect JSON, with or without the ``{"schema", "payload"}``
wrapper) becomes a :class:`ChangeEvent`; anything that cannot be read raises
:class:`BadEvent` with a reason that is sent to the dead-letter topic.

Events are ordered by the source database's own position, never by Kafka offset:
Postgres ``lsn``, MySQL binlog ``file`` + ``pos``, otherwise the source ``ts_ms``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

Position = tuple  # ("lsn", n) | ("binlog", file, pos) | ("ts_ms", n): compare only within one kind


class BadEvent(ValueError):
    """An event that cannot be processed; its message is the reason given to the dead-letter topic."""


class Op(str, enum.Enum):
    CREATE = "c"
    UPDATE = "u"
    DELETE = "d"
    READ = "r"  # a snapshot row
    TRUNCATE = "t"

    @property
    def is_upsert(self) -> bool:
        return self in (Op.CREATE, Op.UPDATE, Op.READ)


@dataclass(frozen=True)
class ChangeEvent:
    op: Op
    table: str  # "<schema>.<table>"
    key: dict[str, Any] | None  # primary key columns from the message key, when it has one
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    position: Position
    source_ts_ms: int | None


def is_newer(candidate: Position, stored: Position) -> bool:
    """True when candidate comes strictly after stored in the source's order.

    Positions of different kinds (a connector changed) cannot be compared; the later
    arrival wins then, which is what a reconfigured pipeline expects.
    """
    if candidate[0] != stored[0]:
        return True
    return tuple(candidate[1:]) > tuple(stored[1:])


def _decode_json(raw: bytes | str | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent(f"invalid JSON in {what}: {exc}") from None


def _unwrap(document: Any) -> Any:
    """Strip Kafka Connect's schema wrapper when present (converter schemas.enable=true)."""
    if isinstance(document, dict) and set(document) == {"schema", "payload"}:
        return document["payload"]
    return document


def parse_key(raw: bytes | str | None) -> dict[str, Any] | None:
    key = _unwrap(_decode_json(raw, "key"))
    if key is None:
        return None
    if isinstance(key, dict):
        return key or None
    if isinstance(key, (str, int, float)):
        return {"key": key}
    raise BadEvent(f"message key must be a JSON object or scalar, got {type(key).__name__}")


def source_position(source: dict[str, Any]) -> Position:
    if source.get("lsn") is not None:
        return ("lsn", int(source["lsn"]))
    if source.get("file") is not None and source.get("pos") is not None:
        return ("binlog", str(source["file"]), int(source["pos"]), int(source.get("row") or 0))
    if source.get("ts_ms") is not None:
        return ("ts_ms", int(source["ts_ms"]))
    raise BadEvent("source has no position (lsn, file/pos or ts_ms)")


def parse_change(raw_key: bytes | str | None, raw_value: bytes | str | None) -> ChangeEvent | None:
    """Parse one Kafka record of a Debezium topic; None for a tombstone (null value)."""
    if raw_value is None:
        return None
    payload = _unwrap(_decode_json(raw_value, "value"))
    if not isinstance(payload, dict) or "op" not in payload or "source" not in payload:
        raise BadEvent("not a Debezium change event envelope (expected op, source, before/after)")
    try:
        op = Op(payload["op"])
    except ValueError:
        raise BadEvent(f"unknown op {payload['op']!r}") from None
    source = payload["source"]
    if not isinstance(source, dict) or not source.get("table"):
        raise BadEvent("envelope source names no table")
    schema = source.get("schema") or source.get("db")
    table = f"{schema}.{source['table']}" if schema else str(source["table"])
    before, after = payload.get("before"), payload.get("after")
    for name, row in (("before", before), ("after", after)):
        if row is not None and not isinstance(row, dict):
            raise BadEvent(f"{name} must be an object or null")
    if op.is_upsert and after is None:
        raise BadEvent(f"op {op.value!r} without an after row")
    try:
        position = source_position(source)
    except (TypeError, ValueError) as exc:
        raise BadEvent(f"unreadable source position: {exc}") from None
    ts_ms = source.get("ts_ms") or payload.get("ts_ms")
    return ChangeEvent(op=op, table=table, key=parse_key(raw_key), before=before, after=after,
                       position=position, source_ts_ms=int(ts_ms) if ts_ms is not None else None)
