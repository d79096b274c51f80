"""Seed 001's long operations, which return at once with a task:
/v1/volume/share/clone, clone/progress, backup/add, backup/restore; and
backup/delete and backup/list. Plus GET /v1/tasks and /v1/tasks/{id}."""

from __future__ import annotations

import json
import time
import uuid as uuidlib

from fastapi import APIRouter, Depends, Query, Request
from pydantic import StrictBool, StrictStr
from sqlalchemy import func, select

from agent.api.v1 import jobs_pb2
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok
from agent.controller.api.pools import _visible
from agent.controller.api.shapes import answers, v1
from agent.controller.api.volumes import _Base, _wrap, snapshots
from agent.controller.dispatch import new_task
from agent.controller.inventory import remove_backup, serving_hosts
from agent.controller.models import Backup, BackupPoint, Pool, Task, Volume
from agent.errors import InvalidArgument, NotFound, cbr_code

TASK_STATES = ("waiting", "running", "success", "failed", "skipped", "timeout")


class CloneRequest(_Base):
    cluster_uuid: StrictStr
    volume_uuid: StrictStr
    volume_name: StrictStr
    clone_dst_vol_name: StrictStr
    clone_dst_vol_tenant: StrictStr
    clone_dst_pool_uuid: StrictStr
    is_link: StrictBool
    snapshot_uuid: StrictStr


class BackupAddRequest(_Base):
    cluster_uuid: StrictStr
    volume_uuid: StrictStr
    backup_name: StrictStr
    backup_point_uuid: StrictStr
    snapshot_uuid: StrictStr
    desc: StrictStr = ""
    full: StrictBool = False  # not in the seed: force a full re-read (a policy's full_backup_interval)


class BackupDeleteRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    backup_uuid: StrictStr


class RestoreRequest(_Base):
    cluster_uuid: StrictStr
    backup_uuid: StrictStr
    new_volume_name: StrictStr
    new_volume_tenant: StrictStr
    new_pool_uuid: StrictStr


def task_to_json(t: Task) -> dict:
    return {
        "id": t.id,
        "operation_type": t.operation_type,
        "status": t.status,
        "progress": t.progress,
        "created_at": t.created_at,
        "started_at": t.started_at or None,
        "ended_at": t.ended_at or None,
        "error_info": {"code": t.error_code, "error_code": cbr_code(t.error_code), "message": t.error_message}
        if t.error_code
        else None,
        "resource": {"type": t.resource_type, "uuid": t.resource_uuid},
        "tenant": t.tenant,
        "host_uuid": t.host_uuid,
        "attempts": t.attempts + 1,
        "result": _result(t),
    }


def _result(t: Task) -> dict | None:
    """A succeeded task's result; a failed one's when it found something
    (a verify's damaged items)."""
    if t.status == "success":
        return json.loads(t.result_json)
    if t.status == "failed" and t.result_json:
        return json.loads(t.result_json) or None
    return None


def backup_to_seed(b: Backup, bp_name: str = "") -> dict:
    return {
        "tenant": b.tenant,
        "tenant_name": "",
        "UUID": b.uuid,
        "Name": b.name,
        "BpUUID": b.backup_point_uuid,
        "NsUUID": b.tenant,
        "VolumeUUID": b.volume_uuid,
        "VolumeCapacity": b.volume_capacity,
        "Snapshot": b.snapshot_name,
        "Ctime": b.ctime,
        "Desc": b.description,
        "Attr": None,
        "VolumeType": b.volume_type,
        "Mtime": b.mtime,
        "BpName": bp_name,
        "ExpiredTime": 0,
        "VolumeEventStatus": 0,
        "SnapshotUUID": b.snapshot_uuid,
        "Status": b.status,
        "cluster_uuid": b.cluster_uuid,
        "cluster_name": "",
        "cluster_mode": "",
        # beyond the seed: full, incremental or fallback, and why every chunk was read (or tracking degraded)
        "Mode": b.mode,
        "ModeReason": b.mode_reason,
        "Consistency": b.consistency,  # of the snapshot: application, crash or offline (docs/live.md)
    }


router = APIRouter(tags=["long operations and tasks (seed 001)"])


def owned_volume(s, vid: str, cluster: str, caller: Caller, field: str = "volume_uuid") -> Volume:
    vol = s.get(Volume, vid)
    if vol is None or vol.cluster_uuid != cluster or not caller.sees(vol.tenant):
        raise NotFound(f"{field}: volume {vid} does not exist", field=field)
    if vol.state != "ready":
        raise InvalidArgument(f"{field}: volume {vid} is {vol.state}", field=field)
    return vol


