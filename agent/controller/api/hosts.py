"""GET /v1/hosts and /v1/hosts/{uuid}: the registered agent hosts (operators
only), with their state (online/offline from the heartbeat age), facts,
pools and backup points; DELETE /v1/hosts/{uuid} forgets an offline one.
GET /v1/hosts/{uuid}/vms and /v1/vms: the running VMs the hosts report.
GET /v1/zones: the clusters and zones the hosts and pools name."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sqlalchemy import select

from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok
from agent.controller.api.shapes import answers, v1
from agent.controller.health import host_state
from agent.controller.models import Host, Pool
from agent.errors import FailedPrecondition, NotFound, PermissionDenied


def to_json(h: Host, dead_after: int) -> dict:
    return {
        "UUID": h.uuid,
        "Hostname": h.hostname,
        "Address": h.address,
        "Version": h.version,
        "State": host_state(h, dead_after),
        "LastSeen": h.last_seen,
        "RegisteredAt": h.registered_at,
        "RunningJobs": h.running_jobs,
        "MaxJobs": h.max_jobs,
        "Facts": json.loads(h.facts_json),
        "Pools": json.loads(h.pools_json),
        "BackupPoints": json.loads(h.backup_points_json),
        "ClusterUUID": h.cluster_uuid,
        "ZoneUUID": h.zone_uuid,
        "ZoneName": h.zone_name or ("default" if h.zone_uuid else ""),
    }


router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


def operator(caller: Caller) -> None:
    if not caller.operator:
        raise PermissionDenied("authorization: hosts are visible to operator tokens only", field="authorization")


@router.get("", **answers(v1.HostListAnswer))
def list_hosts(request: Request, caller: Caller = Depends(authenticated)):
    operator(caller)
    dead = context(request).cfg.host_dead_after
    with context(request).db.session() as s:
        hosts = s.scalars(select(Host).order_by(Host.hostname, Host.uuid)).all()
    return ok({"total_count": len(hosts), "list": [to_json(h, dead) for h in hosts]})


def load_host(s, host_uuid: str) -> Host:
    h = s.get(Host, host_uuid)
    if h is None:
        raise NotFound(f"host_uuid: host {host_uuid} is not registered", field="host_uuid")
    return h


@router.get("/{host_uuid}", **answers(v1.HostAnswer))
def get_host(host_uuid: str, request: Request, caller: Caller = Depends(authenticated)):
    operator(caller)
    host_uuid = v.uuid(host_uuid, "host_uuid")
    with context(request).db.session() as s:
        h = load_host(s, host_uuid)
    return ok(to_json(h, context(request).cfg.host_dead_after))


@router.delete("/{host_uuid}", **answers(v1.HostForgottenAnswer))
def forget_host(host_uuid: str, request: Request, caller: Caller = Depends(authenticated)):
    """Forget a lost host (operator guide: "Recover from a lost host").
    Only an offline one: its tasks have gone to other hosts by then. An
    agent that comes back registers again."""
    operator(caller)
    host_uuid = v.uuid(host_uuid, "host_uuid")
    dead = context(request).cfg.host_dead_after
    with context(request).db.session() as s:
        h = load_host(s, host_uuid)
        if host_state(h, dead) != "offline":
            raise FailedPrecondition(
                f"host_uuid: host {host_uuid} ({h.hostname}) is {host_state(h, dead)}: "
                f"stop its agent, then forget it after {dead} s without a heartbeat",
                field="host_uuid",
            )
        s.delete(h)
    return ok({"uuid": host_uuid})


def vms_of(h: Host, dead_after: int) -> list[dict]:
    state = host_state(h, dead_after)
    return [{**vm, "HostUUID": h.uuid, "HostState": state} for vm in json.loads(h.vms_json)]


@router.get("/{host_uuid}/vms", **answers(v1.VmListAnswer))
def list_host_vms(host_uuid: str, request: Request, caller: Caller = Depends(authenticated)):
    """The running VMs the host's agent reported last, disks mapped to volumes."""
    operator(caller)
    host_uuid = v.uuid(host_uuid, "host_uuid")
    with context(request).db.session() as s:
        h = load_host(s, host_uuid)
    vms = vms_of(h, context(request).cfg.host_dead_after)
    return ok({"total_count": len(vms), "list": vms})


vms_router = APIRouter(prefix="/v1/vms", tags=["hosts"])


@vms_router.get("", **answers(v1.VmListAnswer))
def list_vms(request: Request, caller: Caller = Depends(authenticated)):
    """The running VMs of every host (HostState says whether the report is fresh)."""
    operator(caller)
    dead = context(request).cfg.host_dead_after
    with context(request).db.session() as s:
        hosts = s.scalars(select(Host).order_by(Host.hostname, Host.uuid)).all()
    vms = [vm for h in hosts for vm in vms_of(h, dead)]
    return ok({"total_count": len(vms), "list": vms})


zones_router = APIRouter(prefix="/v1/zones", tags=["hosts"])


@zones_router.get("", **answers(v1.ZoneListAnswer))
def list_zones(request: Request, caller: Caller = Depends(authenticated)):
    """Every (cluster, zone) a host belongs to or a pool was created in,
    with its hosts (online or not) and number of pools. Hosts without a
    zone serve every zone and are listed under ZoneUUID ""."""
    if not caller.operator:
        raise PermissionDenied("authorization: zones are visible to operator tokens only", field="authorization")
    with context(request).db.session() as s:
        hosts = s.scalars(select(Host)).all()
        pools = s.scalars(select(Pool)).all()
    zones: dict[tuple[str, str], dict] = {}

    def zone(cluster: str, uuid: str) -> dict:
        return zones.setdefault(
            (cluster, uuid), {"ClusterUUID": cluster, "UUID": uuid, "Name": "", "Hosts": [], "PoolCount": 0}
        )

    for h in sorted(hosts, key=lambda h: h.uuid):
        z = zone(h.cluster_uuid, h.zone_uuid)
        z["Hosts"].append(h.uuid)
        z["Name"] = z["Name"] or h.zone_name
    for p in pools:
        z = zone(p.cluster_uuid, p.zone_uuid)
        z["PoolCount"] += 1
        z["Name"] = z["Name"] or (p.zone_name if p.zone_name != "default" else "")
    out = [dict(z, Name=z["Name"] or ("default" if z["UUID"] else "")) for _, z in sorted(zones.items())]
    return ok({"total_count": len(out), "list": out})
