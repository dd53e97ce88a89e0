"""/healthz and /metrics, which every process role serves (the search API adds its own routes).

/healthz answers 200 when every component is up and 503 naming the ones that are not, so an
orchestrator restarts a broken replica and a load balancer skips it; /metrics is Prometheus's
scrape of this process alone (scrape every replica, not one behind round-robin).
"""

from __future__ import annotations

from typing import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

HealthProbe = Callable[[], dict[str, str | None]]  # component -> None when up, else why it is down


def add_health_routes(app: FastAPI, health: HealthProbe, role: Callable[[], dict] | None = None) -> FastAPI:
    """``role``: extra facts /healthz shows (a learner says whether it is active or standing by)."""

    @app.get("/healthz", responses={503: {"description": "a component is down; the body says which and why"}})
    def healthz() -> JSONResponse:
        status = health()
        down = {name: why for name, why in status.items() if why}
        body = {"status": "down" if down else "ok",
                "components": {name: (why or "up") for name, why in status.items()}}
        if role:
            body.update(role())
        return JSONResponse(status_code=503 if down else 200, content=body)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def create_health_app(title: str, health: HealthProbe, role: Callable[[], dict] | None = None) -> FastAPI:
    return add_health_routes(FastAPI(title=title, version="0.1.0"), health, role)
