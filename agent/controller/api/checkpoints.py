"""Seed 003: POST /v3/{project_id}/checkpoints (back up a vault now) and
GET /v3/{project_id}/checkpoints/{checkpoint_id}."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from sqlalchemy import select

from agent.controller import checkpoints
from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.policies import project
from agent.controller.api.shapes import answers, v3
from agent.controller.api.vaults import iso, load_vault
from agent.controller.models import Checkpoint, Policy, Task, Vault, VaultResource
from agent.controller.policy import OperationDefinition
from agent.errors import NotFound, ResourceNotInVault

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def to_seed(s, cp: Checkpoint) -> dict:
    vault = s.get(Vault, cp.vault_id)
    resources = []
    for r in json.loads(cp.resources_json):
        t = s.get(Task, r["task_id"])
        status = {"success": "available", "failed": "error", "timeout": "error"}.get(
            t.status if t else "", "protecting"
        )
        resources.append(
            {
                "id": r["id"],
                "name": r["name"],
                "type": r["type"],
                "resource_size": r["resource_size"],
                "protect_status": status,
                "extra_info": r.get("extra_info"),  # a server's disk: server_id, consistency, snapshot_id
                "backup_id": r["backup_id"],
                "task_id": r["task_id"],
                "backup_mode": "full" if r.get("full") else "incremental",
            }
        )
    retention = -1
    if vault is not None and vault.policy_id:
        p = s.get(Policy, vault.policy_id)
        if p is not None:
            retention = OperationDefinition(**json.loads(p.definition_json)).retention_duration_days
    status = {"preparing": "protecting", "finishing": "protecting"}.get(cp.status, cp.status)  # the seed's values
    return {
        "id": cp.id,
        "project_id": cp.tenant,
        "status": status,
        "created_at": iso(cp.created_at),
        "due_at": datetime.fromtimestamp(cp.due_at, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "manual": cp.manual,
        "vault": {
            "id": cp.vault_id,
            "name": vault.name if vault else "",
            "resources": resources,
            "skipped_resources": json.loads(cp.skipped_json),
        },
        "extra_info": {"retention_duration": retention, "name": "", "description": ""},
    }


router = APIRouter(prefix="/v3/{project_id}/checkpoints", tags=["checkpoints (seed 003)"])


@router.post("", **answers(v3.CheckpointAnswer, v3.CheckpointCreate))
def create(project_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or not isinstance(body.get("checkpoint"), dict):
        raise v.bad("checkpoint", 'the body must be {"checkpoint": {"vault_id": ...}}')
    cp = body["checkpoint"]
    vault_id = v.uuid(str(cp.get("vault_id", "")), "checkpoint.vault_id")
    params = cp.get("parameters") or {}
    if not isinstance(params, dict):
        raise v.bad("checkpoint.parameters", "must be an object")
    name = params.get("name", "") or ""
    if not isinstance(name, str) or len(name) > 64 or (name and not set(name) <= _NAME_CHARS):
        raise v.bad("checkpoint.parameters.name", "1 to 64 letters, digits, '_' or '-'")
    description = params.get("description", "") or ""
    if not isinstance(description, str) or len(description) > 255:
        raise v.bad("checkpoint.parameters.description", "at most 255 characters")
    incremental = params.get("incremental", True)
    if not isinstance(incremental, bool):
        raise v.bad("checkpoint.parameters.incremental", "true or false")
    only = params.get("resources")
    with context(request).db.session() as s:
        load_vault(s, tenant, vault_id)
    if only is not None:
        if not isinstance(only, list) or not only:
            raise v.bad("checkpoint.parameters.resources", "a non-empty list of volume ids of the vault")
        only = [v.uuid(str(x), f"checkpoint.parameters.resources[{i}]") for i, x in enumerate(only)]
        with context(request).db.session() as s:
            for i, vid in enumerate(only):
                row = s.get(VaultResource, vid)
                if row is None or row.vault_id != vault_id:
                    raise ResourceNotInVault(
                        f"checkpoint.parameters.resources[{i}]: volume {vid} is not in the vault",
                        field=f"checkpoint.parameters.resources[{i}]",
                    )
    cp_id = checkpoints.create(
        context(request),
        vault_id,
        due_at=time.time(),
        manual=True,
        only=only,
        name=name,
        description=description,
        incremental=incremental,
    )
    with context(request).db.session() as s:
        row = s.get(Checkpoint, cp_id)
        out = to_seed(s, row)
        out["extra_info"].update(name=name, description=description)
        return {"checkpoint": out}


@router.get("/{checkpoint_id}", **answers(v3.CheckpointAnswer))
def get(project_id: str, checkpoint_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        cp = s.get(Checkpoint, checkpoint_id)
        if cp is None or cp.tenant != tenant:
            raise NotFound(f"checkpoint_id: checkpoint {checkpoint_id} does not exist", field="checkpoint_id")
        return {"checkpoint": to_seed(s, cp)}


@router.get("", **answers(v3.CheckpointList))
def list_(project_id: str, request: Request, vault_id: str = "", caller: Caller = Depends(authenticated)):
    """Not in the seed (it lists backups instead): the checkpoints of a vault, newest first."""
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        q = select(Checkpoint).where(Checkpoint.tenant == tenant).order_by(Checkpoint.due_at.desc())
        if vault_id:
            q = q.where(Checkpoint.vault_id == vault_id)
        out = [to_seed(s, cp) for cp in s.scalars(q)]
    return {"checkpoints": out, "count": len(out)}
