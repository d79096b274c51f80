"""The seeds' response envelope: scode, desc, message, message_cn (and
seed 000's messageCn), stack, data. Errors use the same envelope with a non-zero scode; the mapping from
our errors comes from agent/errors.py (rest_status), and no stack trace is
ever sent (`stack` stays null). Under /v3 (seed 003) an error is that seed's
{"error_code", "error_msg"} (errors.cbr_status); under /zstack (seed 004)
ZStack's {"error": {"code", "description", "details", ...}}
(errors.zstack_status)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent import errors

log = logging.getLogger("controller.api")


def ok(data: Any) -> dict:
    # seed 000 shows both spellings: message_cn, and messageCn (empty on success)
    return {
        "scode": 0,
        "desc": "",
        "message": "success",
        "message_cn": "成功",
        "messageCn": "",
        "stack": None,
        "data": data,
    }


def range_list(key: str, items: list, cluster: str, namespace: str, total: int) -> dict:
    """The seeds' paged list answer (pool/share/list, volume/share/list):
    the items, one range state per cluster (one here), TotalCount."""
    state = {
        "cluster_uuid": cluster,
        "cluster_name": "",
        "cluster_mode": "",
        "namespace_uuid": namespace,
        "result": ok(""),
        "total_count": total,
    }
    return ok({key: items, "each_range_list_state": [state], "TotalCount": total})


def zstack_error(code: str, description: str, details: str = "") -> dict:
    """Seed 004's error envelope (ZStack's ErrorCode)."""
    return {
        "error": {
            "code": code,
            "description": description,
            "details": details or description,
            "elaboration": None,
            "opaque": None,
            "cause": None,
        }
    }


def _error_response(e: BaseException, request: Request | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith("/zstack/"):
        http, code, description = errors.zstack_status(e)
        return JSONResponse(status_code=http, content=zstack_error(code, description))
    if request is not None and request.url.path.startswith("/v3/"):
        http, code, message = errors.cbr_status(e)
        return JSONResponse(status_code=http, content={"error_code": code, "error_msg": message})
    http, scode, message, message_cn = errors.rest_status(e)
    desc = getattr(e, "field", None) or ""
    return JSONResponse(
        status_code=http,
        content={
            "scode": scode,
            "desc": desc,
            "message": message,
            "message_cn": message_cn,
            "messageCn": message_cn,
            "stack": None,
            "data": None,
        },
    )


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def install(app) -> None:
    @app.exception_handler(errors.BlockferryError)
    async def _ours(request: Request, e: errors.BlockferryError):
        if e.code == errors.BlockferryError.code:
            log.exception("request failed", extra={"path": request.url.path})
        return _error_response(e, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = _field_of(tuple(first.get("loc", ())))
        reason = first.get("msg", "invalid").lower()
        if first.get("type") == "missing":
            reason = "is required"
        elif first.get("type") == "json_invalid":
            field, reason = "body", "is not valid JSON"
        return _error_response(errors.InvalidArgument(f"{field}: {reason}", field=field), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            err = errors.NotFound(f"path: {request.url.path} is not an endpoint of this API", field="path")
        elif e.status_code == 405:
            err = errors.InvalidArgument(
                f"method: {request.method} is not allowed on {request.url.path}", field="method"
            )
        else:
            err = errors.InvalidArgument(f"request: {e.detail}", field="request")
        resp = _error_response(err, request)
        if e.status_code == 405:
            resp.status_code = 405
        return resp

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error", extra={"path": request.url.path})
        return _error_response(e, request)
