"""What every servicer shares: authentication and the error mapping."""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
from contextlib import contextmanager

import grpc

from agent import errors
from agent.jobs.locks import LockMode, ResourceLocks

log = logging.getLogger("agent.service")


class Auth:
    """Bearer-token check for TCP callers; unix-socket callers are trusted by
    the socket's file permissions."""

    def __init__(self, token: str):
        self.token = token

    def check(self, context: grpc.ServicerContext) -> None:
        if not self.token or context.peer().startswith("unix:"):
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            context.set_trailing_metadata(((errors.GRPC_CODE_KEY, errors.Unauthenticated.code),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED: missing or wrong bearer token")


def _abort(context, method, e: BaseException):
    code, message, trailers = errors.grpc_status(e)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("RPC failed", extra={"rpc": method.__name__})
    else:
        log.info("RPC refused", extra={"rpc": method.__name__, "code": code.name})
    context.set_trailing_metadata(trailers)  # the error's code and field, for typed clients
    context.abort(code, message)


def rpc(method):
    """Run a servicer method: authenticate, and map any error to a status."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        self.auth.check(context)
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, method, e)

    @functools.wraps(method)
    def stream_wrapper(self, request, context):
        self.auth.check(context)
        try:
            yield from method(self, request, context)
        except Exception as e:
            _abort(context, method, e)

    return stream_wrapper if inspect.isgeneratorfunction(method) else wrapper


@contextmanager
def exclusive(locks: ResourceLocks, resource: str):
    """Hold a resource for a synchronous change, or refuse if a job has it."""
    if not locks.try_acquire(resource, LockMode.EXCLUSIVE):
        raise errors.Busy(f"resource: {resource} is in use by a running job; try again when it ends", field="resource")
    try:
        yield
    finally:
        locks.release(resource)
