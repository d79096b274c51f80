"""Bearer tokens and tenant scope. A token maps to one tenant (it sees and
changes only that tenant's objects) or to every tenant ("*", an operator).
Another tenant's objects look exactly like missing ones."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agent.controller.config import ALL_TENANTS
from agent.controller.context import ControllerContext
from agent.errors import NotFound, Unauthenticated


@dataclass(frozen=True)
class Caller:
    tenant: str  # ALL_TENANTS for an operator

    @property
    def operator(self) -> bool:
        return self.tenant == ALL_TENANTS

    def sees(self, tenant: str) -> bool:
        return self.operator or self.tenant == tenant

    def check_tenant(self, tenant: str, field: str = "tenant") -> None:
        """A request that names a tenant must name the caller's own."""
        if tenant and not self.sees(tenant):
            raise NotFound(f"{field}: tenant {tenant} does not exist", field=field)


# declares the bearer scheme in the OpenAPI (the Authorize button of /docs);
# the token is read below, from whichever header the seed's clients send
_BEARER = HTTPBearer(auto_error=False, description="a [[tokens]] token of the controller's config")


def authenticated(request: Request, _shown: HTTPAuthorizationCredentials | None = Depends(_BEARER)) -> Caller:
    """The caller of a request, from its bearer token (a FastAPI
    dependency of every endpoint)."""
    header = request.headers.get("authorization", "")
    scheme, _, sent = header.partition(" ")
    # seed 003 sends its token as X-Auth-Token, seed 004 as "OAuth <session>"
    if scheme.lower() not in ("bearer", "oauth"):
        sent = request.headers.get("x-auth-token", "")
    if sent:
        for t in context(request).cfg.tokens:
            if hmac.compare_digest(sent.encode(), t.token.encode()):
                return Caller(t.tenant)
    raise Unauthenticated(
        "authorization: send 'Authorization: Bearer <token>' (or 'OAuth <token>', or X-Auth-Token: <token>) "
        "with a configured token",
        field="authorization",
    )


def context(request: Request) -> ControllerContext:
    """The controller's typed context, which the application holds."""
    return request.app.state.ctx
