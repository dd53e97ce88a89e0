"""The search HTTP API (FastAPI): /search, /documents/{id}, /healthz, /metrics."""

from __future__ import annotations

from typing import Callable, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from search.query import SearchService, snippet

HealthProbe = Callable[[], dict[str, str | None]]  # component -> None when up, else why it is down


def create_app(service: SearchService, health: HealthProbe) -> FastAPI:
    app = FastAPI(title="Open-AutoGLM search", version="0.1.0")

    @app.exception_handler(RequestValidationError)
    async def clear_validation_errors(_: Request, exc: RequestValidationError) -> JSONResponse:
        messages = [f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in exc.errors()]
        return JSONResponse(status_code=422, content={"error": "; ".join(messages),
                                                      "detail": exc.errors()})

    @app.get("/search")
    def search(q: str = Query(..., min_length=1, description="plain text; no query syntax"),
               k: int = Query(10, ge=1, le=100),
               mode: Literal["bm25", "dense", "hybrid"] = "hybrid") -> dict:
        if not q.strip():
            raise RequestValidationError([{"loc": ("query", "q"), "msg": "must not be blank",
                                           "type": "value_error"}])
        result = service.search(q, k=k, mode=mode)
        return {
            "query_id": result.query_id,
            "model_version": result.model_version,
            "mode": result.mode,
            "hits": [{"id": hit.id, "score": hit.score, "title": doc.title,
                      "snippet": snippet(doc.text, q), "metadata": doc.metadata,
                      "source": {"table": doc.table, "position": list(doc.position)}}
                     for hit, doc in result.hits],
        }

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

    @app.get("/metrics")
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
