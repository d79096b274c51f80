"""What the agents' heartbeats say about hosts, pools and backup points.

A host is online while its last heartbeat is younger than
host_dead_after. Every heartbeat carries the host's own probe of each pool
and backup point it serves (status, reason, capacity); the controller
keeps the latest per host and judges an object from all of them at the
moment it is asked, so a host gone silent turns what only it reported
`unknown`, with the reason, without anything having to notice:

- no report at all: `unknown` (no host serves it yet: a controller-added
  backup point is attached at its first use);
- reports only from silent hosts: `unknown`, naming them and their last
  word;
- every online report healthy: `healthy`;
- some online reports healthy, others not: `degraded`, naming the hosts
  that cannot use it and why;
- no online report healthy: the worst of them (auth_failed, unreachable,
  degraded), with their reasons.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import select

from agent.controller.models import Host

STATES = ("healthy", "degraded", "unreachable", "auth_failed", "unknown")
_WORST_FIRST = ("auth_failed", "unreachable", "degraded")


def host_state(h: Host, dead_after: int, now: float | None = None) -> str:
    """Online, draining or offline; `now` lets a caller judge many hosts at one instant."""
    if (time.time() if now is None else now) - h.last_seen > dead_after:
        return "offline"
    return "draining" if h.draining else "online"


@dataclass(frozen=True)
class HostReport:
    """One host's last word on a pool or backup point."""

    host_uuid: str
    hostname: str
    status: str
    reason: str
    total_bytes: int
    available_bytes: int
    seen_at: float
    online: bool
    lapsed_hosts: tuple[str, ...] | None = None  # a shared LUN pool: hosts whose lease lapsed, as this host read them


@dataclass(frozen=True)
class Health:
    state: str  # one of STATES
    reason: str  # empty when healthy
    total_bytes: int
    available_bytes: int
    seen_at: float  # the newest online report's time (0: none)
    reports: tuple[HostReport, ...]
    lapsed_hosts: frozenset[str] = frozenset()  # a shared LUN pool: lapsed leases, by the freshest report

    def to_json(self) -> dict:
        return {
            "state": self.state,
            "reason": self.reason,
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "seen_at": self.seen_at or None,
            "hosts": [
                {
                    "host_uuid": r.host_uuid,
                    "hostname": r.hostname,
                    "status": r.status if r.online else "unknown",
                    "reason": r.reason,
                    "seen_at": r.seen_at,
                }
                for r in self.reports
            ],
        }


NOBODY = (
    "no host reports it: no agent serves it yet (a backup point added through the API is attached at its first use)"
)


def judge(reports: list[HostReport], now: float) -> Health:
    """An object's health from every host's last report of it."""
    online = [r for r in reports if r.online]
    silent = [r for r in reports if not r.online]
    if not reports:
        return Health("unknown", NOBODY, 0, 0, 0.0, ())
    if not online:
        words = "; ".join(
            f"{r.hostname or r.host_uuid} silent for {now - r.seen_at:.0f} s (last said {r.status})" for r in silent
        )
        return Health("unknown", f"every host that serves it is silent: {words}", 0, 0, 0.0, tuple(reports))
    good = [r for r in online if r.status == "healthy"]
    bad = [r for r in online if r.status != "healthy"]
    usable = good or [r for r in online if r.status == "degraded"]
    total = max((r.total_bytes for r in usable), default=0)
    available = max((r.available_bytes for r in usable), default=0)
    seen = max(r.seen_at for r in online)
    why = "; ".join(f"{r.hostname or r.host_uuid}: {r.status}: {r.reason or 'no reason given'}" for r in bad)
    if not bad:
        state = "healthy"
    elif good:
        state = "degraded"
    else:
        state = next((s for s in _WORST_FIRST if any(r.status == s for r in bad)), "unreachable")
    leases = [(r.seen_at, r.lapsed_hosts) for r in online if r.lapsed_hosts is not None]
    lapsed = frozenset(max(leases)[1]) if leases else frozenset()
    return Health(state, why, total, available, seen, tuple(reports), lapsed)


def _reports_of(hosts: list[Host], key: str, field: str, dead_after: int, now: float) -> dict[str, list[HostReport]]:
    out: dict[str, list[HostReport]] = {}
    for h in hosts:
        online = host_state(h, dead_after, now) != "offline"
        for rep in json.loads(getattr(h, field) or "[]"):
            uuid = rep.get(key, "")
            if not uuid:
                continue
            out.setdefault(uuid, []).append(
                HostReport(
                    host_uuid=h.uuid,
                    hostname=h.hostname,
                    status=str(rep.get("status") or "unknown"),
                    reason=str(rep.get("reason") or ""),
                    total_bytes=int(rep.get("total_bytes") or 0),
                    available_bytes=int(rep.get("available_bytes") or 0),
                    seen_at=h.last_seen,
                    online=online,
                    lapsed_hosts=tuple(rep["lapsed_hosts"]) if "lapsed_hosts" in rep else None,
                )
            )
    return out


class Fleet:
    """Every pool's and backup point's health at one instant, from one read
    of the hosts (for lists, metrics and the status page)."""

    def __init__(self, s, dead_after: int, now: float | None = None):
        self.now = time.time() if now is None else now
        hosts = list(s.scalars(select(Host).order_by(Host.uuid)))
        self._pools = _reports_of(hosts, "pool_uuid", "pools_json", dead_after, self.now)
        self._points = _reports_of(hosts, "backup_point_uuid", "backup_points_json", dead_after, self.now)

    def pool(self, uuid: str) -> Health:
        return judge(self._pools.get(uuid, []), self.now)

    def backup_point(self, uuid: str) -> Health:
        return judge(self._points.get(uuid, []), self.now)
