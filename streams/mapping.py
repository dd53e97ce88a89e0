"""Row -> document mapping, configured per table in a TOML file.

Example ``mapping.toml``::

    [tables."public.articles"]
    id = ["id"]                  # fallback when a message has no key
    title = "headline"
    text = ["summary", "body"]   # joined with blank lines
    metadata = ["author", "published_at"]

Tables without an entry use the default mapping: title from ``title`` or ``name``, text
from ``text``, ``body``, ``content`` or ``description``, every other column as metadata.

Rows come from :func:`autoglm.events.parse_change`, so they are JSON of bounded depth with
finite numbers and valid Unicode: every document made here can be stored and served as JSON.
A title, text or key column holding an object or array is rendered as JSON text.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm.events import BadEvent, ChangeEvent
from autoglm.interactions import MAX_ID_CHARS  # feedback names documents by id, up to this length
from search.protocol import Document

DEFAULT_TITLE_FIELDS = ("title", "name")
DEFAULT_TEXT_FIELDS = ("text", "body", "content", "description")


@dataclass(frozen=True)
class TableMapping:
    id_fields: tuple[str, ...] = ()  # empty: a column named "id"
    title_field: str | None = None
    text_fields: tuple[str, ...] = ()
    metadata_fields: tuple[str, ...] | None = None  # None: every column not used as title or text


@dataclass(frozen=True)
class Mapper:
    tables: dict[str, TableMapping] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path | None) -> "Mapper":
        if path is None:
            return cls()
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
        tables = {}
        for name, entry in config.get("tables", {}).items():
            unknown = set(entry) - {"id", "title", "text", "metadata"}
            if unknown:
                raise ValueError(f"{path}: table {name!r} has unknown keys {sorted(unknown)}")
            tables[name] = TableMapping(
                id_fields=tuple(_as_list(entry.get("id", []))),
                title_field=entry.get("title"),
                text_fields=tuple(_as_list(entry.get("text", []))),
                metadata_fields=tuple(_as_list(entry["metadata"])) if "metadata" in entry else None)
        return cls(tables)

    def document_id(self, event: ChangeEvent) -> str:
        """``<schema>.<table>:<primary key>``, the key taken from the message key when there is one."""
        key = event.key
        if key is None:
            row = event.after if event.after is not None else event.before
            id_fields = self.tables.get(event.table, TableMapping()).id_fields or ("id",)
            if row is None or not id_fields or any(name not in row for name in id_fields):
                raise BadEvent(f"missing key: no message key and no mapped id fields for {event.table}")
            key = {name: row[name] for name in id_fields}
        if any(value is None for value in key.values()):
            raise BadEvent(f"missing key: null primary key value in {key}")
        doc_id = f"{event.table}:{','.join(_text(value) for value in key.values())}"
        if len(doc_id) > MAX_ID_CHARS:
            raise BadEvent(f"document id longer than {MAX_ID_CHARS} characters ({len(doc_id)}): "
                           f"feedback could not name it")
        return doc_id

    def document(self, event: ChangeEvent, doc_id: str) -> Document:
        row = event.after or {}
        mapping = self.tables.get(event.table)
        if mapping is None:
            title_field = next((name for name in DEFAULT_TITLE_FIELDS if row.get(name)), None)
            text_fields = tuple(name for name in DEFAULT_TEXT_FIELDS if row.get(name))
            if title_field is None and not text_fields:
                raise BadEvent(f"unmappable row: {event.table} has none of the columns "
                               f"{DEFAULT_TITLE_FIELDS + DEFAULT_TEXT_FIELDS}; add a mapping for it")
            mapping = TableMapping(title_field=title_field, text_fields=text_fields)
        missing = [name for name in (mapping.title_field, *mapping.text_fields)
                   if name is not None and name not in row]
        if missing:
            raise BadEvent(f"unmappable row: {event.table} row lacks mapped columns {missing}")
        title = _text(row.get(mapping.title_field)) if mapping.title_field else ""
        text = "\n\n".join(_text(row[name]) for name in mapping.text_fields if row[name] is not None)
        if not title and not text:
            raise BadEvent(f"unmappable row: {event.table} row has empty title and text")
        used = {mapping.title_field, *mapping.text_fields}
        metadata_fields = mapping.metadata_fields
        if metadata_fields is None:
            metadata_fields = tuple(name for name in row if name not in used)
        metadata = {name: row.get(name) for name in metadata_fields}
        return Document(id=doc_id, table=event.table, title=title, text=text, metadata=metadata,
                        position=event.position, source_ts_ms=event.source_ts_ms)


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else str(value)
