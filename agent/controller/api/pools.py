"""Seed 002: shared storage pools, /v1/pool/share/*.

A pool is served by agents: create attaches it on every eligible host
(AvailHosts when LimitHost, else every online host that supports its type)
and rolls back if any host refuses. Volume pools of pool_type 2 (nfs: qcow2
volumes on an NFSv3 export, `ip` and `source` = the export path, reached by
the agents in user space), 4 (disk: a directory on each host, a local disk
or any mounted file system, when `source` is an absolute path), 4 and 5 with
`source` a /dev/disk/by-id name (a shared LUN: a SAN disk by WWN, an FC
device from fc_device/list; qcow2 layers in slices of it,
docs/shared-pools.md; AvailHosts are the hosts that see it) and 6 (rbd: a
RADOS pool; attr.ceph_conf names the cluster's ceph.conf on the hosts) are
served, and 1 (iscsi: `source` the target IQN, `attr.lun` the LUN, `ip` and
`port` the portal; reached in user space). 3 (samba) is refused with the
reason (qemu has no SMB driver).
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.api.v1 import host_pb2, volumes_pb2
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok, range_list
from agent.controller.api.shapes import answers, v1
from agent.controller.health import Fleet, Health, host_state
from agent.controller.models import Host, Pool
from agent.errors import (
    AlreadyExists,
    BlockferryError,
    HasDependents,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TargetUnreachable,
)
from agent.fields import check_nfs_export, check_nfs_server

POOL_TYPES = {1: "iscsi", 2: "nfs", 3: "samba", 4: "disk", 5: "fc", 6: "rbd"}
SERVED = {1: "lun", 2: "nfs", 4: "dir", 5: "lun", 6: "rbd"}  # seed pool_type -> what the agents serve (4 by WWN: lun)
MASK = "******"


class PoolListRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    tenant: StrictStr = ""
    filter_name: StrictStr = ""
    page_num: StrictInt = 0
    page_size: StrictInt = 0


class GetRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    tenant: StrictStr
    pool_uuid: StrictStr


class PoolCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    pool_name: StrictStr
    pool_type: StrictInt
    zone_uuid: StrictStr
    ip: StrictStr
    port: StrictStr = ""
    source: StrictStr = ""
    username: StrictStr = ""
    password: StrictStr = ""
    limit_host: StrictBool = False
    avail_host: list[StrictStr] = []
    avail_tenant: list[StrictStr] = []
    attr: dict[StrictStr, StrictStr]


class PoolDeleteRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    tenant: StrictStr
    pool_uuid: StrictStr
    pool_name: StrictStr


class SetRequest(PoolDeleteRequest):
    attr: dict[StrictStr, StrictStr]


class StatusRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    tenant: StrictStr
    pool_uuid: StrictStr


class FcRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    cluster_uuid: StrictStr
    zone_uuid: StrictStr


def _attr(attr: dict[str, str]) -> dict[str, str]:
    t = attr.get("overAllocationThreshold")
    if t is not None:
        try:
            ok_ = 0 < float(t) <= 100
        except ValueError:
            ok_ = False
        if not ok_:
            raise InvalidArgument(
                f"attr.overAllocationThreshold: {t!r} must be a number in (0, 100]",
                field="attr.overAllocationThreshold",
            )
    for k, val in attr.items():
        if len(k) > 64 or len(val) > 1024:
            raise InvalidArgument(f"attr.{k[:64]}: key or value too long", field="attr")
    return dict(attr)


def _lease_attr(attr: dict[str, str]) -> dict[str, float]:
    """A shared LUN pool's lease timing from attr (seconds): leaseTimeout,
    leaseIoTimeout; absent, the agents' defaults (60 and 5)."""
    out = {}
    for key, name in (("leaseTimeout", "lease_timeout"), ("leaseIoTimeout", "lease_io_timeout")):
        if key in attr:
            try:
                out[name] = float(attr[key])
            except ValueError:
                out[name] = -1.0
            if not 0 < out[name] <= 3600:
                raise InvalidArgument(f"attr.{key}: {attr[key]!r} must be seconds in (0, 3600]", field=f"attr.{key}")
    timeout, io = out.get("lease_timeout", 60.0), out.get("lease_io_timeout", 5.0)
    if timeout <= 3 * io:
        raise InvalidArgument(
            f"attr.leaseTimeout: {timeout}s must exceed 3 x leaseIoTimeout ({io}s)", field="attr.leaseTimeout"
        )
    return out