def target_pool(s, pid: str, cluster: str, tenant: str, field: str) -> Pool:
    pool = s.get(Pool, pid)
    if pool is None or pool.cluster_uuid != cluster or not _visible(pool, Caller(tenant)):
        raise NotFound(f"{field}: pool {pid} does not exist", field=field)
    return pool


def new_volume(s, *, tenant, cluster, pool: Pool, name, capacity, vtype="block", parent="", parent_snap=""):
    now = int(time.time())
    vol = Volume(
        uuid=str(uuidlib.uuid4()),
        tenant=tenant,
        cluster_uuid=cluster,
        pool_uuid=pool.uuid,
        name=name,
        vtype=vtype,
        capacity=capacity,
        state="creating",
        parent=parent,
        parent_snapshot=parent_snap,
        ctime=now,
        mtime=now,
    )
    s.add(vol)
    return vol


@router.post("/v1/volume/share/clone", **answers(v1.CloneStartedAnswer))
def clone(req: CloneRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    vid = v.uuid(req.volume_uuid, "volume_uuid")
    sid = v.uuid(req.snapshot_uuid, "snapshot_uuid")
    tenant = v.uuid(req.clone_dst_vol_tenant, "clone_dst_vol_tenant")
    caller.check_tenant(tenant, "clone_dst_vol_tenant")
    name = v.name(req.clone_dst_vol_name, "clone_dst_vol_name")
    pid = v.uuid(req.clone_dst_pool_uuid, "clone_dst_pool_uuid")
    state = context(request)
    task_id = str(uuidlib.uuid4())
    with state.db.session() as s:
        src = owned_volume(s, vid, cluster, caller)
        pool = target_pool(s, pid, cluster, tenant, "clone_dst_pool_uuid")
        vol = new_volume(
            s,
            tenant=tenant,
            cluster=cluster,
            pool=pool,
            name=name,
            capacity=src.capacity,
            vtype=src.vtype,
            parent=src.uuid if req.is_link else "",
            parent_snap=sid if req.is_link else "",
        )
        spec = jobs_pb2.CloneSpec(
            pool_uuid=src.pool_uuid,
            volume_uuid=src.uuid,
            snapshot_uuid=sid,
            target_pool_uuid=pid,
            target_volume_uuid=vol.uuid,
            target_name=name,
            linked=req.is_link,
        )
        new_task(
            s,
            task_id=task_id,
            operation="clone",
            tenant=tenant,
            resource_type="volume",
            resource_uuid=vol.uuid,
            job_kind="clone",
            spec=spec,
            pool_uuid=src.pool_uuid,
            target_pool_uuid=pid,
        )
        out = {"UUID": vol.uuid, "Name": name, "PoolUUID": pid, "Status": "CloneStarted"}
    state.dispatcher.wake()
    return ok(dict(_wrap(out), task_id=task_id))


@router.get("/v1/volume/share/clone/progress", **answers(v1.CloneProgressAnswer))
def clone_progress(
    request: Request,
    cluster_uuid: str = Query(...),
    tenant: str = Query(...),
    volume_uuid: str = Query(...),
    caller: Caller = Depends(authenticated),
):
    cluster = v.uuid(cluster_uuid, "cluster_uuid")
    tenant = v.uuid(tenant, "tenant")
    caller.check_tenant(tenant)
    vid = v.uuid(volume_uuid, "volume_uuid")
    with context(request).db.session() as s:
        vol = s.get(Volume, vid)
        if vol is None or vol.tenant != tenant or vol.cluster_uuid != cluster:
            t = s.scalar(select(Task).where(Task.resource_uuid == vid, Task.operation_type == "clone"))
            if t is not None and t.tenant == tenant and t.status in ("failed", "timeout"):
                return ok(
                    dict(_wrap(None, clone_progress=0), error_info={"code": t.error_code, "message": t.error_message})
                )
            raise NotFound(f"volume_uuid: volume {vid} does not exist", field="volume_uuid")
        t = s.scalar(select(Task).where(Task.resource_uuid == vid).order_by(Task.created_at.desc()))
    progress = 100.0 if vol.state == "ready" else (t.progress if t else 0.0)
    return ok(_wrap(None, clone_progress=progress))


def _snapshot_name(request: Request, vid: str, cluster: str, sid: str, caller: Caller) -> str:
    """The snapshot's name (the seed shows it in Snapshot), from a host
    serving the volume's pool; a snapshot the volume does not have is
    refused now. With no host online the name stays empty and the task
    waits for one."""
    state = context(request)
    with state.db.session() as s:
        vol = owned_volume(s, vid, cluster, caller)
        pool = s.get(Pool, vol.pool_uuid)
        hosts = serving_hosts(s, pool, state.cfg.host_dead_after, vol.host_uuid) if pool else []
    if not hosts:
        return ""
    for snap in snapshots(request, vol, hosts[0]):
        if snap.uuid == sid:
            return snap.name
    raise NotFound(f"snapshot_uuid: volume {vid} has no snapshot {sid}", field="snapshot_uuid")


@router.post("/v1/volume/share/backup/add", **answers(v1.BackupStartedAnswer))
def backup_add(req: BackupAddRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    vid = v.uuid(req.volume_uuid, "volume_uuid")
    sid = v.uuid(req.snapshot_uuid, "snapshot_uuid")
    bpid = v.uuid(req.backup_point_uuid, "backup_point_uuid")
    name = v.name(req.backup_name, "backup_name")
    if len(req.desc) > 1024:
        raise InvalidArgument("desc: longer than 1024 characters", field="desc")
    state = context(request)
    task_id = str(uuidlib.uuid4())
    snapshot_name = _snapshot_name(request, vid, cluster, sid, caller)
    with state.db.session() as s:
        vol = owned_volume(s, vid, cluster, caller)
        bp = s.get(BackupPoint, bpid)
        if bp is None or bp.tenant != vol.tenant or bp.cluster_uuid != cluster:
            raise NotFound(f"backup_point_uuid: backup point {bpid} does not exist", field="backup_point_uuid")
        now = int(time.time())
        b = Backup(
            uuid=str(uuidlib.uuid4()),
            tenant=vol.tenant,
            cluster_uuid=cluster,
            name=name,
            description=req.desc,
            backup_point_uuid=bpid,
            volume_uuid=vid,
            volume_capacity=vol.capacity,
            volume_type=vol.vtype,
            pool_uuid=vol.pool_uuid,
            snapshot_uuid=sid,
            snapshot_name=snapshot_name,
            status="BackupStarted",
            task_id=task_id,
            ctime=now,
            mtime=now,
        )
        s.add(b)
        spec = jobs_pb2.BackupSpec(
            backup_point_uuid=bpid,
            pool_uuid=vol.pool_uuid,
            volume_uuid=vid,
            snapshot_uuid=sid,
            backup_uuid=b.uuid,
            name=name,
            description=req.desc,
            tenant=vol.tenant,
            full=req.full,
        )
        new_task(
            s,
            task_id=task_id,
            operation="backup",
            tenant=vol.tenant,
            resource_type="backup",
            resource_uuid=b.uuid,
            job_kind="backup",
            spec=spec,
            pool_uuid=vol.pool_uuid,
            backup_point_uuid=bpid,
        )
        out = backup_to_seed(b, bp.name)
    state.dispatcher.wake()
    return ok({"backup": out, "task_id": task_id})


@router.post("/v1/volume/share/backup/restore", **answers(v1.RestoreStartedAnswer))
def backup_restore(req: RestoreRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    bid = v.uuid(req.backup_uuid, "backup_uuid")
    tenant = v.uuid(req.new_volume_tenant, "new_volume_tenant")
    caller.check_tenant(tenant, "new_volume_tenant")
    name = v.name(req.new_volume_name, "new_volume_name")
    pid = v.uuid(req.new_pool_uuid, "new_pool_uuid")
    state = context(request)
    task_id = str(uuidlib.uuid4())
    with state.db.session() as s:
        b = s.get(Backup, bid)
        if b is None or not caller.sees(b.tenant) or b.cluster_uuid != cluster or b.tenant != tenant:
            raise NotFound(f"backup_uuid: backup {bid} does not exist", field="backup_uuid")
        if b.status != "BackupSucceeded":
            raise InvalidArgument(f"backup_uuid: backup {bid} is {b.status}, not restorable", field="backup_uuid")
        pool = target_pool(s, pid, cluster, tenant, "new_pool_uuid")
        vol = new_volume(
            s, tenant=tenant, cluster=cluster, pool=pool, name=name, capacity=b.volume_capacity, vtype=b.volume_type
        )
        spec = jobs_pb2.RestoreSpec(
            backup_point_uuid=b.backup_point_uuid, backup_uuid=bid, pool_uuid=pid, volume_uuid=vol.uuid, name=name
        )
        new_task(
            s,
            task_id=task_id,
            operation="restore",
            tenant=tenant,
            resource_type="volume",
            resource_uuid=vol.uuid,
            job_kind="restore",
            spec=spec,
            pool_uuid=pid,
            backup_point_uuid=b.backup_point_uuid,
        )
        created = {"UUID": vol.uuid, "Name": name, "PoolUUID": pid, "Status": "RestoreStarted"}
    state.dispatcher.wake()
    return ok({"backup": None, "volume": created, "task_id": task_id})


@router.post("/v1/volume/share/backup/delete", **answers(v1.EmptyAnswer))
def backup_delete(req: BackupDeleteRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    bid = v.uuid(req.backup_uuid, "backup_uuid")
    state = context(request)
    with state.db.session() as s:
        b = s.get(Backup, bid)
        if b is None or b.tenant != tenant or b.cluster_uuid != cluster:
            raise NotFound(f"backup_uuid: backup {bid} does not exist", field="backup_uuid")
    remove_backup(state, bid)
    return ok({})


@router.get("/v1/volume/share/backup/list", **answers(v1.BackupListAnswer))
def backup_list(
    request: Request,
    cluster_uuid: str = Query(...),
    tenant: str = Query(""),
    page_num: int = Query(0),
    page_size: int = Query(0),
    filter_desc: str = Query(""),
    filter_start_time: str = Query(""),
    filter_end_time: str = Query(""),
    filter_volume_uuid: str = Query(""),
    filter_name: str = Query(""),
    caller: Caller = Depends(authenticated),
):
    cluster = v.uuid(cluster_uuid, "cluster_uuid")
    q = select(Backup).where(Backup.cluster_uuid == cluster)
    if tenant:
        tenant = v.uuid(tenant, "tenant")
        caller.check_tenant(tenant)
        q = q.where(Backup.tenant == tenant)
    elif not caller.operator:
        q = q.where(Backup.tenant == caller.tenant)
    for value, field, column, op in (
        (filter_start_time, "filter_start_time", Backup.ctime, "ge"),
        (filter_end_time, "filter_end_time", Backup.ctime, "le"),
    ):
        if value:
            if not (value.isascii() and value.isdigit() and len(value) <= 12):
                raise InvalidArgument(f"{field}: must be unix seconds (0 to 999999999999)", field=field)
            q = q.where(column >= int(value) if op == "ge" else column <= int(value))
    if filter_volume_uuid:
        q = q.where(Backup.volume_uuid == v.uuid(filter_volume_uuid, "filter_volume_uuid"))
    if filter_desc:
        q = q.where(Backup.description.contains(filter_desc, autoescape=True))
    if filter_name:
        q = q.where(Backup.name.contains(filter_name, autoescape=True))
    offset, limit = v.page(page_num, page_size)
    with context(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        q = q.order_by(Backup.ctime, Backup.uuid).offset(offset)
        rows = s.scalars(q.limit(limit) if limit else q).all()
        names = {bp.uuid: bp.name for bp in s.scalars(select(BackupPoint))}
    return ok(
        {
            "backup": None,
            "total_count": total,
            "list": [backup_to_seed(b, names.get(b.backup_point_uuid, "")) for b in rows],
        }
    )


@router.get("/v1/tasks", **answers(v1.TaskListAnswer))
def tasks(
    request: Request,
    status: str = Query(""),
    operation_type: str = Query(""),
    resource_uuid: str = Query(""),
    page_num: int = Query(0),
    page_size: int = Query(0),
    caller: Caller = Depends(authenticated),
):
    q = select(Task)
    if not caller.operator:
        q = q.where(Task.tenant == caller.tenant)
    if status:
        if status not in TASK_STATES:
            raise InvalidArgument(f"status: must be one of {', '.join(TASK_STATES)}", field="status")
        q = q.where(Task.status == status)
    if operation_type:
        q = q.where(Task.operation_type == operation_type)
    if resource_uuid:
        q = q.where(Task.resource_uuid == v.uuid(resource_uuid, "resource_uuid"))
    offset, limit = v.page(page_num, page_size)
    with context(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        q = q.order_by(Task.created_at.desc()).offset(offset)
        rows = s.scalars(q.limit(limit) if limit else q).all()
    return ok({"total_count": total, "tasks": [task_to_json(t) for t in rows]})


@router.get("/v1/tasks/{task_id}", **answers(v1.TaskAnswer))
def task(task_id: str, request: Request, wait: float = Query(0.0), caller: Caller = Depends(authenticated)):
    """A task; with wait (seconds, at most 60) the answer comes when the
    task has ended or its progress moved, or when wait runs out: a caller
    follows a task without polling."""
    tid = v.uuid(task_id, "task_id")
    if not 0 <= wait <= 60:
        raise InvalidArgument("wait: must be 0 to 60 seconds", field="wait")
    ctx = context(request)
    deadline = time.monotonic() + wait
    first = None
    while True:
        seen = ctx.dispatcher.version if ctx.dispatcher is not None else 0
        with ctx.db.session() as s:
            t = s.get(Task, tid)
        if t is None or not caller.sees(t.tenant):
            raise NotFound(f"task_id: task {tid} does not exist", field="task_id")
        state = (t.status, t.progress)
        first = first or state
        left = deadline - time.monotonic()
        if t.status not in ("waiting", "running") or state != first or left <= 0 or ctx.dispatcher is None:
            return ok(task_to_json(t))
        ctx.dispatcher.wait_for_change(seen, left)
