"""Seed 003's backup sharing: /v3/{project_id}/backups/{backup_id}/members.

The owner adds members (project ids), lists, shows and deletes them; a
member sees its own record under its own project (member_id is its
project id) and accepts it into one of its vaults, or rejects it. An
accepted member reads the backup (GET .../backups/{id}) and restores it
into its own volumes; the data stays in the owner's repository, and a
share ends when the owner deletes the member or the backup."""

from __future__ import annotations

import time
import uuid as uuidlib
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.policies import project
from agent.controller.api.shapes import answers, v3
from agent.controller.api.vaults import iso
from agent.controller.models import Backup, BackupMember, Vault
from agent.errors import BackupNotAvailable, InvalidShareMember, NotFound, ShareExists

MAX_MEMBERS = 10
STATUSES = ("pending", "accepted", "rejected")


def to_seed(m: BackupMember) -> dict:
    return {
        "id": m.id,
        "backup_id": m.backup_id,
        "dest_project_id": m.dest_project_id,
        "status": m.status,
        "vault_id": m.vault_id or None,
        "image_id": None,  # no images here: an accepted backup is restored into volumes
        "created_at": iso(m.created_at),
        "updated_at": iso(m.updated_at),
    }


def project_id_of(text: Any, field: str) -> str:
    """A project id: a uuid, with or without dashes (the seed writes 32 hex digits)."""
    t = str(text or "").strip().lower()
    try:
        return str(uuidlib.UUID(t))
    except ValueError:
        raise InvalidShareMember(f"{field}: {text!r} is not a project id", field=field) from None


def owned(s, tenant: str, backup_id: str) -> Backup:
    b = s.get(Backup, v.uuid(backup_id, "backup_id"))
    if b is None or b.tenant != tenant:
        raise NotFound(f"backup_id: backup {backup_id} does not exist", field="backup_id")
    return b


def _member(s, tenant: str, backup_id: str, member_id: str) -> BackupMember:
    """The owner's member record, or the member's own one."""
    bid = v.uuid(backup_id, "backup_id")
    dest = project_id_of(member_id, "member_id")
    m = s.scalar(select(BackupMember).where(BackupMember.backup_id == bid, BackupMember.dest_project_id == dest))
    if m is None or tenant not in (m.tenant, m.dest_project_id):
        raise NotFound(f"member_id: backup {bid} is not shared with project {dest}", field="member_id")
    return m


def shared_with(s, tenant: str, backup_id: str) -> BackupMember | None:
    """The accepted share of a backup with this project, if any."""
    return s.scalar(
        select(BackupMember).where(
            BackupMember.backup_id == backup_id,
            BackupMember.dest_project_id == tenant,
            BackupMember.status == "accepted",
        )
    )


router = APIRouter(prefix="/v3/{project_id}/backups/{backup_id}/members", tags=["backup sharing (seed 003)"])


