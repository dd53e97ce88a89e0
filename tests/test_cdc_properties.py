"""Whatever a CDC topic holds, parsing and mapping it yields a change or a BadEvent, and every
document made can be stored and served as JSON: arbitrary bytes, arbitrary JSON, and real
Debezium events of five connectors mutated at random paths."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from autoglm.debezium import change_event
from autoglm.encoder import Encoder
from autoglm.events import POSITION_LIMIT, BadEvent, Op, is_newer, parse_change
from search.embedded import EmbeddedIndex
from search.protocol import Document
from streams.ingest import IngestSink
from streams.mapping import Mapper, TableMapping
from tests.test_events import SAMPLE_KEYS, SAMPLES

MAPPERS = (Mapper(), Mapper({"public.customers": TableMapping(id_fields=("id",), title_field="name",
                                                              text_fields=("description",),
                                                              metadata_fields=("id", "tags"))}))
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62, max_value=2**70)
           | st.floats() | st.text(max_size=12) | st.sampled_from(["abc", "\ud800", "", "0", "-1", "[]"]))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)


def deep(value, levels):
    for _ in range(levels):
        value = {"v": value}
    return value


RETYPES = (str, lambda v: [v], lambda v: {"v": v}, lambda v: True, lambda v: -1, lambda v: 2**64,
           lambda v: 1.5, lambda v: None, lambda v: "abc", lambda v: "\ud800", lambda v: deep(v, 70),
           lambda v: json.dumps(v) if not isinstance(v, str) else v + "x")


def real_events():
    """(key, payload) pairs as Debezium writes them, including our own builder's events."""
    yield from ((SAMPLE_KEYS[name], payload) for name, payload in SAMPLES.items())
    for op in ("c", "u", "d", "r", "t"):
        key, value = change_event(op, "public", "customers", {"id": 7}, lsn=33, ts_ms=1700000000000,
                                  after=None if op in "dt" else {"id": 7, "name": "n", "description": None, "tags": ["a"]},
                                  before={"id": 7} if op == "d" else None)
        yield json.loads(key), json.loads(value)


REAL_EVENTS = list(real_events())


def paths(tree, prefix=()):
    yield prefix
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for name, child in children:
        yield from paths(child, (*prefix, name))


def mutate(tree, path, action, replacement):
    """Delete, replace or retype the value at path; the root can only be replaced or retyped."""
    if not path:
        return replacement if action == "replace" else RETYPES[action](tree) if action != "delete" else None
    parent = tree
    for name in path[:-1]:
        parent = parent[name]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement if action == "replace" else RETYPES[action](parent[path[-1]])
    return tree


def through_the_edge(key, value, offset=None):
    """What the worker's CDC processor does with one record: parse, then map."""
    results = []
    for mapper in MAPPERS:
        try:
            event = parse_change(key, value, offset=offset)
            if event is None or event.op is Op.TRUNCATE:
                results.append(event)
                continue
            doc_id = mapper.document_id(event)
            results.append(doc_id if event.op is Op.DELETE else mapper.document(event, doc_id))
        except BadEvent as exc:
            assert str(exc)  # a reason for the dead-letter headers
            results.append(exc)
    return results


