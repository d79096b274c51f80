"""Seed 003: /v3/{project_id}/operation-logs: every task the controller ran
for the project (the rows of /v1/tasks), in the seed's OperationLog shape:
backups (of volumes, and of servers in one job), restores, deletions,
vault deletions, resource removals, and our own operations beyond the
seed's list (clone, verify, gc). Filters, paging and status values as the
seed's table."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select

from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.policies import project
from agent.controller.api.shapes import answers, v3
from agent.controller.api.vaults import PROVIDER_ID, RESOURCE_TYPE, SERVER_TYPE, iso
from agent.controller.models import Backup, Checkpoint, Task, Vault, VaultServer, Volume
from agent.errors import OperationLogNotFound, cbr_code

STATUSES = ("success", "skipped", "failed", "running", "timeout", "waiting")
SEED_TYPES = ("backup", "copy", "replication", "restore", "delete", "sync", "vault_delete", "remove_resource")
OUR_TYPES = ("clone", "verify", "gc")
MAX_LIMIT = 1000


def _resource(s, kind: str, rid: str) -> dict | None:
    if not rid:
        return None
    if kind == "server":
        srv = s.scalar(select(VaultServer).where(VaultServer.server_uuid == rid))
        return {"id": rid, "name": srv.name if srv else "", "type": SERVER_TYPE}
    vol = s.get(Volume, rid)
    return {"id": rid, "name": vol.name if vol else "", "type": RESOURCE_TYPE}


def to_seed(s, t: Task) -> dict:
    result = json.loads(t.result_json or "{}") or {}
    spec = json.loads(t.spec_json or "{}") or {}
    extra: dict[str, Any] = {"common": {"progress": int(t.progress), "request_id": "", "task_id": t.id}}
    vault_id, checkpoint_id = "", ""
    if t.operation_type == "backup":
        backups = list(s.scalars(select(Backup).where(Backup.task_id == t.id).order_by(Backup.volume_uuid)))
        if backups:
            b = backups[0]
            vault_id, checkpoint_id = b.vault_id, b.checkpoint_id
            extra["backup"] = {
                "backup_id": b.uuid,
                "backup_name": b.name,
                "incremental": "true" if spec.get("parent_backup_uuid") or b.mode == "incremental" else "false",
            }
        if t.resource_type == "server":
            extra["resource"] = _resource(s, "server", t.resource_uuid)
        elif backups:
            extra["resource"] = _resource(s, "volume", backups[0].volume_uuid)
    elif t.operation_type == "restore":
        b = s.get(Backup, spec.get("backup_uuid", ""))
        target = result.get("volume_uuid") or spec.get("volume_uuid", "")
        vol = s.get(Volume, target) if target else None
        extra["restore"] = {
            "backup_id": spec.get("backup_uuid", ""),
            "backup_name": b.name if b else "",
            "target_resource_id": target,
            "target_resource_name": vol.name if vol else spec.get("name", ""),
        }
        extra["resource"] = _resource(s, "volume", b.volume_uuid if b else "")
        vault_id = b.vault_id if b else ""
    elif t.operation_type == "delete":
        deleted = result.get("deleted_backups") or []
        extra["delete"] = {"backup_id": deleted[0] if deleted else "", "backup_name": result.get("backup_name", "")}
    elif t.operation_type == "vault_delete":
        extra["vault_delete"] = {"fail_count": 0, "total_count": int(result.get("backups_deleted", 0))}
    elif t.operation_type == "remove_resource":
        ids = result.get("remove_resource_ids") or []
        extra["remove_resources"] = {
            "fail_count": 0,
            "total_count": len(ids),
            "resources": [_resource(s, "volume", i) for i in ids],
        }
    if t.resource_type == "vault" and t.resource_uuid not in (result.get("deleted_backups") or []):
        vault_id = t.resource_uuid  # (a backup outside vaults is deleted under its own id)
    vault = s.get(Vault, vault_id) if vault_id else None
    cp = s.get(Checkpoint, checkpoint_id) if checkpoint_id else None
    return {
        "id": t.id,
        "operation_type": t.operation_type,
        "status": t.status,
        "project_id": t.tenant,
        "provider_id": PROVIDER_ID,
        "checkpoint_id": checkpoint_id or None,
        "policy_id": (cp.policy_id if cp else "") or None,
        "vault_id": vault_id or None,
        "vault_name": vault.name if vault else None,
        "created_at": iso(t.created_at),
        "started_at": iso(t.started_at),
        "ended_at": iso(t.ended_at),
        "updated_at": iso(max(t.created_at, t.started_at, t.ended_at)),
        "error_info": {"code": cbr_code(t.error_code) if t.error_code else "", "message": t.error_message},
        "extra_info": extra,
    }


router = APIRouter(prefix="/v3/{project_id}/operation-logs", tags=["operation logs (seed 003)"])


def _time(value: str, field: str) -> float:
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise v.bad(field, f"{value!r}: a UTC time like 2018-02-01T12:00:00Z") from None


@router.get("", **answers(v3.OperationLogList))
def list_(
    project_id: str,
    request: Request,
    operation_type: str = Query(""),
    status: str = Query(""),
    start_time: str = Query(""),
    end_time: str = Query(""),
    vault_id: str = Query(""),
    vault_name: str = Query(""),
    resource_id: str = Query(""),
    resource_name: str = Query(""),
    provider_id: str = Query(""),
    limit: int = Query(MAX_LIMIT),
    offset: int = Query(0),
    caller: Caller = Depends(authenticated),
):
    tenant = project(caller, project_id)
    if operation_type and operation_type not in SEED_TYPES + OUR_TYPES:
        raise v.bad("operation_type", f"{operation_type!r}: one of {', '.join(SEED_TYPES + OUR_TYPES)}")
    if status and status not in STATUSES:
        raise v.bad("status", f"{status!r}: one of {', '.join(STATUSES)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise v.bad("limit", f"{limit}: 1 to {MAX_LIMIT}")
    if offset < 0:
        raise v.bad("offset", f"{offset}: 0 or more")
    if vault_id:
        vault_id = v.uuid(vault_id, "vault_id")
    q = select(Task).where(Task.tenant == tenant)
    if operation_type:
        q = q.where(Task.operation_type == operation_type)
    if status:
        q = q.where(Task.status == status)
    if start_time:
        q = q.where(Task.created_at >= _time(start_time, "start_time"))
    if end_time:
        q = q.where(Task.created_at <= _time(end_time, "end_time"))
    with context(request).db.session() as s:
        rows = [to_seed(s, t) for t in s.scalars(q.order_by(Task.created_at.desc(), Task.id))]
    if provider_id and provider_id != PROVIDER_ID:
        rows = []

    def resource(r: dict) -> dict:
        return r["extra_info"].get("resource") or {}

    rows = [
        r
        for r in rows
        if (not vault_id or r["vault_id"] == vault_id)
        and (not vault_name or r["vault_name"] == vault_name)
        and (not resource_id or resource(r).get("id") == resource_id)
        and (not resource_name or resource(r).get("name") == resource_name)
    ]
    return {"operation_logs": rows[offset : offset + limit], "count": len(rows), "limit": limit, "offset": offset}


@router.get("/{operation_log_id}", **answers(v3.OperationLogAnswer))
def get(project_id: str, operation_log_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    tid = v.uuid(operation_log_id, "operation_log_id")
    with context(request).db.session() as s:
        t = s.get(Task, tid)
        if t is None or t.tenant != tenant:
            raise OperationLogNotFound(
                f"operation_log_id: operation log {tid} does not exist", field="operation_log_id"
            )
        return {"operation_log": to_seed(s, t)}
