"""Beyond the seeds, in seed 001's style: /v1/volume/share/backup/export
and /unexport. A backup is served read-only over NBD by the agent of an
online host that reports its backup point (agent/exports.py); the
controller asks it at once and logs an `export` task whose result is the
export's address on that host (host, unix socket, nbd+unix URI, size,
lease). Unexport ends it by that task's id."""

from __future__ import annotations

import json
import time
import uuid as uuidlib

from fastapi import APIRouter, Depends, Request
from pydantic import StrictInt, StrictStr
from sqlalchemy import select

from agent.api.v1 import backups_pb2
from agent.controller import validate as v
from agent.controller.agents import backup_point_request
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.envelope import ok
from agent.controller.api.shapes import answers, v1
from agent.controller.api.volumes import _Base
from agent.controller.health import host_state
from agent.controller.inventory import reporting_hosts
from agent.controller.models import Backup, BackupPoint, Host, Task
from agent.errors import InvalidArgument, NotFound, TargetUnreachable

router = APIRouter(prefix="/v1/volume/share/backup", tags=["shared volumes (seed 001)"])
MAX_LEASE = 7 * 86400


class ExportRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    backup_uuid: StrictStr
    lease_seconds: StrictInt = 3600


class UnexportRequest(_Base):
    cluster_uuid: StrictStr
    tenant: StrictStr
    task_id: StrictStr


def _task(s, *, tenant: str, backup: str, bp: str, host: str, result: dict) -> str:
    now = time.time()
    tid = str(uuidlib.uuid4())
    s.add(
        Task(
            id=tid,
            operation_type="export",
            status="success",
            progress=100.0,
            tenant=tenant,
            resource_type="backup",
            resource_uuid=backup,
            backup_point_uuid=bp,
            job_kind="",
            spec_json="{}",
            attempts=0,
            idempotent=True,
            host_uuid=host,
            result_json=json.dumps(result),
            created_at=now,
            started_at=now,
            ended_at=now,
        )
    )
    return tid


@router.post("/export", **answers(v1.ExportStartedAnswer))
def backup_export(req: ExportRequest, request: Request, caller: Caller = Depends(authenticated)):
    cluster = v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    bid = v.uuid(req.backup_uuid, "backup_uuid")
    if not 0 < req.lease_seconds <= MAX_LEASE:
        raise InvalidArgument(f"lease_seconds: 1 to {MAX_LEASE}", field="lease_seconds")
    state = context(request)
    with state.db.session() as s:
        b = s.get(Backup, bid)
        if b is None or b.tenant != tenant or b.cluster_uuid != cluster:
            raise NotFound(f"backup_uuid: backup {bid} does not exist", field="backup_uuid")
        if b.status != "BackupSucceeded":
            raise InvalidArgument(f"backup_uuid: backup {bid} is {b.status}, not readable", field="backup_uuid")
        bp = s.get(BackupPoint, b.backup_point_uuid)
        online = [
            h
            for h in s.scalars(select(Host).order_by(Host.uuid))
            if host_state(h, state.cfg.host_dead_after) == "online"
        ]
        reach = reporting_hosts(online, b.backup_point_uuid)
        hosts = [h for h in online if h.uuid in reach] or online
        s.expunge_all()
    if bp is None:
        raise NotFound(f"backup_uuid: the backup point of backup {bid} was deleted", field="backup_uuid")
    if not hosts:
        raise TargetUnreachable("backup_uuid: no online host reaches the backup's backup point", field="backup_uuid")
    host = hosts[0]
    client = state.agents.client(host)
    client.attach_backup_point(backup_point_request(bp, state.secrets))
    e = client.export_backup(
        backups_pb2.ExportBackupRequest(backup_point_uuid=bp.uuid, backup_uuid=bid, lease_seconds=req.lease_seconds)
    )
    export = {
        "host_uuid": host.uuid,
        "hostname": host.hostname,
        "export_id": e.export_id,
        "uri": e.uri,
        "socket": e.socket,
        "size": e.size,
        "expires_at": e.expires_at,
    }
    with state.db.session() as s:
        tid = _task(s, tenant=tenant, backup=bid, bp=bp.uuid, host=host.uuid, result=export)
    return ok({"task_id": tid, "export": export})


@router.post("/unexport", **answers(v1.EmptyAnswer))
def backup_unexport(req: UnexportRequest, request: Request, caller: Caller = Depends(authenticated)):
    v.uuid(req.cluster_uuid, "cluster_uuid")
    tenant = v.uuid(req.tenant, "tenant")
    caller.check_tenant(tenant)
    tid = v.uuid(req.task_id, "task_id")
    state = context(request)
    with state.db.session() as s:
        t = s.get(Task, tid)
        if t is None or t.operation_type != "export" or t.tenant != tenant:
            raise NotFound(f"task_id: no export task {tid}", field="task_id")
        host = s.get(Host, t.host_uuid)
        export_id = json.loads(t.result_json).get("export_id", "")
        s.expunge_all()
    if host is None or host_state(host, state.cfg.host_dead_after) != "online":
        raise TargetUnreachable(f"task_id: the host of export task {tid} is not online", field="task_id")
    state.agents.client(host).unexport_backup(export_id)
    return ok({})