@router.post("", **answers(v3.Members, v3.MembersAdd))
def add(
    project_id: str, backup_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    members = body.get("members") if isinstance(body, dict) else None
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise v.bad("members", f"a list of 1 to {MAX_MEMBERS} project ids")
    dests = [project_id_of(x, f"members[{i}]") for i, x in enumerate(members)]
    for i, d in enumerate(dests):
        field = f"members[{i}]"
        if d == tenant:
            raise InvalidShareMember(f"{field}: a backup is not shared with its own project", field=field)
        if d in dests[:i]:
            raise ShareExists(f"{field}: project {d} is named twice", field=field)
    now = time.time()
    try:
        with context(request).db.session() as s:
            b = owned(s, tenant, backup_id)
            if b.status != "BackupSucceeded":
                raise BackupNotAvailable(
                    f"backup_id: backup {b.uuid} is not available ({b.status}): only available backups are shared",
                    field="backup_id",
                )
            rows = []
            for i, d in enumerate(dests):
                if s.scalar(
                    select(BackupMember).where(BackupMember.backup_id == b.uuid, BackupMember.dest_project_id == d)
                ):
                    field = f"members[{i}]"
                    raise ShareExists(f"{field}: backup {b.uuid} is shared with {d} already", field=field)
                rows.append(
                    BackupMember(
                        id=str(uuidlib.uuid4()),
                        backup_id=b.uuid,
                        tenant=tenant,
                        dest_project_id=d,
                        status="pending",
                        created_at=now,
                    )
                )
            s.add_all(rows)
            s.flush()
            return {"members": [to_seed(m) for m in rows]}
    except IntegrityError:  # a concurrent share of the same member
        raise ShareExists("members: the backup was shared with one of them meanwhile", field="members") from None


@router.get("", **answers(v3.MemberList))
def list_(
    project_id: str,
    backup_id: str,
    request: Request,
    dest_project_id: str = "",
    status: str = "",
    vault_id: str = "",
    image_id: str = "",
    limit: int = Query(1000, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    caller: Caller = Depends(authenticated),
):
    """The owner sees every member; a member its own record."""
    tenant = project(caller, project_id)
    if status and status not in STATUSES:
        raise v.bad("status", f"{status!r}: one of {', '.join(STATUSES)}")
    bid = v.uuid(backup_id, "backup_id")
    with context(request).db.session() as s:
        b = s.get(Backup, bid)
        q = select(BackupMember).where(BackupMember.backup_id == bid)
        if b is None or b.tenant != tenant:
            q = q.where(BackupMember.dest_project_id == tenant)
        if dest_project_id:
            q = q.where(BackupMember.dest_project_id == project_id_of(dest_project_id, "dest_project_id"))
        if status:
            q = q.where(BackupMember.status == status)
        if vault_id:
            q = q.where(BackupMember.vault_id == v.uuid(vault_id, "vault_id"))
        rows = [] if image_id else list(s.scalars(q.order_by(BackupMember.created_at, BackupMember.id)))
        if not rows and (b is None or b.tenant != tenant) and not (dest_project_id or status or vault_id):
            raise NotFound(f"backup_id: backup {bid} does not exist", field="backup_id")
        return {"members": [to_seed(m) for m in rows[offset : offset + limit]], "count": len(rows)}


@router.get("/{member_id}", **answers(v3.MemberAnswer))
def get(project_id: str, backup_id: str, member_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        return {"member": to_seed(_member(s, tenant, backup_id, member_id))}


@router.put("/{member_id}", **answers(v3.MemberAnswer, v3.MemberUpdate))
def update(
    project_id: str,
    backup_id: str,
    member_id: str,
    request: Request,
    body: Any = Body(None),
    caller: Caller = Depends(authenticated),
):
    """The member accepts (into one of its vaults), rejects, or sets it
    pending again; only the member itself may."""
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or body.get("status") not in STATUSES:
        raise v.bad("status", f"one of {', '.join(STATUSES)}")
    with context(request).db.session() as s:
        m = _member(s, tenant, backup_id, member_id)
        if m.dest_project_id != tenant:
            raise InvalidShareMember(
                f"member_id: only project {m.dest_project_id} may accept or reject this share", field="member_id"
            )
        vault_id = ""
        if body["status"] == "accepted":
            vault_id = v.uuid(str(body.get("vault_id") or ""), "vault_id")
            vault = s.get(Vault, vault_id)
            if vault is None or vault.tenant != tenant:
                raise NotFound(f"vault_id: vault {vault_id} does not exist", field="vault_id")
        m.status, m.vault_id, m.updated_at = body["status"], vault_id, time.time()
        return {"member": to_seed(m)}


@router.delete("/{member_id}", status_code=204, response_class=Response)
def delete(project_id: str, backup_id: str, member_id: str, request: Request, caller: Caller = Depends(authenticated)):
    """The owner ends a share (the member may no longer restore it)."""
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        m = _member(s, tenant, backup_id, member_id)
        if m.tenant != tenant:
            raise NotFound(f"member_id: backup {m.backup_id} is not shared by project {tenant}", field="member_id")
        s.delete(m)
    return Response(status_code=204)
