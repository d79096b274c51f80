"""Seed 003: /v3/{project_id}/policies (create, get, list, update, delete).

project_id is the tenant: a tenant token sees its own policies only; an
operator token may name any project. Bodies are checked by
agent.controller.policy; errors come back as {"error_code", "error_msg"}.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.shapes import answers, v3
from agent.controller.models import Policy, Vault
from agent.controller.policy import OperationDefinition, check_policy
from agent.errors import AlreadyExists, HasDependents, InvalidArgument, NotFound


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def definition(p: Policy) -> OperationDefinition:
    return OperationDefinition(**json.loads(p.definition_json))


def to_seed(p: Policy, vault_ids: list[str]) -> dict:
    return {
        "id": p.id,
        "name": p.name,
        "enabled": p.enabled,
        "operation_type": p.operation_type,
        "operation_definition": definition(p).to_json(),
        "trigger": {
            "id": str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"blockferry/trigger/{p.id}")),
            "name": "default",
            "type": "time",
            "properties": {"pattern": json.loads(p.patterns_json), "start_time": stamp(p.start_time)},
        },
        "associated_vaults": [{"vault_id": v, "destination_vault_id": None} for v in vault_ids] or None,
    }


def load_policy(s, caller: Caller, project_id: str, policy_id: str) -> Policy:
    p = s.get(Policy, policy_id)
    if p is None or p.tenant != project_id:
        raise NotFound(f"policy_id: policy {policy_id} does not exist", field="policy_id")
    return p


def project(caller: Caller, project_id: str) -> str:
    caller.check_tenant(project_id, "project_id")
    if not project_id:
        raise InvalidArgument("project_id: required", field="project_id")
    return project_id


router = APIRouter(prefix="/v3/{project_id}/policies", tags=["policies (seed 003)"])


def vaults_of(s, policy_id: str) -> list[str]:
    return list(s.scalars(select(Vault.id).where(Vault.policy_id == policy_id).order_by(Vault.id)))


@router.post("", **answers(v3.PolicyAnswer, v3.PolicyCreate))
def create(project_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    fields = check_policy(body)
    now = time.time()
    p = Policy(
        id=str(uuidlib.uuid4()),
        tenant=tenant,
        name=fields["name"],
        enabled=fields.get("enabled", True),
        operation_type="backup",
        definition_json=json.dumps(fields["operation_definition"].to_json()),
        patterns_json=json.dumps(fields["patterns"]),
        start_time=now,
        created_at=now,
        updated_at=now,
    )
    with context(request).db.session() as s:
        s.add(p)
        try:
            s.commit()
        except IntegrityError:
            raise AlreadyExists(f"policy.name: a policy named {p.name!r} exists", field="policy.name") from None
        return {"policy": to_seed(p, [])}


@router.get("", **answers(v3.PolicyList))
def list_(
    project_id: str,
    request: Request,
    vault_id: str = "",
    operation_type: str = "",
    caller: Caller = Depends(authenticated),
):
    tenant = project(caller, project_id)
    if operation_type and operation_type != "backup":
        raise InvalidArgument(f"operation_type: {operation_type!r}: only 'backup' is supported", field="operation_type")
    with context(request).db.session() as s:
        q = select(Policy).where(Policy.tenant == tenant).order_by(Policy.created_at, Policy.id)
        if vault_id:
            q = q.where(Policy.id.in_(select(Vault.policy_id).where(Vault.id == vault_id)))
        out = [to_seed(p, vaults_of(s, p.id)) for p in s.scalars(q)]
    return {"policies": out, "count": len(out)}


@router.get("/{policy_id}", **answers(v3.PolicyAnswer))
def get(project_id: str, policy_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        p = load_policy(s, caller, tenant, policy_id)
        return {"policy": to_seed(p, vaults_of(s, p.id))}


@router.put("/{policy_id}", **answers(v3.PolicyAnswer, v3.PolicyUpdate))
def update(
    project_id: str, policy_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    fields = check_policy(body, partial=True)
    with context(request).db.session() as s:
        p = load_policy(s, caller, tenant, policy_id)
        if "name" in fields:
            p.name = fields["name"]
        if "enabled" in fields:
            p.enabled = fields["enabled"]
        if "operation_definition" in fields:
            p.definition_json = json.dumps(fields["operation_definition"].to_json())
        if "patterns" in fields:
            p.patterns_json = json.dumps(fields["patterns"])
        p.updated_at = time.time()
        try:
            s.commit()
        except IntegrityError:
            raise AlreadyExists(f"policy.name: a policy named {p.name!r} exists", field="policy.name") from None
        return {"policy": to_seed(p, vaults_of(s, p.id))}


@router.delete("/{policy_id}", status_code=204, response_class=Response)
def delete(project_id: str, policy_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        p = load_policy(s, caller, tenant, policy_id)
        used = vaults_of(s, p.id)
        if used:
            raise HasDependents(
                f"policy_id: policy {p.name} is applied to vault(s) {', '.join(used)}; dissociate it first",
                field="policy_id",
            )
        s.delete(p)
        s.commit()
    return Response(status_code=204)  # the seed answers 204, no body
