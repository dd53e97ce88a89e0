"""Debezium change events, parsed once at the edge into typed values.

A Debezium value (Kafka Connect JSON, with or without the ``{"schema", "payload"}``
wrapper) becomes a :class:`ChangeEvent`; anything that cannot be read raises
:class:`BadEvent` with a reason that is sent to the dead-letter topic. Nothing else escapes,
whatever the bytes: JSON nested deeper than :data:`MAX_DEPTH`, numbers that are not finite,
strings that are not valid Unicode and mistyped source fields are all bad events, so every
row a :class:`ChangeEvent` carries can be stored and served as JSON.

Events are ordered by the source database's own position, never by Kafka offset alone
(see :func:`source_position`). A position is a tuple whose first item names its kind; only
positions of one kind compare.
"""

from __future__ import annotations

import enum
import json
import re
import reprlib
from dataclasses import dataclass
from typing import Any

# ("lsn", lsn) | ("pg", last commit lsn, lsn) | ("binlog", file, pos, row)
# | ("sqlserver", commit_lsn, change_lsn, event_serial_no) | ("oracle", commit_scn, scn[, offset])
# | ("mongo", seconds, ord[, offset]) | ("ts_ms", ts_ms[, offset])
Position = tuple

MAX_DEPTH = 64  # levels of objects and arrays in one key or value; Debezium envelopes use about ten
POSITION_LIMIT = 1 << 63  # every position number is below this, so it also fits an int64 version

