"""Parsing Debezium envelopes at the edge, and mapping rows to documents."""

import json

import pytest

from autoglm.debezium import change_event
from autoglm.events import MAX_DEPTH, BadEvent, Op, is_newer, parse_change
from streams.mapping import Mapper, TableMapping

ROW = {"id": 1004, "name": "Anne", "description": "Kretchmar's order"}

# One create event per connector, shaped like Debezium 3.x writes them (payload without the wrapper).
SAMPLES = {
    "postgresql": {"before": None, "after": ROW, "op": "c", "ts_ms": 1700000000456, "source": {
        "version": "3.6.3.Final", "connector": "postgresql", "name": "dbserver1", "ts_ms": 1700000000123,
        "snapshot": "false", "db": "app", "sequence": '["24023119","24023128"]', "schema": "public",
        "table": "customers", "txId": 555, "lsn": 24023128, "xmin": None}},
    "mysql": {"before": None, "after": ROW, "op": "c", "ts_ms": 1465581029523, "source": {
        "version": "3.6.3.Final", "connector": "mysql", "name": "mysql-server-1", "ts_ms": 1465581029100,
        "snapshot": "false", "db": "inventory", "sequence": None, "table": "customers", "server_id": 223344,
        "gtid": None, "file": "mysql-bin.000003", "pos": 484, "row": 0, "thread": 7, "query": None}},
    "sqlserver": {"before": None, "after": ROW, "op": "c", "ts_ms": 1559729471739, "source": {
        "version": "3.6.3.Final", "connector": "sqlserver", "name": "server1", "ts_ms": 1559729468470,
        "snapshot": "false", "db": "testDB", "sequence": None, "schema": "dbo", "table": "customers",
        "change_lsn": "00000027:00000758:0003", "commit_lsn": "00000027:00000758:0005", "event_serial_no": 1}},
    "oracle": {"before": None, "after": ROW, "op": "c", "ts_ms": 1532592105975, "source": {
        "version": "3.6.3.Final", "connector": "oracle", "name": "server1", "ts_ms": 1532592105000,
        "snapshot": "false", "db": "ORCLPDB1", "sequence": None, "schema": "DEBEZIUM", "table": "CUSTOMERS",
        "txId": "6.28.807", "scn": "2122185", "commit_scn": "2122187", "rs_id": "0x0009.0000a4c7.0010",
        "ssn": 0, "redo_thread": 1, "user_name": "DEBEZIUM"}},
    "mongodb": {"after": json.dumps({"_id": {"$numberLong": "1004"}, **ROW}), "op": "c",
                "ts_ms": 1558965515240, "source": {
        "version": "3.6.3.Final", "connector": "mongodb", "name": "fulfillment", "ts_ms": 1558965508000,
        "snapshot": "false", "db": "inventory", "sequence": None, "rs": "rs0", "collection": "customers",
        "ord": 31, "lsid": None, "txnNumber": None}},
}
SAMPLE_KEYS = {"postgresql": {"id": 1004}, "mysql": {"id": 1004}, "sqlserver": {"id": 1004},
               "oracle": {"ID": 1004}, "mongodb": {"id": "1004"}}


def sample(connector, offset=None, **source):
    """The connector's sample event, its source fields replaced by ``source``, parsed."""
    payload = {**SAMPLES[connector], "source": {**SAMPLES[connector]["source"], **source}}
    return parse_change(json.dumps(SAMPLE_KEYS[connector]), json.dumps(payload), offset=offset)


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
    assert not is_newer(("pg", 5, 5), ("lsn", 900))  # a position stored before sequence was read: by LSN


@pytest.mark.parametrize("value, reason", [
    (b"\xff\xfe", "invalid JSON in value"),
    (b"[1, 2]", "not a Debezium change event envelope"),
    (json.dumps({"op": "z", "source": {"table": "t"}}), "unknown op 'z'"),
    (json.dumps({"op": "c", "source": {}}), "envelope source names no table"),
    (json.dumps({"op": "c", "source": {"table": "t", "lsn": 1}}), "op 'c' without an after row"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": "t"}}), "source has no position"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": "t"}), "envelope source must be an object"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": 5, "lsn": 1}}), "names no table"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": "t", "schema": [], "lsn": 1}}),
     "schema/db must be a string"),
    (json.dumps({"op": ["c"], "source": {"table": "t"}}), "unknown op"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": "t", "lsn": 1, "ts_ms": "abc"}}),
     "source ts_ms must be an integer"),
    (b'{"op": "c", "after": {"id": 1, "price": NaN}, "source": {"table": "t", "lsn": 1}}', "NaN is not a JSON"),
    (b'{"op": "c", "after": {"id": 1, "price": 1e400}, "source": {"table": "t", "lsn": 1}}', "out of range"),
    (b'{"op": "c", "after": {"id": "\\ud800"}, "source": {"table": "t", "lsn": 1}}', "lone surrogate"),
    (json.dumps({"op": "c", "after": {"id": 1}, "source": {"table": "t", "lsn": 1, "sequence": "[1]"}}),
     "source sequence must be"),
    (json.dumps({"op": "c", "after": [1], "source": {"table": "t", "lsn": 1}}), "after must be an object"),
])
def test_bad_values_raise_with_a_reason(value, reason):
    with pytest.raises(BadEvent, match=reason.replace("(", r"\(")):
        parse_change(b'{"id": 1}', value)


