"""Seed 001, the synchronous part: /v1/volume/share/{create,delete,get,
used/update,snap_length/update} and snapshot/{create,delete,rollback,
tree/get,list}. Each call goes to an online agent that serves the volume's
pool (the host that created it first). Clones and backups are tasks
(dispatch), in their own router."""

from __future__ import annotations

import json
import random
import time
import uuid as uuidlib

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from sqlalchemy import func, select

from agent.api.v1 import volumes_pb2
from agent.client import AgentClient
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok, range_list
from agent.controller.api.pools import _visible
from agent.controller.api.shapes import answers, v1
from agent.controller.inventory import serving_hosts
from agent.controller.models import Host, Pool, Volume
from agent.errors import AlreadyExists, InvalidArgument, NoSpace, NotFound, TargetUnreachable

VTYPES = ("block", "share", "fs")
MAX_CAPACITY = 1 << 50  # 1 PiB


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")  # the seeds send extra fields ("pool_name")


class VolumeListRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    filter_pool_uuid: StrictStr = ""
    filter_name: StrictStr = ""
    page_num: StrictInt = 0
    page_size: StrictInt = 0


class VolumeCreateRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    pool_uuid: StrictStr
    volume_name: StrictStr
    volume_type: StrictStr
    capacity: StrictInt = 0
    snap_capacity: StrictInt
    backing_file: StrictStr = ""


class VolumeRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    volume_uuid: StrictStr


class NamedVolumeRequest(VolumeRequest):
    volume_name: StrictStr


class VolumeDeleteRequest(NamedVolumeRequest):
    force: StrictBool = False


class SnapCreateRequest(VolumeRequest):
    snapshot_name: StrictStr
    desc: StrictStr = ""


class SnapRefRequest(VolumeRequest):
    snapshot_uuid: StrictStr


class SnapDeleteRequest(SnapRefRequest):
    snapshot_name: StrictStr


def _wrap(volume, **extra) -> dict:
    return {
        "volume": volume,
        "clone_progress": extra.get("clone_progress", 0),
        "cluster_uuid": "",
        "cluster_name": "",
        "cluster_mode": "",
        "tenant": "",
        "tenant_name": "",
    }


def _snap_wrap(snapshot=None, tree=None) -> dict:
    return {
        "snapshot": snapshot,
        "tree": tree,
        "cluster_uuid": "",
        "cluster_name": "",
        "cluster_mode": "",
        "tenant": "",
        "tenant_name": "",
    }


def volume_to_seed(vol: Volume, pool: Pool | None, hosts: list[str]) -> dict:
    return {
        "UUID": vol.uuid,
        "Name": vol.name,
        "NamespaceUUID": vol.tenant,
        "Type": vol.vtype,
        "PoolUUID": vol.pool_uuid,
        "Capacity": vol.capacity,
        "Used": vol.used,
        "Attr": json.loads(vol.attr_json),
        "PoolName": pool.name if pool else "",
        "ZoneUUID": pool.zone_uuid if pool else "",
        "ZoneName": pool.zone_name if pool else "default",
        "SnapLength": vol.snap_length,
        "SnapCap": vol.snap_cap,
        "Ctime": vol.ctime,
        "Mtime": vol.mtime,
        "AccessPath": {h: vol.access_path for h in hosts} or None,
        "EventState": 0,
        "ShareNsUUIDs": None,
        "Parent": vol.parent,
        "ParentSnapshot": vol.parent_snapshot,
        "Children": None,
    }


router = APIRouter(prefix="/v1/volume/share", tags=["shared volumes (seed 001)"])


def check_name(vol: Volume, name: str, field: str) -> None:
    """A delete that names the volume as well as giving its uuid must name
    that volume: a stale or mistyped name never deletes another one. (The
    seed's other bodies carry names that are not the volume's, "snap" in
    used/update, "zzz" in clone: there the name is not checked.)"""
    if name and name != vol.name:
        raise InvalidArgument(
            f"{field}: {name!r} is not the name of volume {vol.uuid} ({vol.name!r}); nothing was done", field=field
        )


def load(request: Request, req: VolumeRequest, caller: Caller) -> tuple[Volume, Pool, list[Host]]:
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    vid = v.uuid(req.volume_uuid, "volume_uuid")
    state = context(request)
    with state.db.session() as s:
        vol = s.get(Volume, vid)
        if vol is None or vol.tenant != tenant or vol.cluster_uuid != cluster:
            raise NotFound(f"volume_uuid: volume {vid} does not exist", field="volume_uuid")
        pool = s.get(Pool, vol.pool_uuid)
        hosts = serving_hosts(s, pool, state.cfg.host_dead_after, vol.host_uuid) if pool else []
    if not hosts:
        raise TargetUnreachable(
            f"volume_uuid: no online host serves pool {vol.pool_uuid} of volume {vid}", field="volume_uuid"
        )
    return vol, pool, hosts


def client(request: Request, host: Host) -> AgentClient:
    return context(request).agents.client(host)