_DECIMAL = re.compile(r"[0-9]{1,20}")
_SQLSERVER_LSN = re.compile(r"[0-9a-fA-F]{8}:[0-9a-fA-F]{8}:[0-9a-fA-F]{4}")
_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 40, 40
_show = _EXCERPT.repr  # a bounded excerpt of a value for a reason, however large or deep the value


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

    Postgres positions with and without ``sequence`` (("pg", last commit lsn, lsn) and
    ("lsn", lsn): Debezium versions, or this project's event builder, differ) compare by
    their LSN, as positions did before ``sequence`` was read. Other positions of different
    kinds cannot be compared; the later arrival wins then, which is what a reconfigured
    pipeline expects (a connector changed). A shorter tuple of the same kind (stored before
    the Kafka offset broke ties) sorts before a longer one with the same leading items.
    """
    if {candidate[0], stored[0]} == {"lsn", "pg"}:
        return candidate[-1] > stored[-1]
    if candidate[0] != stored[0]:
        return True
    return tuple(candidate[1:]) > tuple(stored[1:])


def _decode_json(raw: bytes | str | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        document = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadEvent(f"{what} nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of too many digits
        raise BadEvent(f"invalid JSON in {what}: {exc}") from None
    _check_tree(document, what)
    return document


def _refuse_constant(name: str) -> float:
    raise BadEvent(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise BadEvent(f"number {text[:40]} is out of range")
    return number


def _check_tree(document: Any, what: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with lone surrogates (not UTF-8 encodable),
    walking iteratively so a deep document cannot exhaust the stack here or in a later str()."""
    pending = [(document, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, str):
            _check_text(node, what)
            continue
        if not isinstance(node, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise BadEvent(f"{what} nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            for name in node:
                _check_text(name, what)
            node = node.values()
        pending.extend((child, depth + 1) for child in node)


def _check_text(text: str, what: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadEvent(f"invalid JSON in {what}: string with a lone surrogate {_show(text)}") from None


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
    if isinstance(key, (str, int, float)) and not isinstance(key, bool):
        return {"key": key}
    raise BadEvent(f"message key must be a JSON object, string or number, got {type(key).__name__}")


def _number(value: Any, name: str, *, decimal_text: bool = False) -> int:
    """A position number: a JSON integer (or, where Debezium writes one, a decimal string) in
    [0, POSITION_LIMIT). Booleans are not integers; floats would silently lose their fraction."""
    number = int(value) if decimal_text and isinstance(value, str) and _DECIMAL.fullmatch(value) else value
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < POSITION_LIMIT:
        raise BadEvent(f"source {name} must be an integer in [0, 2**63), got {_show(value)}")
    return number


def _sqlserver_lsn(value: Any, name: str) -> int:
    """SQL Server's "vlf:block:slot" hex LSN as one integer; its fixed widths keep the order."""
    if not isinstance(value, str) or not _SQLSERVER_LSN.fullmatch(value):
        raise BadEvent(f"source {name} must be an LSN like '00000025:00000d98:0003', got {_show(value)}")
    return int(value.replace(":", ""), 16)


def _postgres_sequence(source: dict[str, Any]) -> Position:
    """Postgres orders by (last commit LSN, LSN): a transaction's changes may interleave by LSN
    with another's, but each carries the commit LSN of the transaction streamed before it.
    Without a last commit (the snapshot, the first transaction streamed) the LSN stands in."""
    sequence = source["sequence"]
    parts = _decode_json(sequence, "source sequence") if isinstance(sequence, str) else None
    if not isinstance(parts, list) or len(parts) != 2:
        raise BadEvent(f"source sequence must be a JSON string '[\"<last commit lsn>\", \"<lsn>\"]', "
                       f"got {_show(sequence)}")
    last_commit, lsn = (None if part is None else _number(part, "sequence", decimal_text=True)
                        for part in parts)
    lsn = _number(source["lsn"], "lsn") if lsn is None else lsn
    return ("pg", lsn if last_commit is None else last_commit, lsn)


def _tie_broken(position: Position, offset: int | None) -> Position:
    """Append the Kafka offset where the source's own sequence can repeat for distinct changes."""
    return position if offset is None else (*position, offset)


def source_position(source: dict[str, Any], offset: int | None = None) -> Position:
    """The change's place in the source's order, from the source block of its envelope.

    - SQL Server: (commit_lsn, change_lsn, event_serial_no); a snapshot row has no change_lsn.
    - Oracle: (commit_scn, scn), then the Kafka offset (one SCN can carry several changes);
      a snapshot row has no commit_scn and is ordered at its snapshot SCN.
    - MongoDB: (cluster time seconds from ts_ms, ord), then the Kafka offset (the changes of
      one transaction share a cluster time).
    - Postgres: (last commit LSN, LSN) from ``sequence``, else ``lsn`` alone.
    - MySQL: binlog file, pos, row.
    - else ``ts_ms``, then the Kafka offset: two changes in one millisecond are two changes,
      applied in the order of their partition (a document's changes share its key's partition).
    Without an offset (a caller outside Kafka) the tie-breaking item is left out.
    """
    connector, present = source.get("connector"), {name for name, value in source.items() if value is not None}
    if connector == "sqlserver" and "commit_lsn" in present:
        commit = _sqlserver_lsn(source["commit_lsn"], "commit_lsn")
        change = _sqlserver_lsn(source["change_lsn"], "change_lsn") if "change_lsn" in present else commit
        serial = _number(source["event_serial_no"], "event_serial_no") if "event_serial_no" in present else 0
        return ("sqlserver", commit, change, serial)
    if connector == "oracle" and "scn" in present:
        scn = _number(source["scn"], "scn", decimal_text=True)
        commit = _number(source["commit_scn"], "commit_scn", decimal_text=True) if "commit_scn" in present else scn
        return _tie_broken(("oracle", commit, scn), offset)
    if connector == "mongodb" and {"ord", "ts_ms"} <= present:
        seconds = _number(source["ts_ms"], "ts_ms") // 1000
        return _tie_broken(("mongo", seconds, _number(source["ord"], "ord")), offset)
    if "lsn" in present:
        return _postgres_sequence(source) if "sequence" in present else ("lsn", _number(source["lsn"], "lsn"))
    if {"file", "pos"} <= present:
        if not isinstance(source["file"], str):
            raise BadEvent(f"source file must be a binlog file name, got {_show(source['file'])}")
        row = _number(source["row"], "row") if "row" in present else 0
        return ("binlog", source["file"], _number(source["pos"], "pos"), row)
    if "ts_ms" in present:
        return _tie_broken(("ts_ms", _number(source["ts_ms"], "ts_ms")), offset)
    raise BadEvent("source has no position (lsn, file/pos or ts_ms)")


def _table(source: dict[str, Any]) -> str:
    """``<schema>.<table>``: Postgres and SQL Server name a schema, MySQL a db, MongoDB a collection."""
    table = source.get("collection") if source.get("connector") == "mongodb" else source.get("table")
    if not isinstance(table, str) or not table:
        raise BadEvent("envelope source names no table")
    for name in ("schema", "db"):
        if source.get(name) is not None and not isinstance(source[name], str):
            raise BadEvent(f"source schema/db must be a string, got {_show(source[name])}")
    schema = source.get("schema") or source.get("db")
    return f"{schema}.{table}" if schema else table


def _row(payload: dict[str, Any], name: str, connector: Any) -> dict[str, Any] | None:
    row = payload.get(name)
    if isinstance(row, str) and connector == "mongodb":  # MongoDB sends documents as JSON strings
        row = _decode_json(row, name)
    if row is not None and not isinstance(row, dict):
        raise BadEvent(f"{name} must be an object or null")
    return row


def parse_change(raw_key: bytes | str | None, raw_value: bytes | str | None, *,
                 offset: int | None = None) -> ChangeEvent | None:
    """Parse one Kafka record of a Debezium topic; None for a tombstone (null value).

    ``offset`` is the record's offset in its partition, used only to break ties of sources
    whose own sequence can repeat (see :func:`source_position`).
    """
    if raw_value is None:
        return None
    payload = _unwrap(_decode_json(raw_value, "value"))
    if not isinstance(payload, dict) or "op" not in payload or "source" not in payload:
        raise BadEvent("not a Debezium change event envelope (expected op, source, before/after)")
    try:
        op = Op(payload["op"])
    except ValueError:
        raise BadEvent(f"unknown op {_show(payload['op'])}") from None
    source = payload["source"]
    if not isinstance(source, dict):
        raise BadEvent("envelope source must be an object")
    table = _table(source)
    before, after = (_row(payload, name, source.get("connector")) for name in ("before", "after"))
    if op.is_upsert and after is None:
        raise BadEvent(f"op {op.value!r} without an after row")
    position = source_position(source, offset)
    ts_holder = source if source.get("ts_ms") is not None else payload
    source_ts_ms = None if ts_holder.get("ts_ms") is None else _number(ts_holder["ts_ms"], "ts_ms")
    return ChangeEvent(op=op, table=table, key=parse_key(raw_key), before=before, after=after,
                       position=position, source_ts_ms=source_ts_ms)
