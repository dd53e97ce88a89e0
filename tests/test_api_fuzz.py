"""Schemathesis fuzzes the running worker's API from its own /openapi.json: no server errors, and
every reply (status, content type, headers, body) as the schema documents it.

The worker runs on a throwaway data dir, so what the fuzzer publishes goes nowhere that matters.
Each operation is fuzzed with hypothesis over schemathesis's strategy for it, positive and
negative: schemathesis's pytest loader from a fixture (the schema exists only once the worker
runs) fails on pytest 9.2, reading Function._nodeid.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from autoglm.topics import ensure_topics
from tests.conftest import WorkerProcess

DERANDOMIZE = bool(os.environ.get("CI"))  # CI replays one fixed set of examples; a developer's run explores
MAX_FEEDBACK_ITEMS = 20  # keeps generated lists, and the time to post them, small
MAX_EXAMPLES = 100  # per operation and mode: the run takes about half a minute on 2 cores
# Schemathesis's own list of statuses that refuse invalid data, plus 413: a body with too many
# feedback events is refused that way (the limit is the size, not the shape).
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
"""


@pytest.fixture(scope="module")
def api_schema(broker, tmp_path_factory):
    ensure_topics(broker, ["cdc.fuzz.docs"])  # a stream processor joins its group once it has a topic
    root = tmp_path_factory.mktemp("fuzz")
    worker = WorkerProcess(broker, root / "data", root / "worker.log",
                           ["--cdc-topics", r"^cdc\.fuzz\.", "--api-max-feedback-items", str(MAX_FEEDBACK_ITEMS)])
    worker.wait_healthy()
    yield schemathesis.openapi.from_url(f"{worker.url}/openapi.json", config=SchemathesisConfig.from_str(CONFIG))
    worker.stop()


def as_clients_send_it(case) -> None:
    """Two rules of valid feedback JSON Schema cannot state: its timestamp lies within the
    retention, and its position is spelled 3, not 3.0 (JSON Schema's integer admits both;
    autoglm/interactions.py refuses floats). Feedback generated as valid is given both."""
    if case.operation.path != "/feedback" or not case.meta.generation.mode.is_positive:
        return
    events = case.body if isinstance(case.body, list) else [case.body]
    for event in events:
        if "ts" in event:
            event["ts"] = datetime.now(timezone.utc).isoformat()
        event["position"] = int(event["position"])


def fuzz(operation, mode: GenerationMode) -> str | None:
    """The first failure of generated requests to one operation, or None."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=DERANDOMIZE)
    def requests(case) -> None:
        as_clients_send_it(case)
        case.call_and_validate()

    try:
        requests()
    except Unsatisfiable:  # nothing to negate: an operation without parameters, a free-form string
        return None
    except (Exception, BaseExceptionGroup) as exc:  # the report names the check, request and reply
        return f"{mode} {operation.label}: {exc}"
    return None


@pytest.mark.slow
def test_api_replies_as_documented(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"GET /search", "POST /feedback", "POST /hooks/mlflow"}
    failures = [failure for op in operations for mode in GenerationMode if (failure := fuzz(op, mode))]
    assert not failures, "\n\n".join(failures)
