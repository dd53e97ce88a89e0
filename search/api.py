"""The search HTTP API (FastAPI): /search, /feedback, /documents/{id}, /models, /healthz, /metrics,
and the receiver of MLflow's alias webhooks (/hooks/mlflow).

Every /search answer is published as an impression; /feedback validates user actions and
publishes them. Both go to Kafka keyed by query_id, so the stream processors can join them.
Limits on bodies, time and requests in flight are search/limits.py's; the OpenAPI schema
documents every reply the API gives, which tests/test_api_fuzz.py checks with schemathesis.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Literal, Mapping, Protocol

from fastapi import Body, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel, ValidationError

from autoglm import topics
from autoglm.health_api import HealthProbe, add_health_routes
from autoglm.interactions import (FEEDBACK_RETENTION_S, MAX_DWELL_S, MAX_ID_CHARS, Feedback, Impression, ShownHit,
                                  parse_feedback)
from autoglm.publisher import EventPublisher
from autoglm.settings import ApiLimits
from search.limits import ApiLimitsMiddleware
from search.query import SearchService, snippet

MAX_LISTED_ERRORS = 20  # a 422 lists this many reasons and counts the rest: replies stay small
MAX_REASON_CHARS = 500  # ... each at most this long (a rejected key may be a megabyte long)
# A query needs one character other than ASCII white space; spelled out because Python, JSON
# Schema (ECMA-262) and pydantic (Rust) disagree on what \s matches.
NOT_BLANK = "[^ \t\n\r\f\v]"

log_ = logging.getLogger(__name__)  # not `log`: /search has a query parameter of that name
UNLOGGED_IMPRESSIONS = Counter("autoglm_impressions_unlogged", "Search answers served without an impression "
                               "because the impression schema refused them")


class WebhookReceiver(Protocol):
    """Where /hooks/mlflow deliveries go (registry/webhooks.py's AliasHook): it checks them and acts."""

    headers: tuple[str, ...]  # the headers a delivery must carry (documented in the OpenAPI schema)

    def receive(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """Act on an authentic delivery and return None, or return why it is refused."""


class ErrorReply(BaseModel):
    error: str


class Detail(BaseModel):
    """FastAPI's own error replies (HTTPException, a body that is not UTF-8)."""

    detail: str


def error(description: str, model: type[BaseModel] = ErrorReply) -> dict:
    return {"description": description, "model": model}


LIMIT_REPLIES = {
    408: error("the request line, headers or body took longer than the limit to arrive"),
    413: error("the body is larger than the limit"),
    503: error("too many requests in flight; retry after the Retry-After header's seconds"),
}


def reasons(errors: list[dict], skip_location: int = 0, whole: str = "event") -> str:
    """pydantic's errors as one bounded line, 'field: why; ...' (``whole`` names an empty location)."""
    line = "; ".join(f"{'.'.join(map(str, err['loc'][skip_location:])) or whole}: {err['msg']}"
                     for err in errors[:MAX_LISTED_ERRORS])
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 1] + "…"


def feedback_body_schema(max_items: int) -> dict:
    """The /feedback body as OpenAPI states it: one event or a list of them, with the rules of
    Feedback's validator that JSON Schema can say (its timestamp must also be recent)."""
    event = Feedback.model_json_schema()
    value_rules = {"rating": {"minimum": 1, "maximum": 5}, "dwell": {"minimum": 0, "maximum": MAX_DWELL_S}}
    event["allOf"] = [{"if": {"properties": {"type": {"const": kind}}},
                       "then": {"properties": {"value": {"type": "number", **bounds}}, "required": ["value"]}}
                      for kind, bounds in value_rules.items()]
    return {"anyOf": [event, {"type": "array", "items": event, "minItems": 1, "maxItems": max_items}]}


def create_app(service: SearchService, health: HealthProbe, publisher: EventPublisher,
               alias_hook: WebhookReceiver | None = None, models_overview: Callable[[], dict] | None = None,
               limits: ApiLimits = ApiLimits(), feedback_retention_s: float = FEEDBACK_RETENTION_S) -> FastAPI:
    app = FastAPI(title="Open-AutoGLM search", version="0.1.0", responses=LIMIT_REPLIES)
    app.add_middleware(ApiLimitsMiddleware, limits=limits)

    @app.exception_handler(RequestValidationError)
    async def clear_validation_errors(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return JSONResponse(status_code=422, content={"error": reasons(errors, skip_location=1, whole="body"),
                                                      "error_count": len(errors),
                                                      "detail": jsonable_encoder(errors[:MAX_LISTED_ERRORS])})

    @app.get("/search")
    def search(q: str = Query(..., min_length=1, max_length=limits.max_query_chars,
                              json_schema_extra={"pattern": NOT_BLANK}, description="plain text; no query syntax"),
               k: int = Query(10, ge=1, le=100),
               mode: Literal["bm25", "dense", "hybrid"] = "hybrid",
               session: str | None = Query(None, max_length=MAX_ID_CHARS,
                                           description="session id (or header X-Session-Id)"),
               log: bool = Query(True, description="false for offline evaluation: no impression is logged"),
               x_session_id: str | None = Header(None, max_length=MAX_ID_CHARS)) -> dict:
        if not re.search(NOT_BLANK, q):
            raise RequestValidationError([{"loc": ("query", "q"), "msg": "must not be blank",
                                           "type": "value_error"}])
        session_id = x_session_id or session
        result = service.search(q, k=k, mode=mode, session_id=session_id)
        if log:
            try:
                impression = Impression(
                    query_id=result.query_id, query=q, mode=mode, model_version=result.model_version,
                    arm=result.arm, session_id=session_id,
                    hits=[ShownHit(doc_id=hit.id, position=rank, score=hit.score)
                          for rank, (hit, _) in enumerate(result.hits, start=1)])
            except ValidationError as exc:  # an answer the join could not read (an id stored before ids had a limit)
                UNLOGGED_IMPRESSIONS.inc()
                log_.warning("impression of query %s not logged: %s", result.query_id, reasons(exc.errors()))
            else:
                publisher.publish(topics.IMPRESSIONS, result.query_id, impression)
        return {
            "query_id": result.query_id,
            "model_version": result.model_version,
            "arm": result.arm,
            "mode": result.mode,
            "hits": [{"id": hit.id, "score": hit.score, "title": doc.title,
                      "snippet": snippet(doc.text, q), "metadata": doc.metadata,
                      "source": {"table": doc.table, "position": list(doc.position)}}
                     for hit, doc in result.hits],
        }

    @app.post("/feedback", status_code=202,
              responses={400: error("the body is not UTF-8", Detail),
                         413: error(f"the body is over the limit, or holds more than {limits.max_feedback_items} events")},
              openapi_extra={"requestBody": {"content": {"application/json": {
                  "schema": feedback_body_schema(limits.max_feedback_items)}}}})
    def feedback(events: Any = Body(..., description="one feedback event or a list of them")) -> dict:
        """All or nothing: when any item is invalid, none is published; the first rejections
        are listed with their reasons, and all are counted."""
        items = events if isinstance(events, list) else [events]
        if len(items) > limits.max_feedback_items:
            return JSONResponse(status_code=413, content={
                "error": f"{len(items)} feedback events in one request; the limit is {limits.max_feedback_items}"})
        accepted, rejected = [], []
        for position, item in enumerate(items):
            try:
                accepted.append(parse_feedback(item, retention_s=feedback_retention_s))
            except ValidationError as exc:
                rejected.append({"index": position, "reason": reasons(exc.errors())})
        if not items:
            rejected.append({"index": None, "reason": "no feedback events in the body"})
        if rejected:
            return JSONResponse(status_code=422, content={
                "error": f"{len(rejected)} of {len(items)} feedback events rejected; none accepted",
                "rejected": rejected[:MAX_LISTED_ERRORS], "rejected_count": len(rejected)})
        for event in accepted:
            publisher.publish(topics.FEEDBACK, event.query_id, event)
        return {"accepted": len(accepted)}

    @app.get("/documents/{doc_id}", responses={404: error("no document with this id", Detail)})
    def document(doc_id: str) -> dict:
        doc = service.index.get(doc_id)
        if doc is None:
            raise HTTPException(status_code=404, detail=f"no document {doc_id!r}")
        return {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata,
                "source": {"table": doc.table, "position": list(doc.position),
                           "ts_ms": doc.source_ts_ms}}

    @app.get("/models", responses={404: error("this server runs without a model registry", Detail)})
    def models() -> dict:
        """Versions, aliases, the arms serving now, gate metrics and per-arm online metrics."""
        if models_overview is None:
            raise HTTPException(status_code=404, detail="no model overview in this server")
        return models_overview()

    @app.post("/hooks/mlflow", responses={401: error("the delivery's signature or timestamp is wrong"),
                                          404: error("no MLflow webhook is configured")},
              openapi_extra={"parameters": [{"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                                            for name in (alias_hook.headers if alias_hook else ())],
                             "requestBody": {"required": True, "content": {"application/json": {"schema": {
                                 "type": "object", "description": "MLflow's webhook payload, as signed"}}}}})
    async def mlflow_webhook(request: Request) -> JSONResponse:
        """An alias moved in MLflow: verify the signature, then let serving sync at once."""
        if alias_hook is None:
            return JSONResponse(status_code=404, content={"error": "no MLflow webhook is configured"})
        reason = alias_hook.receive(request.headers, await request.body())
        if reason:
            return JSONResponse(status_code=401, content={"error": f"webhook refused: {reason}"})
        return JSONResponse(status_code=200, content={"status": "syncing"})

    add_health_routes(app, health)
    return app