def to_seed(p: Pool, caller: Caller, health: Health) -> dict:
    """Status is the seed's: the last check (at create, or status/check);
    Health is what the hosts' heartbeats say now (health.py)."""
    return {
        "UUID": p.uuid,
        "Name": p.name,
        "Type": p.pool_type,
        "NamespaceUUID": "",
        "ZoneUUID": p.zone_uuid,
        "ZoneName": p.zone_name,
        "MachineUUID": p.machine_uuid,
        "IP": p.ip,
        "Port": p.port,
        "Source": p.source,
        "Username": p.username,
        "Password": MASK if p.password_sealed else "",
        "Ctime": p.ctime,
        "Mtime": p.mtime,
        "VolumeTotalCount": 0,
        "AvailHosts": _avail_hosts(p, health) or None,
        "Volumes": None,
        "Capacity": p.capacity,
        "ShareNsUUIDs": None,
        "Used": p.used,
        "Attr": json.loads(p.attr_json),
        "ShareNsNames": None,
        "Status": p.status,
        "AllocatedCapacity": p.used if p.kind == "lun" else 0,  # a shared LUN: bytes its slice table allocated
        "LimitHost": p.limit_host,
        "Health": health.to_json(),
    }


def _wrap(pool: dict | None, cluster: str, tenant: str = "") -> dict:
    return {
        "pool": pool,
        "cluster_uuid": cluster,
        "cluster_name": "",
        "cluster_mode": "",
        "tenant": tenant,
        "tenant_name": "",
        "PoolTypes": None,
    }


def _avail_hosts(p: Pool, health: Health) -> list[str]:
    """The hosts that serve the pool; for a shared LUN, without those whose
    host lease lapsed (their agent died), as the freshest heartbeat read the
    leases (a host still joining is not lapsed)."""
    hosts = json.loads(p.avail_hosts_json)
    if p.kind == "lun":
        hosts = [h for h in hosts if h not in health.lapsed_hosts]
    return hosts


def _health(request: Request, pool_uuid: str) -> Health:
    with context(request).db.session() as s:
        return Fleet(s, context(request).cfg.host_dead_after).pool(pool_uuid)


def _visible(p: Pool, caller: Caller) -> bool:
    tenants = json.loads(p.avail_tenants_json)
    return caller.operator or not tenants or caller.tenant in tenants


def _operator(caller: Caller) -> None:
    if not caller.operator:
        raise PermissionDenied(
            "authorization: shared pools are managed with operator tokens only", field="authorization"
        )


def online_hosts(s, dead_after: int) -> list[Host]:
    return [
        h
        for h in s.scalars(select(Host).order_by(Host.hostname, Host.uuid)).all()
        if host_state(h, dead_after) == "online"
    ]


router = APIRouter(prefix="/v1/pool/share", tags=["shared pools (seed 002)"])


def get_pool(s, pool_uuid: str, cluster: str, caller: Caller) -> Pool:
    p = s.get(Pool, pool_uuid)
    if p is None or p.cluster_uuid != cluster or not _visible(p, caller):
        raise NotFound(f"pool_uuid: pool {pool_uuid} does not exist", field="pool_uuid")
    return p


