"""Parsing Debezium envelopes at the edge, and mapping rows to documents."""

import json

import pytest

from autoglm.debezium import change_event
from autoglm.events import BadEvent, Op, is_newer, parse_change
from streams.mapping import Mapper, TableMapping


def test_parses_an_unwrapped_postgres_update():
    key, value = change_event("u", "public", "articles", {"id": 7}, after={"id": 7, "title": "t"},
                              before={"id": 7}, lsn=42, ts_ms=1000)
    event = parse_change(key, value)
    assert event.op is Op.UPDATE and event.table == "public.articles"
    assert event.key == {"id": 7} and event.after == {"id": 7, "title": "t"}
    assert event.position == ("lsn", 42) and event.source_ts_ms == 1000


def test_schema_wrapper_is_removed_from_key_and_value():
    key, value = change_event("c", "public", "articles", {"id": 7}, after={"id": 7}, lsn=1, with_schema=True)
    event = parse_change(key, value)
    assert event.key == {"id": 7} and event.after == {"id": 7}


def test_tombstone_is_none():
    assert parse_change(b'{"id": 1}', None) is None


def test_mysql_binlog_and_ts_ms_positions():
    mysql = {"op": "c", "after": {"id": 1}, "source": {"db": "shop", "table": "t", "file": "bin.000002",
                                                        "pos": 154, "row": 0, "ts_ms": 5}}
    event = parse_change(None, json.dumps(mysql))
    assert event.table == "shop.t" and event.position == ("binlog", "bin.000002", 154, 0)
    other = {"op": "c", "after": {"id": 1}, "source": {"schema": "s", "table": "t", "ts_ms": 77}}
    assert parse_change(None, json.dumps(other)).position == ("ts_ms", 77)


def test_position_order():
    assert is_newer(("lsn", 2), ("lsn", 1)) and not is_newer(("lsn", 1), ("lsn", 1))
    assert is_newer(("binlog", "bin.000003", 4, 0), ("binlog", "bin.000002", 900, 0))
    assert is_newer(("lsn", 1), ("ts_ms", 99))  # different connectors: the later arrival wins


@pytest.mark.parametrize("value, reason", [
    (b"\xff\xfe", "invalid JSON in value"),
    (b"[1, 2]", "not a Debezium change event envelope"),
    (json.dumps({"op": "z", "source": {"table": "t"}}), "unknown op 'z'"),
    (json.dumps({"op": "c", "source": {}}), "envelope source names no table"),
    (json.dumps({"op": "c", "source": {"table": "t", "lsn": 1}}), "op 'c' without an after row"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": "t"}}), "unreadable source position"),
    (json.dumps({"op": "c", "after": [1], "source": {"table": "t", "lsn": 1}}), "after must be an object"),
])
def test_bad_values_raise_with_a_reason(value, reason):
    with pytest.raises(BadEvent, match=reason.replace("(", r"\(")):
        parse_change(b'{"id": 1}', value)


def test_bad_key_raises():
    _, value = change_event("c", "s", "t", {}, after={"id": 1, "title": "x"}, lsn=1)
    with pytest.raises(BadEvent, match="invalid JSON in key"):
        parse_change(b"{oops", value)


def event(op="c", key=None, after=None, before=None, table="t"):
    key_bytes = json.dumps(key).encode() if key is not None else None
    _, value = change_event(op, "public", table, {}, after=after, before=before, lsn=5)
    return parse_change(key_bytes, value)


def test_default_mapping_title_text_and_metadata():
    mapper = Mapper()
    e = event(key={"id": 3}, after={"id": 3, "name": "Widget", "description": "Blue.", "price": 2})
    doc = mapper.document(e, mapper.document_id(e))
    assert doc.id == "public.t:3" and doc.title == "Widget" and doc.text == "Blue."
    assert doc.metadata == {"id": 3, "price": 2} and doc.position == ("lsn", 5)


def test_document_id_from_composite_key_or_before_row():
    mapper = Mapper()
    assert mapper.document_id(event(key={"a": 1, "b": "x"}, after={"title": "t"})) == "public.t:1,x"
    assert mapper.document_id(event(op="d", before={"id": 9, "title": "gone"})) == "public.t:9"
    with pytest.raises(BadEvent, match="missing key"):
        mapper.document_id(event(after={"title": "no id column"}))


def test_unmappable_rows():
    mapper = Mapper()
    e = event(key={"id": 1}, after={"id": 1, "price": 4})
    with pytest.raises(BadEvent, match="unmappable row"):
        mapper.document(e, "x")
    configured = Mapper({"public.t": TableMapping(title_field="headline", text_fields=("body",))})
    with pytest.raises(BadEvent, match="lacks mapped columns"):
        configured.document(event(key={"id": 1}, after={"id": 1, "headline": "h"}), "x")


def test_mapping_file(tmp_path):
    path = tmp_path / "mapping.toml"
    path.write_text('[tables."public.t"]\nid = "sku"\ntitle = "headline"\ntext = ["a", "b"]\nmetadata = ["price"]\n')
    mapper = Mapper.from_file(path)
    e = event(after={"sku": "S1", "headline": "H", "a": "one", "b": None, "price": 5, "secret": 1})
    doc = mapper.document(e, mapper.document_id(e))
    assert doc.id == "public.t:S1" and doc.title == "H" and doc.text == "one" and doc.metadata == {"price": 5}
    path.write_text('[tables."public.t"]\ntitel = "typo"\n')
    with pytest.raises(ValueError, match="unknown keys"):
        Mapper.from_file(path)
