"""The JSON shapes the controller answers with, as pydantic models: the
OpenAPI's response schemas (v1: seeds 000-002, hosts and tasks; v3: seed
003; zstack: seed 004).

Every route declares its shape as its response_model, so FastAPI checks
each answer against it before it is sent: a key the shape does not name
is refused (extra="forbid"), and the whole test suite, which drives
every route with real data, holds the OpenAPI to what is really sent.
The handlers keep building plain dicts in the seeds' spelling; these
models only describe and check them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, create_model


class Shape(BaseModel):
    """An answer's object: exactly these keys."""

    model_config = ConfigDict(extra="forbid")


class Envelope(Shape):
    """Seeds 000-002's envelope: scode 0 and message "success" on success."""

    scode: int
    desc: str
    message: str
    message_cn: str
    messageCn: str
    stack: None
    data: Any


def enveloped(name: str, data: Any, doc: str = "") -> type[Envelope]:
    """The envelope around `data` (a shape, or a type such as None),
    named `name` in the OpenAPI."""
    model = create_model(name, __base__=Envelope, data=(data, ...))
    model.__doc__ = doc or Envelope.__doc__
    return model


class Empty(Shape):
    """An empty object ({})."""


class TaskStarted(Shape):
    """A long operation was queued: follow it at GET /v1/tasks/{task_id}."""

    task_id: str


_BODIES: dict[str, type[BaseModel]] = {}


def answers(model: Any, body: type[BaseModel] | None = None, **extra: Any) -> dict[str, Any]:
    """A route's response_model (answers are checked against it; keys a
    handler leaves out stay out) and, for handlers that read their body
    themselves, the body's documented shape."""
    kw: dict[str, Any] = {"response_model": model, "response_model_exclude_unset": True, **extra}
    if body is not None:
        _BODIES[body.__name__] = body
        kw["openapi_extra"] = {"x-body": body.__name__}
    return kw


def document(doc: dict[str, Any]) -> None:
    """Finish the OpenAPI FastAPI generated: the request bodies marked by
    answers(body=...) (FastAPI only sees an untyped Body there), and the
    errors each API really sends, for 400 and every other status
    ("default"): seeds 000-002's envelope, /v3's {error_code, error_msg},
    /zstack's {error: ...}. FastAPI's 422 is never sent, so it goes."""
    from pydantic.json_schema import models_json_schema

    from agent.controller.api.shapes import v1, v3, zstack

    errors = {"/zstack/": zstack.ZStackError, "/v3/": v3.CbrError, "/": v1.ErrorAnswer}
    models = [*_BODIES.values(), *errors.values()]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, ops in doc.get("paths", {}).items():
        error = next(m for prefix, m in errors.items() if path.startswith(prefix))
        for op in ops.values():
            name = op.pop("x-body", None)
            if name:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
                }
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in ("/healthz", "/readyz"):
                continue
            content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{error.__name__}"}}}
            responses["400"] = {"description": "a bad request: the field at fault and why", "content": content}
            responses["default"] = {
                "description": "an error: not found, conflict, unauthorized, unavailable (docs/errors.md)",
                "content": content,
            }