@router.post("/list", **answers(v1.VolumeListAnswer))
def list_(req: VolumeListRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    q = select(Volume).where(Volume.cluster_uuid == cluster, Volume.tenant == tenant)
    if req.filter_pool_uuid:
        q = q.where(Volume.pool_uuid == v.uuid(req.filter_pool_uuid, "filter_pool_uuid"))
    if req.filter_name:
        q = q.where(Volume.name.contains(req.filter_name, autoescape=True))
    offset, limit = v.page(req.page_num, req.page_size)
    state = context(request)
    with state.db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        q = q.order_by(Volume.ctime, Volume.name).offset(offset)
        rows = s.scalars(q.limit(limit) if limit else q).all()
        pools = {p.uuid: p for p in s.scalars(select(Pool).where(Pool.uuid.in_({x.pool_uuid for x in rows})))}
        hosts = {pid: [h.uuid for h in serving_hosts(s, p, state.cfg.host_dead_after)] for pid, p in pools.items()}
    items = [
        {
            "tenant": x.tenant,
            "tenant_name": "",
            "volume": volume_to_seed(x, pools.get(x.pool_uuid), hosts.get(x.pool_uuid, [])),
            "cluster_uuid": cluster,
            "cluster_name": "",
            "cluster_mode": "",
        }
        for x in rows
    ]
    return range_list("list", items, cluster, tenant, total)


@router.post("/create", **answers(v1.VolumeEnvelope))
def create(req: VolumeCreateRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    pid = v.uuid(req.pool_uuid, "pool_uuid")
    name = v.name(req.volume_name, "volume_name")
    if req.volume_type not in VTYPES:
        raise InvalidArgument(
            f"volume_type: must be one of {', '.join(VTYPES)}, not {req.volume_type!r}", field="volume_type"
        )
    if not req.backing_file and req.capacity <= 0:
        raise InvalidArgument("capacity: must be positive (or give backing_file)", field="capacity")
    if req.capacity < 0 or req.capacity > MAX_CAPACITY:
        raise InvalidArgument(f"capacity: must be 0 to {MAX_CAPACITY} bytes", field="capacity")
    if req.snap_capacity < 0 or req.snap_capacity > MAX_CAPACITY:
        raise InvalidArgument(f"snap_capacity: must be 0 to {MAX_CAPACITY} bytes", field="snap_capacity")
    state = context(request)
    with state.db.session() as s:
        pool = s.get(Pool, pid)
        if pool is None or pool.cluster_uuid != cluster or not _visible(pool, Caller(tenant)):
            raise NotFound(f"pool_uuid: pool {pid} does not exist", field="pool_uuid")
        backing = ""
        if req.backing_file:  # adopt: an image of the RADOS pool, or a file under the agents' roots
            backing = (
                v.rbd_image(req.backing_file, pool.source, "backing_file")
                if pool.kind == "rbd"
                else v.abs_path(req.backing_file, "backing_file")
            )
        threshold = float(json.loads(pool.attr_json).get("overAllocationThreshold", "0") or 0)
        allocated = s.scalar(select(func.coalesce(func.sum(Volume.capacity), 0)).where(Volume.pool_uuid == pid)) or 0
        if threshold and pool.capacity and allocated + req.capacity > threshold * pool.capacity:
            raise NoSpace(
                f"capacity: pool {pool.name!r} would be allocated beyond its overAllocationThreshold "
                f"{threshold} ({allocated + req.capacity} of {pool.capacity} bytes)",
                field="capacity",
            )
        hosts = serving_hosts(s, pool, state.cfg.host_dead_after)
    if not hosts:
        raise TargetUnreachable(f"pool_uuid: no online host serves pool {pid}", field="pool_uuid")
    vid = str(uuidlib.uuid4())
    hosts.insert(0, hosts.pop(random.randrange(len(hosts))))  # spread new volumes over the serving hosts
    info = client(request, hosts[0]).create_volume(
        volumes_pb2.CreateVolumeRequest(
            pool_uuid=pid, volume_uuid=vid, name=name, capacity=req.capacity, backing_file=backing
        )
    )
    now = int(time.time())
    vol = Volume(
        uuid=vid,
        tenant=tenant,
        cluster_uuid=cluster,
        pool_uuid=pid,
        name=name,
        vtype=req.volume_type,
        capacity=info.capacity,
        used=info.used,
        snap_cap=req.snap_capacity,
        host_uuid=hosts[0].uuid,
        access_path=info.access_path,
        ctime=now,
        mtime=now,
    )
    with state.db.session() as s:
        s.add(vol)
    return ok(_wrap(volume_to_seed(vol, pool, [h.uuid for h in hosts])))


@router.post("/delete", **answers(v1.VolumeEnvelope))
def delete(req: VolumeDeleteRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    check_name(vol, req.volume_name, "volume_name")
    client(request, hosts[0]).delete_volume(
        volumes_pb2.DeleteVolumeRequest(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid, force=req.force)
    )
    with context(request).db.session() as s:
        s.delete(s.get(Volume, vol.uuid))
    return ok(_wrap(None))


def refresh(request: Request, vol: Volume, host: Host) -> Volume:
    info = client(request, host).get_volume(volumes_pb2.VolumeRef(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid))
    with context(request).db.session() as s:
        row = s.get(Volume, vol.uuid)
        row.capacity, row.used, row.snap_length = info.capacity, info.used, info.snapshot_bytes
        row.parent, row.parent_snapshot = info.parent_volume, info.parent_snapshot
        row.access_path = info.access_path
        return row


@router.post("/get", **answers(v1.VolumeEnvelope))
def get(req: VolumeRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    return ok(_wrap(volume_to_seed(refresh(request, vol, hosts[0]), pool, [h.uuid for h in hosts])))


@router.post("/used/update", **answers(v1.VolumeEnvelope))
def used_update(req: NamedVolumeRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    refresh(request, vol, hosts[0])
    return ok(_wrap(None))


@router.post("/snap_length/update", **answers(v1.VolumeEnvelope))
def snap_length_update(req: NamedVolumeRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    refresh(request, vol, hosts[0])
    return ok(_wrap(None))


def snapshots(request: Request, vol: Volume, host: Host) -> list:
    return list(
        client(request, host)
        .list_snapshots(volumes_pb2.VolumeRef(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid))
        .snapshots
    )


def snap_to_seed(snap, names: dict[str, str]) -> dict:
    return {
        "Name": snap.name,
        "UUID": snap.uuid,
        "Volume": snap.volume_uuid,
        "Desc": snap.description,
        "Status": 0,
        "Ctime": int(snap.created_at),
        "Attr": {"LinkCloneUsed": "LinkCloneUsed"} if snap.clones else None,
        "Size": snap.size,
        "Children": [names.get(c, c) for c in snap.children],
        "Parent": names.get(snap.parent, snap.parent),
        "Ref": len(snap.clones),
    }


@router.post("/snapshot/create", **answers(v1.SnapshotEnvelope))
def snapshot_create(req: SnapCreateRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    name = v.name(req.snapshot_name, "snapshot_name")
    if len(req.desc) > 1024:
        raise InvalidArgument("desc: longer than 1024 characters", field="desc")
    if name == "head":
        raise InvalidArgument("snapshot_name: 'head' names the live state", field="snapshot_name")
    if any(x.name == name for x in snapshots(request, vol, hosts[0])):
        raise AlreadyExists(f"snapshot_name: volume {vol.uuid} has a snapshot named {name!r}", field="snapshot_name")
    client(request, hosts[0]).create_snapshot(
        volumes_pb2.CreateSnapshotRequest(
            pool_uuid=vol.pool_uuid,
            volume_uuid=vol.uuid,
            snapshot_uuid=str(uuidlib.uuid4()),
            name=name,
            description=req.desc,
        )
    )
    snaps = snapshots(request, vol, hosts[0])
    names = {x.uuid: x.name for x in snaps}
    mine = next(x for x in snaps if x.name == name)
    return ok(_snap_wrap(snapshot=snap_to_seed(mine, names)))


def snap_ref(request, req: SnapRefRequest, caller):
    vol, pool, hosts = load(request, req, caller)
    sid = v.uuid(req.snapshot_uuid, "snapshot_uuid")
    return vol, hosts, volumes_pb2.SnapshotRef(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid, snapshot_uuid=sid)


@router.post("/snapshot/delete", **answers(v1.SnapshotEnvelope))
def snapshot_delete(req: SnapDeleteRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, hosts, ref = snap_ref(request, req, caller)
    client(request, hosts[0]).delete_snapshot(ref)
    return ok(_snap_wrap())


@router.post("/snapshot/rollback", **answers(v1.SnapshotEnvelope))
def snapshot_rollback(req: SnapRefRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, hosts, ref = snap_ref(request, req, caller)
    client(request, hosts[0]).rollback_snapshot(ref)
    return ok(_snap_wrap())


@router.post("/snapshot/tree/get", **answers(v1.SnapshotEnvelope))
def snapshot_tree(req: VolumeRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    t = client(request, hosts[0]).get_snapshot_tree(
        volumes_pb2.VolumeRef(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid)
    )
    tree = {
        "UUID": "",
        "Parents": dict(t.parents),
        "Children": {k: {"Children": list(x.names)} for k, x in t.children.items()},
        "Root": t.root,
    }
    return ok(_snap_wrap(tree=tree))


@router.post("/snapshot/list", **answers(v1.SnapshotListAnswer))
def snapshot_list(req: VolumeRequest, request: Request, caller: Caller = Depends(authenticated)):
    vol, pool, hosts = load(request, req, caller)
    snaps = snapshots(request, vol, hosts[0])
    names = {x.uuid: x.name for x in snaps}
    return ok({"list": [snap_to_seed(x, names) for x in snaps]})