def assert_storable(result):
    """A document the embedded index and the search API can store and serve as JSON."""
    if isinstance(result, Document):
        fields = [result.id, result.table, result.title, result.text, result.metadata, list(result.position)]
        encoded = json.dumps(fields, ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert json.loads(encoded) == fields
    if hasattr(result, "position"):
        assert not is_newer(result.position, result.position)
        numbers = [part for part in result.position[1:] if isinstance(part, int)]
        assert all(0 <= number < POSITION_LIMIT for number in numbers)


@st.composite
def mutated_real_events(draw):
    key, payload = copy.deepcopy(draw(st.sampled_from(REAL_EVENTS)))
    for _ in range(draw(st.integers(1, 4))):
        target = draw(st.sampled_from(["key", "payload"]))
        tree = key if target == "key" else payload
        path = draw(st.sampled_from(list(paths(tree))))
        action = draw(st.sampled_from(["delete", "replace", *range(len(RETYPES))]))
        tree = mutate(tree, path, action, draw(json_values) if action == "replace" else None)
        key, payload = (tree, payload) if target == "key" else (key, tree)
    wrap = draw(st.booleans())
    encode = (lambda part: {"schema": {"type": "struct"}, "payload": part}) if wrap else (lambda part: part)
    return json.dumps(encode(key)).encode(), json.dumps(encode(payload)).encode()


@PROPERTY
@given(key=st.none() | st.binary(max_size=200), value=st.none() | st.binary(max_size=2000))
def test_arbitrary_bytes_are_a_change_or_a_bad_event(key, value):
    for result in through_the_edge(key, value):
        assert_storable(result)


SOURCE_FIELDS = ("lsn", "sequence", "ts_ms", "file", "pos", "row", "commit_lsn", "change_lsn", "event_serial_no",
                 "scn", "commit_scn", "ord", "schema", "db", "collection")
rows = st.dictionaries(st.sampled_from(["id", "title", "name", "text", "description"]), json_values)
sources = st.fixed_dictionaries(
    {"table": st.just("customers") | json_values},
    optional={"connector": st.sampled_from(sorted(SAMPLES)) | json_values,
              **{name: json_values for name in SOURCE_FIELDS}})


@PROPERTY
@given(key=json_values, value=json_values,
       envelope=st.fixed_dictionaries({"op": st.sampled_from(["c", "u", "d", "r", "t"]) | json_values,
                                       "source": sources | json_values, "after": rows | json_values,
                                       "before": rows | json_values}))
def test_arbitrary_json_is_a_change_or_a_bad_event(key, value, envelope):
    for candidate in (value, envelope):
        for result in through_the_edge(json.dumps(key).encode(), json.dumps(candidate).encode()):
            assert_storable(result)


@PROPERTY
@given(record=mutated_real_events(), offset=st.none() | st.integers(0, 2**40))
def test_mutated_debezium_events_are_a_change_or_a_bad_event(record, offset):
    for result in through_the_edge(*record, offset=offset):
        assert_storable(result)


def test_unmutated_samples_are_changes():
    for key, payload in REAL_EVENTS:
        results = through_the_edge(json.dumps(key).encode(), json.dumps(payload).encode(), offset=1)
        assert not any(isinstance(result, BadEvent) for result in results), results


def test_ts_ms_that_is_not_a_number_is_a_bad_event():
    key, value = change_event("u", "public", "customers", {"id": 7}, after={"id": 7, "name": "n"}, lsn=33)
    payload = json.loads(value)
    payload["source"]["ts_ms"] = "abc"
    with pytest.raises(BadEvent, match="source ts_ms must be an integer"):
        parse_change(key, json.dumps(payload))


@pytest.mark.parametrize("where", ["after", "key", "source"])
def test_a_hundred_thousand_levels_of_nesting_is_a_bad_event(where):
    nested = "[" * 100_000 + "]" * 100_000
    key, row = '{"id": 7}', '{"id": 7, "name": "n"}'
    source = '{"table": "customers", "lsn": 33}'
    if where == "key":
        key = nested
    elif where == "after":
        row = '{"id": 7, "name": "n", "deep": %s}' % nested
    else:
        source = '{"table": "customers", "lsn": 33, "deep": %s}' % nested
    value = '{"op": "c", "after": %s, "source": %s}' % (row, source)
    with pytest.raises(BadEvent, match="nested deeper than 64 levels"):
        parse_change(key.encode(), value.encode())


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    index = EmbeddedIndex(tmp_path_factory.mktemp("cdc-properties") / "index")
    yield IngestSink(index, Encoder())
    index.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(record=mutated_real_events(), offset=st.integers(0, 2**40))
def test_every_document_made_from_a_mutated_event_is_stored_and_read_back(sink, record, offset):
    documents = [result for result in through_the_edge(*record, offset=offset) if isinstance(result, Document)]
    for document in documents:
        if sink.apply([document], {}).applied:  # not when an earlier example stored a newer position
            stored = sink.index.get(document.id)
            assert (stored.title, stored.text, stored.metadata) == (document.title, document.text, document.metadata)
