"""GET /status: a read-only status page for operators, rendered on the
server (templates/status.html, Jinja2 with autoescape, no JavaScript):
hosts, pools and backup points with their health and capacity, running
tasks with their progress, recent failed tasks, and every volume's last
good backup, oldest first. It refreshes itself every 15 s.

An operator token is required: sent as a bearer token, or entered once in
the form at /status/login, which sets a session cookie (HttpOnly,
SameSite=Strict, Path=/status, Secure over HTTPS, 8 hours) signed with the
controller's key; the cookie names the token by a hash, so removing the
token from the config ends its sessions."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func, select

from agent import __version__
from agent.controller.api.auth import context
from agent.controller.config import ALL_TENANTS
from agent.controller.health import Fleet, host_state
from agent.controller.models import Backup, BackupPoint, Host, Pool, Task, Volume

COOKIE = "bf_status"
SESSION_SECONDS = 8 * 3600
MAX_VOLUMES = 500

router = APIRouter(prefix="/status", include_in_schema=False)
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")), autoescape=select_autoescape(["html"])
)


def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _operator_tokens(request: Request) -> list[str]:
    return [t.token for t in context(request).cfg.tokens if t.tenant == ALL_TENANTS]


def _signed_in(request: Request) -> bool:
    """An operator's bearer token, or a valid session cookie of one."""
    header = request.headers.get("authorization", "")
    scheme, _, sent = header.partition(" ")
    if scheme.lower() == "bearer" and sent:
        return any(hmac.compare_digest(sent.encode(), t.encode()) for t in _operator_tokens(request))
    exp, _, rest = request.cookies.get(COOKIE, "").partition(".")
    tid, _, sig = rest.partition(".")
    if not exp.isdigit() or int(exp) < time.time():
        return False
    if not context(request).secrets.verify(f"{exp}.{tid}", sig):
        return False
    return any(hmac.compare_digest(tid, _token_id(t)) for t in _operator_tokens(request))


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "never"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f} {unit}"
    return f"{seconds} s"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} PiB"


def _gather(request: Request) -> dict:
    ctx = context(request)
    now = time.time()
    with ctx.db.session() as s:
        fleet = Fleet(s, ctx.cfg.host_dead_after, now)
        hosts = [
            {
                "name": h.hostname or h.uuid,
                "uuid": h.uuid,
                "state": host_state(h, ctx.cfg.host_dead_after, now),
                "version": h.version,
                "seen": _age(now - h.last_seen) + " ago",
                "jobs": f"{h.running_jobs} / {h.max_jobs}",
            }
            for h in s.scalars(select(Host).order_by(Host.hostname, Host.uuid))
        ]

        def health(kind: str, uuid: str, name: str, h) -> dict:
            return {
                "kind": kind,
                "name": name,
                "uuid": uuid,
                "state": h.state,
                "reason": h.reason,
                "capacity": f"{_bytes(h.available_bytes)} free of {_bytes(h.total_bytes)}" if h.total_bytes else "",
            }

        pools = [
            health(p.kind, p.uuid, p.name, fleet.pool(p.uuid)) for p in s.scalars(select(Pool).order_by(Pool.name))
        ]
        points = [
            health(b.btype, b.uuid, b.name, fleet.backup_point(b.uuid))
            for b in s.scalars(select(BackupPoint).order_by(BackupPoint.name))
        ]
        running = [
            {
                "id": t.id,
                "operation": t.operation_type,
                "status": t.status,
                "progress": round(t.progress or 0.0, 1),
                "resource": t.resource_uuid,
                "host": t.host_uuid,
                "since": _when(t.started_at or t.created_at),
            }
            for t in s.scalars(
                select(Task).where(Task.status.in_(("running", "waiting"))).order_by(Task.created_at).limit(200)
            )
        ]
        failed = [
            {
                "id": t.id,
                "operation": t.operation_type,
                "status": t.status,
                "code": t.error_code,
                "message": t.error_message,
                "ended": _when(t.ended_at),
            }
            for t in s.scalars(
                select(Task).where(Task.status.in_(("failed", "timeout"))).order_by(Task.ended_at.desc()).limit(20)
            )
        ]
        last = dict(
            s.execute(
                select(Backup.volume_uuid, func.max(Backup.ctime))
                .where(Backup.status == "BackupSucceeded")
                .group_by(Backup.volume_uuid)
            ).all()
        )
        names = {p.uuid: p.name for p in s.scalars(select(Pool))}
        volumes = sorted(
            (
                {
                    "name": v.name,
                    "uuid": v.uuid,
                    "pool": names.get(v.pool_uuid, v.pool_uuid),
                    "last": _when(last.get(v.uuid)),
                    "age_seconds": now - last[v.uuid] if v.uuid in last else float("inf"),
                }
                for v in s.scalars(select(Volume).where(Volume.state == "ready"))
            ),
            key=lambda x: -x["age_seconds"],
        )[:MAX_VOLUMES]
    for v in volumes:
        v["age"] = "no backup yet" if v["age_seconds"] == float("inf") else _age(v["age_seconds"])
    return {
        "now": _when(now),
        "version": __version__,
        "hosts": hosts,
        "pools": pools,
        "points": points,
        "running": running,
        "failed": failed,
        "volumes": volumes,
    }


@router.get("", response_class=HTMLResponse)
def page(request: Request) -> Response:
    if not _signed_in(request):
        return RedirectResponse("/status/login", status_code=303)
    html = _templates.get_template("status.html").render(**_gather(request))
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, failed: int = 0) -> HTMLResponse:
    html = _templates.get_template("login.html").render(failed=bool(failed), version=__version__)
    return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY"})


@router.post("/login")
async def login(request: Request) -> Response:
    form = parse_qs((await request.body()).decode(errors="replace")[:4096])
    token = (form.get("token") or [""])[0].strip()
    if not any(hmac.compare_digest(token.encode(), t.encode()) for t in _operator_tokens(request)):
        return RedirectResponse("/status/login?failed=1", status_code=303)
    exp = str(int(time.time()) + SESSION_SECONDS)
    tid = _token_id(token)
    value = f"{exp}.{tid}.{context(request).secrets.sign(f'{exp}.{tid}')}"
    r = RedirectResponse("/status", status_code=303)
    r.set_cookie(
        COOKIE,
        value,
        max_age=SESSION_SECONDS,
        path="/status",
        httponly=True,
        samesite="strict",
        secure=bool(context(request).cfg.tls_cert),
    )
    return r


@router.post("/logout")
def logout() -> Response:
    r = RedirectResponse("/status/login", status_code=303)
    r.delete_cookie(COOKIE, path="/status")
    return r
