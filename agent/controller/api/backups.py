"""Seed 003: /v3/{project_id}/backups: list, get, delete, and restore to a
volume (the seed's disk restoration: `volume_id`, or `mappings`).

A backup shared with another project (members.py) and accepted there is
read and restored by that project too, into its own volumes.

A restore overwrites the existing volume after the agent checks that no
client has it open and takes a safety snapshot, which a failed restore rolls
back to (agent RestoreSpec.in_place); it answers 202 at once, the task id in
the `X-Task-Id` header and the task in /v1/tasks (operation_type restore).
"""

from __future__ import annotations

import time
import uuid as uuidlib
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select

from agent.api.v1 import jobs_pb2
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.members import shared_with
from agent.controller.api.policies import project
from agent.controller.api.shapes import answers, v3
from agent.controller.api.vaults import PROVIDER_ID, iso
from agent.controller.dispatch import new_task
from agent.controller.inventory import log_task, remove_backup
from agent.controller.models import Backup, Checkpoint, Task, Volume
from agent.errors import BackupInProgress, Busy, InvalidArgument, NotFound, RestoreTooSmall

GB = 1 << 30
STATUS = {"BackupStarted": "protecting", "BackupSucceeded": "available", "BackupFailed": "error"}


def to_seed(s, b: Backup) -> dict:
    vol = s.get(Volume, b.volume_uuid)
    cp = s.get(Checkpoint, b.checkpoint_id) if b.checkpoint_id else None
    return {
        "id": b.uuid,
        "name": b.name,
        "description": b.description or None,
        "project_id": b.tenant,
        "enterprise_project_id": "0",  # the seed's default enterprise project
        "checkpoint_id": b.checkpoint_id or None,
        "vault_id": b.vault_id or None,
        "parent_id": None,
        "children": [],
        "image_type": "backup",
        "status": STATUS.get(b.status, "error"),
        "resource_id": b.volume_uuid,
        "resource_name": vol.name if vol else "",
        "resource_type": "OS::Cinder::Volume",
        "resource_size": -(-b.volume_capacity // GB),
        "resource_az": None,
        "created_at": iso(b.ctime),
        "updated_at": iso(b.mtime),
        "expired_at": None,
        "protected_at": None,
        "provider_id": PROVIDER_ID,
        "extend_info": {
            "auto_trigger": bool(cp and not cp.manual),
            "incremental": b.mode == "incremental",
            "snapshot_id": b.snapshot_uuid,
            "supported_restore_mode": "backup",
            "contain_system_disk": False,  # a volume backup; no system disk is known
            "encrypted": None,
            "bootable": None,
            "support_llid": None,
            "os_images_data": None,
            "size_bytes": b.size,
            "stored_bytes": b.stored_bytes,
            "image_digest": b.image_digest or None,
            "mode": b.mode or None,
            "mode_reason": b.mode_reason or None,
            "consistency": b.consistency or None,  # application, crash or offline (docs/live.md)
        },
    }


def _load(s, tenant: str, backup_id: str, *, shared: bool = False) -> Backup:
    """The project's backup; with shared, also one another project shared
    with it and it accepted (members.py)."""
    b = s.get(Backup, backup_id)
    if b is not None and b.tenant != tenant and shared and shared_with(s, tenant, backup_id) is not None:
        return b
    if b is None or b.tenant != tenant:
        raise NotFound(f"backup_id: backup {backup_id} does not exist", field="backup_id")
    return b


router = APIRouter(prefix="/v3/{project_id}/backups", tags=["backups (seed 003)"])


@router.get("", **answers(v3.BackupList))
def list_(
    project_id: str,
    request: Request,
    vault_id: str = "",
    resource_id: str = "",
    checkpoint_id: str = "",
    status: str = "",
    name: str = "",
    limit: int = Query(1000, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    caller: Caller = Depends(authenticated),
):
    tenant = project(caller, project_id)
    q = select(Backup).where(Backup.tenant == tenant)
    for value, column in (
        (vault_id, Backup.vault_id),
        (resource_id, Backup.volume_uuid),
        (checkpoint_id, Backup.checkpoint_id),
        (name, Backup.name),
    ):
        if value:
            q = q.where(column == value)
    if status:
        wanted = [k for k, x in STATUS.items() if x == status]
        if not wanted:
            raise InvalidArgument(f"status: {status!r} is not one of protecting, available, error", field="status")
        q = q.where(Backup.status.in_(wanted))
    with context(request).db.session() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        rows = s.scalars(q.order_by(Backup.ctime.desc(), Backup.uuid).offset(offset).limit(limit)).all()
        return {"backups": [to_seed(s, b) for b in rows], "count": total, "offset": offset, "limit": limit}


@router.get("/{backup_id}", **answers(v3.BackupAnswer))
def get(project_id: str, backup_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        return {"backup": to_seed(s, _load(s, tenant, backup_id, shared=True))}


@router.delete("/{backup_id}", status_code=204, response_class=Response)
def delete(project_id: str, backup_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        b = _load(s, tenant, backup_id)
        vault_id, name = b.vault_id, b.name
    started = time.time()
    remove_backup(context(request), backup_id, field="backup_id")
    with context(request).db.session() as s:
        log_task(
            s, "delete", tenant, vault_id or backup_id, started, {"deleted_backups": [backup_id], "backup_name": name}
        )
    return Response(status_code=204)  # the seed answers 204, no body


@router.post(
    "/{backup_id}/restore",
    status_code=202,
    response_model=None,
    responses={
        202: {
            "description": "the restore is queued: its task id is in the X-Task-Id header (the body is null)",
            "headers": {"X-Task-Id": {"description": "GET /v1/tasks/{task_id}", "schema": {"type": "string"}}},
            "content": {"application/json": {"schema": {"type": "null"}}},
        }
    },
    openapi_extra=answers(None, v3.RestoreRequest)["openapi_extra"],
)
def restore(
    project_id: str, backup_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or not isinstance(body.get("restore"), dict):
        raise InvalidArgument('restore: the body must be {"restore": {"volume_id": ...}}', field="restore")
    spec = body["restore"]
    mappings = spec.get("mappings")
    if mappings is not None:
        if not isinstance(mappings, list) or len(mappings) != 1 or not isinstance(mappings[0], dict):
            raise InvalidArgument(
                'restore.mappings: one {"backup_id", "volume_id"} for a disk backup', field="restore.mappings"
            )
        if mappings[0].get("backup_id") != backup_id:
            raise InvalidArgument(
                "restore.mappings[0].backup_id: must be the backup in the path", field="restore.mappings[0].backup_id"
            )
        target, field = mappings[0].get("volume_id"), "restore.mappings[0].volume_id"
    else:
        target, field = spec.get("volume_id"), "restore.volume_id"
    vid = v.uuid(str(target or ""), field)
    state = context(request)
    task_id = str(uuidlib.uuid4())
    with state.db.session() as s:
        b = _load(s, tenant, backup_id, shared=True)  # an accepted share restores into the member's volumes
        if b.status != "BackupSucceeded":
            raise InvalidArgument(
                f"backup_id: backup {backup_id} is {STATUS.get(b.status)}, not available", field="backup_id"
            )
        vol = s.get(Volume, vid)
        if vol is None or vol.tenant != tenant or vol.state != "ready":
            raise NotFound(f"{field}: volume {vid} does not exist", field=field)
        if vol.capacity < b.size:
            raise RestoreTooSmall(f"{field}: volume {vid} has {vol.capacity} bytes, the backup {b.size}", field=field)
        running = s.scalar(select(Backup.uuid).where(Backup.volume_uuid == vid, Backup.status == "BackupStarted"))
        if running:
            raise BackupInProgress(f"{field}: backup {running} of volume {vid} is in progress", field=field)
        busy = s.scalar(
            select(Task.id).where(
                Task.operation_type == "restore", Task.resource_uuid == vid, Task.status.in_(("waiting", "running"))
            )
        )
        if busy:
            raise Busy(f"{field}: volume {vid} is being restored (task {busy})", field=field)
        job = jobs_pb2.RestoreSpec(
            backup_point_uuid=b.backup_point_uuid,
            backup_uuid=backup_id,
            pool_uuid=vol.pool_uuid,
            volume_uuid=vid,
            in_place=True,
        )
        # resource_type "restore": the volume exists; the task's end changes no row
        new_task(
            s,
            task_id=task_id,
            operation="restore",
            tenant=tenant,
            resource_type="restore",
            resource_uuid=vid,
            job_kind="restore",
            spec=job,
            pool_uuid=vol.pool_uuid,
            backup_point_uuid=b.backup_point_uuid,
            idempotent=True,
        )
    state.dispatcher.wake()
    return JSONResponse(status_code=202, content=None, headers={"X-Task-Id": task_id})
