"""Properties of the feedback edge and the join, for any input: parsing gives a record or a
ValidationError, and the join never raises, never grows its state past the bounds, keeps only
feedback on shown documents once it knows the impression, and reads back whatever it stored (or
drops an unreadable entry, never the query)."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timedelta, timezone

import faust.utils.json as faust_json
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from autoglm.interactions import (MAX_HITS, MAX_ID_CHARS, MAX_QUERY_CHARS, Feedback, Impression, ShownHit,
                                  parse_feedback, parse_feedback_json, parse_impression, parse_impression_json)
from feedback.join import Interaction, JoinLimits

NOW = datetime.now(timezone.utc)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**40, max_value=10**40) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)
awkward = st.sampled_from([math.nan, math.inf, -math.inf, True, False, 10**9, 10**30, "3", 3.0, 0, -1, "", None,
                           "x" * (MAX_ID_CHARS + 1), "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
                           "2024-02-30T00:00:00", [], {}]) | json_values


def valid_feedback(**overrides) -> dict:
    return {"event_id": str(uuid.uuid4()), "query_id": "q1", "doc_id": "d1", "type": "dwell", "position": 2,
            "value": 42.5, "session_id": "s1", "ts": (NOW - timedelta(minutes=1)).isoformat(), **overrides}


def valid_impression() -> dict:
    return {"query_id": "q1", "query": "enzyme kinetics", "mode": "hybrid", "model_version": "base",
            "arm": "champion", "session_id": "s1", "ts": NOW.isoformat(),
            "hits": [{"doc_id": f"d{rank}", "position": rank, "score": 1.0 / rank} for rank in range(1, 4)]}


@st.composite
def mutated(draw, valid: dict) -> dict:
    """A valid record with a few fields deleted, retyped or added, at the top or inside a hit."""
    record = json.loads(json.dumps(valid))
    for _ in range(draw(st.integers(1, 3))):
        target = record
        if "hits" in record and isinstance(record["hits"], list) and record["hits"] and draw(st.booleans()):
            target = draw(st.sampled_from(record["hits"]))
            if not isinstance(target, dict):
                continue
        field = draw(st.sampled_from(sorted(target) + ["surprise"]))
        if draw(st.integers(0, 3)) == 0:
            target.pop(field, None)
        else:
            target[field] = draw(awkward)
    return record


def parses_or_refuses(parse, raw) -> object | None:
    try:
        return parse(raw, now=NOW)
    except ValidationError:
        return None


def test_the_reported_poisons_are_refused_with_a_reason():
    for bad, field in ((dict(value=math.nan), "value"), (dict(value=math.inf), "value"),
                       (dict(position=True), "position"), (dict(position=10**9), "position"),
                       (dict(position=10**30), "position"), (dict(position=3.0), "position"),
                       (dict(position="3"), "position"), (dict(ts="0001-01-01T00:00:00Z"), "ts"),
                       (dict(ts="9999-12-31T23:59:59Z"), "ts"), (dict(value=86401), "event"),
                       (dict(doc_id="d" * (MAX_ID_CHARS + 1)), "doc_id")):
        with pytest.raises(ValidationError) as refused:
            parse_feedback(valid_feedback(**bad), now=NOW)
        assert refused.value.errors()[0]["loc"][:1] in ((field,), ())
    with pytest.raises(ValidationError, match="finite number"):
        parse_feedback_json(b'{"event_id": "%s", "query_id": "q", "doc_id": "d", "type": "dwell", '
                            b'"position": 1, "value": NaN}' % str(uuid.uuid4()).encode())
    assert parse_feedback(valid_feedback(ts="2024-01-01T00:00:00"), now=datetime(2024, 1, 2, tzinfo=timezone.utc),
                          ).ts == datetime(2024, 1, 1, tzinfo=timezone.utc)  # no zone: UTC
    with pytest.raises(ValidationError, match="older than"):
        parse_feedback(valid_feedback(ts=(NOW - timedelta(hours=2)).isoformat()), retention_s=3600, now=NOW)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_give_a_record_or_a_validation_error(raw):
    parses_or_refuses(parse_feedback_json, raw)
    parses_or_refuses(parse_impression_json, raw)


@FAST
@given(json_values)
def test_any_json_gives_a_record_or_a_validation_error(value):
    for parse in (parse_feedback, parse_impression):
        parses_or_refuses(parse, value)
    for parse in (parse_feedback_json, parse_impression_json):
        parses_or_refuses(parse, json.dumps(value))


@FAST
@given(st.data())
def test_mutated_events_give_a_record_that_reads_back_or_a_validation_error(data):
    for valid, parse, parse_json in ((valid_feedback(), parse_feedback, parse_feedback_json),
                                     (valid_impression(), parse_impression, parse_impression_json)):
        record = data.draw(mutated(valid))
        parsed, from_json = parses_or_refuses(parse, record), parses_or_refuses(parse_json, json.dumps(record))
        assert (parsed is None) == (from_json is None)
        if parsed is not None and "ts" in record:  # without ts, each takes its own time of parsing
            assert from_json == parsed
        if parsed is not None:  # what the join stores reads back unchanged, however old it gets
            assert parse(parsed.model_dump(mode="json"), retention_s=math.inf) == parsed


ids = st.text(min_size=1, max_size=8) | st.text(st.characters(min_codepoint=0x10000), min_size=MAX_ID_CHARS,
                                                max_size=MAX_ID_CHARS)
feedback_events = st.builds(
    lambda event_id, doc_id, kind, position, session: Feedback(
        event_id=event_id, query_id="q1", doc_id=doc_id, type=kind, position=position,
        value={"dwell": 40.0, "rating": 5}.get(kind), session_id=session),
    st.uuids() | st.sampled_from([uuid.UUID(int=1), uuid.UUID(int=2)]), ids | st.sampled_from(["d1", "d2"]),
    st.sampled_from(["click", "dwell", "rating", "skip"]), st.integers(1, 3) | st.integers(1, 1000), ids | st.none())
impressions = st.builds(
    lambda query, docs: Impression(query_id="q1", query=query, mode="hybrid", model_version="base",
                                   hits=[ShownHit(doc_id=d, position=i, score=0.5) for i, d in enumerate(docs, 1)]),
    st.text(max_size=50), st.lists(ids | st.sampled_from(["d1", "d2", "d3"]), max_size=30))


def feedback(doc_id: str, position: int, kind: str = "click", query_id: str = "q1") -> Feedback:
    return Feedback(event_id=uuid.uuid4(), query_id=query_id, doc_id=doc_id, type=kind, position=position,
                    value={"dwell": 40.0, "rating": 5}.get(kind))


def shown(*doc_ids: str) -> Impression:
    return Impression(query_id="q1", query="q", mode="hybrid", model_version="base",
                      hits=[ShownHit(doc_id=d, position=i, score=0.5) for i, d in enumerate(doc_ids, 1)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(feedback_events | impressions, max_size=40), st.integers(1, 30), st.integers(2_000, 30_000),
       st.integers(2_000, 30_000))
def test_the_join_never_raises_and_its_state_stays_within_the_bounds(records, per_query, impression_bytes,
                                                                     feedback_bytes):
    limits = JoinLimits(feedback_per_query=per_query, impression_bytes=impression_bytes,
                        feedback_bytes=feedback_bytes)
    stored = None
    for offset, record in enumerate(records):
        interaction = Interaction.from_record("q1", stored, 0.0, limits)
        if isinstance(record, Impression):
            verdict = interaction.add_impression(record, limits)
        else:
            verdict = interaction.add_feedback(record, 0, offset, limits)
        assert (verdict.reason is not None) == (verdict.outcome == "refused")
        if verdict.kept:
            stored = interaction.to_record()
        kept = Interaction.from_record("q1", stored, 0.0, limits)
        events = kept.events
        assert len(events) <= per_query
        assert len({e.event_id for e in events}) == len({(e.doc_id, e.type) for e in events}) == len(events)
        if kept.impression:  # only feedback on what was shown, where it was shown
            hits = {(hit.doc_id, hit.position) for hit in kept.impression.hits}
            assert {(e.doc_id, e.position) for e in events} <= hits and len(events) <= 4 * len(hits)
        assert len(json.dumps(stored)) <= impression_bytes + feedback_bytes + 200  # plus the record's framing


LONGEST = "\U0001F600" * MAX_ID_CHARS  # 256 four-byte characters, escaped to 12 bytes each in JSON


def largest_impression(hits: int = MAX_HITS) -> Impression:
    return Impression(query_id=LONGEST, query="\U0001F600" * MAX_QUERY_CHARS, mode="hybrid", model_version=LONGEST,
                      arm="challenger", session_id=LONGEST,
                      hits=[ShownHit(doc_id=f"{i}{LONGEST}"[:MAX_ID_CHARS], position=i, score=-1.2345678901234567e-300)
                            for i in range(1, hits + 1)])


def test_every_impression_the_schema_accepts_fits_the_join_with_room_to_spare():
    """The search API answers at most 100 hits; an impression of 1000 longest ids (which the
    schema took before) was accepted and then refused by the join as too large."""
    with pytest.raises(ValidationError, match="at most 100 items"):
        largest_impression(MAX_HITS + 1)
    limits = JoinLimits()
    size = len(json.dumps(largest_impression().model_dump(mode="json")))
    assert size < 0.8 * limits.impression_bytes
    assert Interaction(opened_at=0.0).add_impression(largest_impression(), limits).outcome == "joined"


def test_the_worst_state_a_query_can_hold_fits_in_one_broker_message():
    """The largest impression and far more feedback on its hits than the join keeps, every
    identifier as long as it can be: Faust's own serialisation of the record, with its key,
    still fits the 1 MB a producer and broker take by default."""
    limits, interaction = JoinLimits(), Interaction(opened_at=0.0)
    impression = largest_impression()
    interaction.add_impression(impression, limits)
    outcomes = [interaction.add_feedback(Feedback(event_id=uuid.uuid4(), query_id=LONGEST, doc_id=hit.doc_id,
                                                  type=kind, position=hit.position, session_id=LONGEST,
                                                  value={"dwell": 40.0, "rating": 5}.get(kind)),
                                         0, 10**18, limits).outcome
                for hit in impression.hits for kind in ("click", "dwell", "rating", "skip")]
    assert outcomes.count("joined") < 100 and outcomes.count("refused") > 300
    record = len(faust_json.dumps(interaction.to_record()).encode()) + len(json.dumps(LONGEST))
    assert record < limits.impression_bytes + limits.feedback_bytes < 1_000_000


def test_feedback_on_unshown_documents_cannot_fill_the_cap_of_its_query():
    """100 clicks on documents the impression never showed filled the cap, and then the user's
    genuine click on a shown document was refused."""
    limits, interaction = JoinLimits(), Interaction(opened_at=0.0)
    interaction.add_impression(shown("d1", "d2", "d3"), limits)
    for i in range(limits.feedback_per_query):
        verdict = interaction.add_feedback(feedback(f"unshown-{i}", 1), 0, i, limits)
        assert verdict.outcome == "refused"
        assert verdict.reason == f"feedback on a document not shown: doc_id 'unshown-{i}' was not shown for " \
                                 f"query_id 'q1'"
    misplaced = interaction.add_feedback(feedback("d2", 3), 0, 100, limits)
    assert misplaced.outcome == "refused" and misplaced.reason == (
        "feedback position does not match the impression: doc_id 'd2' was shown at position 2, not 3, "
        "for query_id 'q1'")
    assert interaction.add_feedback(feedback("d2", 2), 0, 101, limits).outcome == "joined"
    assert [(e.doc_id, e.position) for e in interaction.events] == [("d2", 2)]


def test_waiting_feedback_the_impression_does_not_match_is_handed_back_with_its_reason():
    limits, interaction = JoinLimits(), Interaction(opened_at=0.0)
    genuine, unshown, misplaced = feedback("d1", 1), feedback("elsewhere", 1), feedback("d2", 1, "dwell")
    for offset, event in enumerate((genuine, unshown, misplaced)):
        assert interaction.add_feedback(event, 0, offset, limits).outcome == "waiting"
    verdict = interaction.add_impression(shown("d1", "d2"), limits)
    assert verdict.outcome == "joined" and verdict.joined_feedback == (genuine,)
    assert [(item.event, item.offset, reason.split(":")[0]) for item, reason in verdict.unmatched] == [
        (unshown, 1, "feedback on a document not shown"),
        (misplaced, 2, "feedback position does not match the impression")]
    assert interaction.events == [genuine]
    assert Interaction.from_record("q1", interaction.to_record(), 0.0, limits).events == [genuine]


@FAST
@given(st.dictionaries(st.sampled_from(["opened_at", "impression", "feedback", "counted", "event_ids"]),
                       json_values | st.lists(st.fixed_dictionaries({"event": json_values, "partition": json_values,
                                                                     "offset": json_values}), max_size=3)))
def test_any_stored_record_reads_back_without_raising(record):
    interaction = Interaction.from_record("q1", record, 5.0, JoinLimits())
    assert math.isfinite(interaction.opened_at) and len(interaction.feedback) <= 3


def test_an_unreadable_stored_event_is_dropped_and_the_query_keeps_the_rest():
    """The state an older version wrote after a NaN dwell: the NaN became null, which no dwell passes."""
    poisoned, good = valid_feedback(value=None), valid_feedback(type="click", value=None, doc_id="d2")
    record = {"opened_at": 1.0, "impression": valid_impression(), "event_ids": [poisoned["event_id"]],
              "feedback": [{"event": poisoned, "partition": 0, "offset": 7}, {"event": good, "partition": 0, "offset": 8}]}
    interaction = Interaction.from_record("q1", record, 5.0, JoinLimits())
    assert [str(e.event_id) for e in interaction.events] == [good["event_id"]] and interaction.impression
    click = parse_feedback(valid_feedback(type="click", value=None, doc_id="d3", position=3))
    assert interaction.add_feedback(click, 0, 9, JoinLimits()).outcome == "joined"
