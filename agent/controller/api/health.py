"""GET /healthz (the process answers) and GET /readyz (the database
answers, the dispatcher runs and the agents' registry listens), both
without a token, for load balancers and systemd-style probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from agent.controller.api.auth import context
from agent.controller.api.shapes import answers, v1

router = APIRouter(tags=["health"])


@router.get("/healthz", **answers(v1.Health))
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=v1.Readiness,
    responses={503: {"model": v1.Readiness, "description": 'not ready: the parts not "ok" say why'}},
)
def readyz(request: Request) -> JSONResponse:
    ctx = context(request)
    checks: dict[str, str] = {}
    try:
        with ctx.db.session() as s:
            s.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # noqa: BLE001 - the probe reports it; details stay in the log
        checks["database"] = f"failed: {type(e).__name__}"
    checks["dispatcher"] = "ok" if ctx.dispatcher is not None and ctx.dispatcher.running else "not running"
    checks["registry"] = "ok" if ctx.registry_ready else "not listening"
    ready = all(x == "ok" for x in checks.values())
    return JSONResponse(status_code=200 if ready else 503, content={"status": "ok" if ready else "unready", **checks})
