"""The search HTTP API (FastAPI): /search, /feedback, /documents/{id}, /models, /healthz, /metrics,
and the receiver of MLflow's alias webhooks (/hooks/mlflow).

Every /search answer is published as an impression; /feedback validates user actions and
publishes them. Both go to Kafka keyed by query_id, so the stream processors can join them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from fastapi import Body, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from autoglm import topics
from autoglm.interactions import Feedback, Impression, ShownHit
from autoglm.publisher import EventPublisher
from registry import webhooks
from search.query import SearchService, snippet

HealthProbe = Callable[[], dict[str, str | None]]  # component -> None when up, else why it is down


@dataclass(frozen=True)
class AliasHook:
    """Where verified alias webhooks go: the secret MLflow signs with, and what to call."""

    secret: str
    on_alias_moved: Callable[[], None]


def create_app(service: SearchService, health: HealthProbe, publisher: EventPublisher,
               alias_hook: AliasHook | None = None, models_overview: Callable[[], dict] | None = None) -> FastAPI:
    app = FastAPI(title="Open-AutoGLM search", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def clear_validation_errors(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "; ".join(messages),
                                                      "detail": exc.errors()})

    @app.get("/search")
    def search(q: str = Query(..., min_length=1, description="plain text; no query syntax"),
               k: int = Query(10, ge=1, le=100),
               mode: Literal["bm25", "dense", "hybrid"] = "hybrid",
               session: str | None = Query(None, description="session id (or header X-Session-Id)"),
               log: bool = Query(True, description="false for offline evaluation: no impression is logged"),
               x_session_id: str | None = Header(None)) -> dict:
        if not q.strip():
            raise RequestValidationError([{"loc": ("query", "q"), "msg": "must not be blank",
                                           "type": "value_error"}])
        session_id = x_session_id or session
        result = service.search(q, k=k, mode=mode, session_id=session_id)
        if log:
            publisher.publish(topics.IMPRESSIONS, result.query_id, Impression(
                query_id=result.query_id, query=q, mode=mode, model_version=result.model_version,
                arm=result.arm, session_id=session_id,
                hits=[ShownHit(doc_id=hit.id, position=rank, score=hit.score)
                      for rank, (hit, _) in enumerate(result.hits, start=1)]))
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

    @app.post("/feedback", status_code=202)
    def feedback(events: Any = Body(..., description="one feedback event or a list of them")) -> dict:
        """All or nothing: when any item is invalid, none is published and each rejection is listed."""
        items = events if isinstance(events, list) else [events]
        accepted, rejected = [], []
        for position, item in enumerate(items):
            try:
                accepted.append(Feedback.model_validate(item))
            except ValidationError as exc:
                reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}"
                                    for e in exc.errors())
                rejected.append({"index": position, "reason": reasons})
        if not items:
            rejected.append({"index": None, "reason": "no feedback events in the body"})
        if rejected:
            return JSONResponse(status_code=422, content={
                "error": f"{len(rejected)} of {len(items)} feedback events rejected; none accepted",
                "rejected": rejected})
        for event in accepted:
            publisher.publish(topics.FEEDBACK, event.query_id, event)
        return {"accepted": len(accepted)}

    @app.get("/documents/{doc_id}")
    def document(doc_id: str) -> dict:
        doc = service.index.get(doc_id)
        if doc is None:
            raise HTTPException(status_code=404, detail=f"no document {doc_id!r}")
        return {"id": doc.id, "title": doc.title, "text": doc.text, "metadata": doc.metadata,
                "source": {"table": doc.table, "position": list(doc.position),
                           "ts_ms": doc.source_ts_ms}}

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        status = health()
        down = {name: why for name, why in status.items() if why}
        body = {"status": "down" if down else "ok",
                "components": {name: (why or "up") for name, why in status.items()}}
        return JSONResponse(status_code=503 if down else 200, content=body)

    @app.get("/models")
    def models() -> dict:
        """Versions, aliases, the arms serving now, gate metrics and per-arm online metrics."""
        if models_overview is None:
            raise HTTPException(status_code=404, detail="no model overview in this server")
        return models_overview()

    @app.post("/hooks/mlflow")
    async def mlflow_webhook(request: Request) -> JSONResponse:
        """An alias moved in MLflow: verify the signature, then let serving sync at once."""
        if alias_hook is None:
            return JSONResponse(status_code=404, content={"error": "no MLflow webhook is configured"})
        reason = webhooks.rejection(alias_hook.secret, request.headers, await request.body())
        if reason:
            return JSONResponse(status_code=401, content={"error": f"webhook refused: {reason}"})
        alias_hook.on_alias_moved()
        return JSONResponse(status_code=200, content={"status": "syncing"})

    @app.get("/metrics")
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