def test_bad_key_raises():
    _, value = change_event("c", "s", "t", {}, after={"id": 1, "title": "x"}, lsn=1)
    with pytest.raises(BadEvent, match="invalid JSON in key"):
        parse_change(b"{oops", value)
    for key in (b"true", b"[1, 2]"):
        with pytest.raises(BadEvent, match="message key must be a JSON object, string or number"):
            parse_change(key, value)


@pytest.mark.parametrize("lsn", [True, 42.0, -1, 2**63, "42", None])
def test_position_numbers_are_non_negative_int64_and_not_booleans(lsn):
    _, value = change_event("c", "s", "t", {}, after={"id": 1, "title": "x"}, lsn=lsn, ts_ms=None)
    payload = json.loads(value)
    payload["source"]["ts_ms"] = payload["ts_ms"] = None
    with pytest.raises(BadEvent, match="source lsn must be an integer|source has no position"):
        parse_change(b'{"id": 1}', json.dumps(payload))


def test_nesting_deeper_than_the_limit_is_a_bad_event():
    after = {"id": 1, "title": "t", "deep": 1}
    for _ in range(MAX_DEPTH):
        after["deep"] = [after["deep"]]
    _, value = change_event("c", "s", "t", {"id": 1}, after=after, lsn=1)
    with pytest.raises(BadEvent, match=f"value nested deeper than {MAX_DEPTH} levels"):
        parse_change(None, value)


def test_each_connector_orders_by_its_own_sequence():
    assert sample("postgresql").position == ("pg", 24023119, 24023128)
    assert sample("postgresql", sequence=None).position == ("lsn", 24023128)
    assert sample("postgresql", sequence='[null,"24023128"]').position == ("pg", 24023128, 24023128)
    assert sample("mysql").position == ("binlog", "mysql-bin.000003", 484, 0)
    assert sample("sqlserver").position == ("sqlserver", 0x27_00000758_0005, 0x27_00000758_0003, 1)
    assert sample("oracle", offset=9).position == ("oracle", 2122187, 2122185, 9)
    assert sample("oracle", commit_scn=None).position == ("oracle", 2122185, 2122185)  # a snapshot row
    mongo = sample("mongodb", offset=3)
    assert mongo.position == ("mongo", 1558965508, 31, 3) and mongo.table == "inventory.customers"
    assert mongo.after["name"] == "Anne"  # MongoDB's document arrives as a JSON string


def test_postgres_interleaved_transactions_order_by_commit_then_lsn():
    """Transaction A (commit 80) changes a row at LSN 70; B, streamed after A, changes it at LSN 60."""
    in_a = sample("postgresql", lsn=70, sequence='["10","70"]').position
    in_b = sample("postgresql", lsn=60, sequence='["80","60"]').position
    assert is_newer(in_b, in_a) and not is_newer(in_a, in_b)


def test_sqlserver_lsns_compare_as_hex_parts():
    older = sample("sqlserver", commit_lsn="00000027:00000fff:0001", change_lsn="00000027:00000fff:0001")
    newer = sample("sqlserver", commit_lsn="00000028:00000001:0001", change_lsn="00000028:00000001:0001")
    assert is_newer(newer.position, older.position)
    update_after = sample("sqlserver", event_serial_no=2)
    assert is_newer(update_after.position, sample("sqlserver").position)
    with pytest.raises(BadEvent, match="commit_lsn must be an LSN"):
        sample("sqlserver", commit_lsn="27:758:5")


def test_equal_ts_ms_is_broken_by_the_kafka_offset():
    other = {"op": "u", "after": {"id": 1, "title": "x"}, "source": {"schema": "s", "table": "t", "ts_ms": 77}}
    first, second = (parse_change(None, json.dumps(other), offset=offset).position for offset in (5, 6))
    assert first == ("ts_ms", 77, 5) and is_newer(second, first)
    assert not is_newer(first, first)  # the same record replayed is a duplicate
    assert is_newer(first, ("ts_ms", 77))  # stored before offsets broke ties: the later arrival wins
    assert not is_newer(first, ("ts_ms", 78))


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


def test_object_and_array_columns_become_json_text():
    mapper = Mapper()
    e = event(key={"id": {"part": 1}}, after={"name": {"en": "Widget"}, "text": ["a", "b"]})
    doc = mapper.document(e, mapper.document_id(e))
    assert doc.id == 'public.t:{"part": 1}' and doc.title == '{"en": "Widget"}' and doc.text == '["a", "b"]'


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


def test_postgres_positions_with_and_without_sequence_compare_by_lsn():
    assert is_newer(("pg", 90, 120), ("lsn", 100)) and not is_newer(("lsn", 5), ("pg", 24023119, 24023128))
    assert is_newer(("lsn", 24023129), ("pg", 24023119, 24023128))


def test_a_document_id_feedback_could_not_name_is_a_bad_event():
    key, value = change_event("c", "public", "articles", {"id": "x" * 300}, after={"id": "x" * 300, "title": "t"},
                              lsn=1)
    event = parse_change(key, value)
    with pytest.raises(BadEvent, match="longer than 256"):
        Mapper().document_id(event)