@router.post("/list", **answers(v1.PoolListAnswer))
def list_(req: PoolListRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    if req.tenant:
        caller.check_tenant(v.uuid(req.tenant, "tenant"))
    offset, limit = v.page(req.page_num, req.page_size)
    q = select(Pool).where(Pool.cluster_uuid == cluster)
    if req.filter_name:
        q = q.where(Pool.name.contains(req.filter_name, autoescape=True))
    with context(request).db.session() as s:
        pools = [p for p in s.scalars(q.order_by(Pool.ctime, Pool.name)).all() if _visible(p, caller)]
        fleet = Fleet(s, context(request).cfg.host_dead_after)
    total = len(pools)
    pools = pools[offset : offset + limit] if limit else pools[offset:]
    infos = [
        {
            "tenant": req.tenant,
            "tenant_name": "",
            "pool": to_seed(p, caller, fleet.pool(p.uuid)),
            "cluster_uuid": cluster,
            "cluster_name": "",
            "cluster_mode": "",
        }
        for p in pools
    ]
    return range_list("infos", infos, cluster, req.tenant, total)


@router.post("/get", **answers(v1.PoolEnvelope))
def get(req: GetRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    pid = v.uuid(req.pool_uuid, "pool_uuid")
    with context(request).db.session() as s:
        p = get_pool(s, pid, cluster, caller)
    return ok(_wrap(to_seed(p, caller, _health(request, p.uuid)), cluster, tenant))


@router.post("/create", **answers(v1.PoolEnvelope))
def create(req: PoolCreateRequest, request: Request, caller: Caller = Depends(authenticated)):
    _operator(caller)
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    zone = v.uuid(req.zone_uuid, "zone_uuid")
    name = v.name(req.pool_name, "pool_name")
    if req.pool_type not in POOL_TYPES:
        raise InvalidArgument(
            f"pool_type: must be one of {sorted(POOL_TYPES)} "
            f"({', '.join(f'{k} {n}' for k, n in POOL_TYPES.items())}), not {req.pool_type}",
            field="pool_type",
        )
    if req.pool_type == 3:
        raise InvalidArgument(
            "pool_type: 3 (samba) holds backups only: qemu has no SMB block driver, and a qcow2 on an SMB "
            "share would need the kernel's cifs client mounted on every host, which blockferry does not use; "
            "add the share as a backup point (seed 000 backuppoint/add), and keep volumes on 1 (iscsi), "
            "2 (nfs), 4 (disk), 5 (fc) or 6 (rbd)",
            field="pool_type",
        )
    ip = v.host(req.ip, "ip")
    if req.port and (not (req.port.isascii() and req.port.isdigit()) or not 0 < int(req.port) < 65536):
        raise InvalidArgument(f"port: {req.port!r} is not a port number", field="port")
    attr = _attr(req.attr)
    hosts_wanted = [v.uuid(h, "avail_host") for h in req.avail_host]
    tenants = [v.uuid(t, "avail_tenant") for t in req.avail_tenant]
    kind = SERVED[req.pool_type]
    if req.pool_type == 1:  # an iSCSI LUN: source the target IQN, attr.lun the LUN, ip:port the portal
        if bool(req.username) != bool(req.password):
            raise InvalidArgument("username: CHAP needs both username and password", field="username")
        source = v.iqn(req.source, "source")
        lun = attr.get("lun", "0")
        if not (lun.isascii() and lun.isdigit()) or int(lun) > 16383:
            raise InvalidArgument(f"attr.lun: {lun!r} is not a LUN number (0-16383)", field="attr.lun")
        attach = dict(
            type="lun",
            ip=ip,
            port=int(req.port or 0),
            target=source,
            lun=int(lun),
            username=req.username,
            secret=req.password,  # CHAP; the agents keep it 0600 and hand it to qemu as a secret object
            format_lun=True,
            **_lease_attr(attr),
        )
    elif req.pool_type == 5 or (req.pool_type == 4 and not req.source.startswith("/")):
        # a shared LUN: seed 002's Source is its /dev/disk/by-id name (wwn-0x...), the same on every host
        kind = "lun"
        source = v.by_id_name(req.source, "source")
        attach = dict(type="lun", device=source, format_lun=True, **_lease_attr(attr))
    elif kind == "dir":
        source = v.abs_path(req.source, "source")
        attach = dict(type="dir", path=source)
    elif kind == "nfs":
        source = check_nfs_export(v.abs_path(req.source, "source"), "source")
        check_nfs_server(ip)
        if req.port:
            raise InvalidArgument(
                f"port: {req.port!r}: an nfs pool is reached through the server's portmapper "
                "(qemu's nfs driver takes no port); leave port empty",
                field="port",
            )
        attach = dict(type="nfs", ip=ip, export=source)
    else:
        source = req.source
        if (
            not source
            or len(source) > 128
            or any(c in source for c in "/\\ ")
            or any(ord(c) < 32 or ord(c) == 127 for c in source)
        ):
            raise InvalidArgument(
                "source: must be the RADOS pool name (no '/', '\\', spaces or control characters)", field="source"
            )
        conf = v.abs_path(attr.get("ceph_conf", ""), "attr.ceph_conf") if attr.get("ceph_conf") else ""
        if not conf:
            raise InvalidArgument(
                "attr.ceph_conf: an rbd pool needs the path of ceph.conf on the hosts", field="attr.ceph_conf"
            )
        attach = dict(type="rbd", ceph_conf=conf, rbd_pool=source, client_name=req.username or "client.admin")
    if req.limit_host and not hosts_wanted:
        raise InvalidArgument("avail_host: limit_host needs at least one host", field="avail_host")
    state = context(request)
    pool_uuid = str(uuidlib.uuid4())
    with state.db.session() as s:
        if s.scalar(select(Pool).where(Pool.cluster_uuid == cluster, Pool.name == name)):
            raise AlreadyExists(f"pool_name: a pool named {name!r} exists already", field="pool_name")
        online = online_hosts(s, state.cfg.host_dead_after)
    by_uuid = {h.uuid: h for h in online}
    if req.limit_host:
        missing = [h for h in hosts_wanted if h not in by_uuid]
        if missing:
            raise NotFound(
                f"avail_host: host(s) {', '.join(missing)} are not registered or not online", field="avail_host"
            )
        hosts = [by_uuid[h] for h in hosts_wanted]
        elsewhere = [h for h in hosts if not h.in_scope(cluster, zone)]
        if elsewhere:
            h = elsewhere[0]
            raise InvalidArgument(
                f"avail_host: host {h.hostname or h.uuid} belongs to cluster "
                f"{h.cluster_uuid or 'any'}, zone {h.zone_uuid or 'any'}; the pool is for "
                f"cluster {cluster}, zone {zone}",
                field="avail_host",
            )
    else:
        hosts = [
            h for h in online if kind in json.loads(h.facts_json).get("pool_types", []) and h.in_scope(cluster, zone)
        ]
    if not hosts:
        raise TargetUnreachable(
            f"avail_host: no online host of cluster {cluster}, zone {zone} can serve a {kind} pool", field="avail_host"
        )
    zone_name = next((h.zone_name for h in hosts if h.zone_uuid == zone and h.zone_name), "default")
    attached, status, unseen = [], None, []
    try:
        for h in hosts:
            try:
                st = state.agents.client(h).attach_pool(volumes_pb2.AttachPoolRequest(pool_uuid=pool_uuid, **attach))
            except NotFound as e:
                if kind != "lun":
                    raise
                if req.limit_host:  # a host the operator named does not see the LUN
                    raise NotFound(f"source: host {h.hostname or h.uuid}: {e.message}", field="source") from None
                unseen.append(f"{h.hostname or h.uuid}: {e.message}")  # this host does not see the LUN
                continue
            attached.append(h)
            status = status or st
        if not attached:
            raise NotFound(f"source: no host sees LUN {source} ({'; '.join(unseen)})", field="source")
    except BlockferryError:
        for h in attached:  # all or nothing
            try:
                state.agents.client(h).detach_pool(volumes_pb2.DetachPoolRequest(pool_uuid=pool_uuid, force=True))
            except BlockferryError:
                pass
        raise
    now = int(time.time())
    p = Pool(
        uuid=pool_uuid,
        cluster_uuid=cluster,
        zone_uuid=zone,
        name=name,
        pool_type=req.pool_type,
        kind=kind,
        ip=ip,
        port=req.port,
        source=source,
        username=req.username,
        password_sealed=state.secrets.seal(req.password),
        limit_host=req.limit_host,
        avail_hosts_json=json.dumps([h.uuid for h in attached]),
        avail_tenants_json=json.dumps(tenants),
        attr_json=json.dumps(attr),
        status=status.status,
        capacity=status.total_bytes,
        used=status.used_bytes,
        machine_uuid=attached[0].uuid,
        ctime=now,
        mtime=0,
        zone_name=zone_name,
    )
    try:
        with state.db.session() as s:
            s.add(p)
    except IntegrityError:
        raise AlreadyExists(f"pool_name: a pool named {name!r} exists already", field="pool_name") from None
    return ok(_wrap(to_seed(p, caller, _health(request, p.uuid)), cluster))


@router.post("/delete", **answers(v1.PoolDeletedAnswer))
def delete(req: PoolDeleteRequest, request: Request, caller: Caller = Depends(authenticated)):
    _operator(caller)
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    v.uuid(req.tenant, "tenant")
    pid = v.uuid(req.pool_uuid, "pool_uuid")
    state = context(request)
    with state.db.session() as s:
        p = get_pool(s, pid, cluster, caller)
        hosts = [s.get(Host, h) for h in json.loads(p.avail_hosts_json)]
    for h in hosts:
        if h is None:
            continue
        try:
            state.agents.client(h).detach_pool(volumes_pb2.DetachPoolRequest(pool_uuid=pid))
        except NotFound:
            pass  # that host does not serve it (any more)
        except HasDependents:
            raise HasDependents(
                f"pool_uuid: pool {p.name!r} still holds volumes; delete them first", field="pool_uuid"
            ) from None
    with state.db.session() as s:
        s.delete(s.get(Pool, pid))
    return ok({"pool": {}})


@router.post("/set", **answers(v1.PoolEnvelope))
def set_(req: SetRequest, request: Request, caller: Caller = Depends(authenticated)):
    _operator(caller)
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    v.uuid(req.tenant, "tenant")
    pid = v.uuid(req.pool_uuid, "pool_uuid")
    name = v.name(req.pool_name, "pool_name")
    attr = _attr(req.attr)
    try:
        with context(request).db.session() as s:
            p = get_pool(s, pid, cluster, caller)
            merged = dict(json.loads(p.attr_json), **attr)
            p.name, p.attr_json, p.mtime = name, json.dumps(merged), int(time.time())
    except IntegrityError:
        raise AlreadyExists(f"pool_name: a pool named {name!r} exists already", field="pool_name") from None
    return ok(_wrap(to_seed(p, caller, _health(request, p.uuid)), cluster))


@router.post("/status/check", **answers(v1.PoolEnvelope))
def status_check(req: StatusRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    pid = v.uuid(req.pool_uuid, "pool_uuid")
    state = context(request)
    with state.db.session() as s:
        p = get_pool(s, pid, cluster, caller)
        hosts = [s.get(Host, h) for h in json.loads(p.avail_hosts_json)]
    statuses, capacity, used = [], None, None
    for h in hosts:
        if h is None or host_state(h, state.cfg.host_dead_after) != "online":
            statuses.append("unreachable")
            continue
        try:
            st = state.agents.client(h).get_pool_status(volumes_pb2.PoolRef(pool_uuid=pid), timeout=30)
            statuses.append(st.status)
            capacity, used = st.total_bytes, st.used_bytes
        except BlockferryError:
            statuses.append("unreachable")
    worst = next((x for x in ("unreachable", "degraded") if x in statuses), "healthy") if statuses else "unknown"
    if worst == "unreachable" and "healthy" in statuses:
        worst = "degraded"  # some hosts still reach it
    with state.db.session() as s:
        p = s.get(Pool, pid)
        p.status = worst
        if capacity is not None:
            p.capacity, p.used = capacity, used
    return ok(_wrap(to_seed(p, caller, _health(request, p.uuid)), cluster, tenant))


@router.get("/pool_type/support", **answers(v1.PoolEnvelope))
def pool_type_support(request: Request, cluster_uuid: str = Query(...), caller: Caller = Depends(authenticated)):
    cluster = v.uuid(cluster_uuid, "cluster_uuid")
    with context(request).db.session() as s:
        hosts = online_hosts(s, context(request).cfg.host_dead_after)
    served = set()
    for h in hosts:
        if h.cluster_uuid in ("", cluster):
            served.update(json.loads(h.facts_json).get("shared_pool_types", []))
    types = [name for _, name in sorted(POOL_TYPES.items()) if name in served]  # seed order
    return ok(dict(_wrap(None, cluster), PoolTypes=types))


@router.post("/fc_device/list", **answers(v1.FcDevicesAnswer))
def fc_device_list(req: FcRequest, request: Request, caller: Caller = Depends(authenticated)):
    _operator(caller)
    v.uuid(req.cluster_uuid, "cluster_uuid")
    v.uuid(req.zone_uuid, "zone_uuid")
    state = context(request)
    with state.db.session() as s:
        hosts = online_hosts(s, state.cfg.host_dead_after)
    out: dict[str, list] = {}
    for h in hosts:
        try:
            devices = state.agents.client(h).list_fc_devices(host_pb2.ListFcDevicesRequest(), timeout=30)
        except BlockferryError:
            continue  # a host that does not answer lists nothing
        for d in devices.devices:
            out.setdefault(d.id, []).append({"host_uuid": h.uuid, "host_name": h.hostname, "disk_path": d.disk_path})
    return ok({"list": out})
