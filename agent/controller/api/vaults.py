"""Seed 003: /v3/{project_id}/vaults: create, get, list (with ZStack-style
`q=field=value` conditions, seed 004), update, delete (Permissive or
Enforcing, seed 004), addresources, removeresources, associatepolicy,
dissociatepolicy, migrateresources, and seed 004's reconnect action.

A vault is a named, sized share of a backup point (`backup_point_id`, our
addition to the seed's body: the seed's vaults live in a cloud; a body
without it, as the seed writes them, takes [controller]
default_backup_point). Resources
are volumes of the same tenant (type OS::Cinder::Volume, object_type disk),
or running VMs (OS::Nova::Server, object_type server) whose disks are
volumes of the tenant, less extra_info.exclude_volumes; a volume or server
belongs to one vault. Used capacity is what the vault's backups added to the
repository (after deduplication and compression); logical is their size.
"""

from __future__ import annotations

import json
import time
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from agent.controller import validate as v
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.policies import project
from agent.controller.api.shapes import answers, v3
from agent.controller.inventory import (
    log_task,
    reconnect_backup_point,
    remove_backup,
    running_vm,
    server_volumes,
    usage,
)
from agent.controller.models import Backup, BackupPoint, Policy, Vault, VaultResource, VaultServer, Volume
from agent.errors import (
    AlreadyExists,
    BackupInProgress,
    FailedPrecondition,
    NotFound,
    ResourceInVault,
    ResourceNotInVault,
    VaultFull,
    VaultNotEmpty,
)

GB = 1 << 30
MB = 1 << 20
RESOURCE_TYPE = "OS::Cinder::Volume"
SERVER_TYPE = "OS::Nova::Server"
MIN_SIZE, MAX_SIZE = 10, 10485760  # GB, as the seed's BillingCreate
MAX_RESOURCES = 255
DELETE_MODES = ("Permissive", "Enforcing")
QUERY_KEYS = {"uuid", "id", "name", "status", "state", "policy_id", "backup_point_id"}


PROVIDER_ID = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "blockferry/provider/volume"))  # seed 003's provider_id


def iso(t: float | None) -> str | None:
    """Seed 003's time stamps: 2019-05-23T12:51:10.071232 (UTC); None for none."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") if t else None


def _state(s, vault: Vault) -> str:
    """Enabled when an enabled policy schedules it (seed 004's state)."""
    if not vault.policy_id:
        return "Disabled"
    p = s.get(Policy, vault.policy_id)
    return "Enabled" if p is not None and p.enabled else "Disabled"


def _backed_up(s, vault_id: str, volumes: list[str]) -> tuple[int, int]:
    """(count, stored bytes) of the vault's good backups of these volumes."""
    count, stored = s.execute(
        select(func.count(Backup.uuid), func.coalesce(func.sum(Backup.stored_bytes), 0)).where(
            Backup.vault_id == vault_id, Backup.volume_uuid.in_(volumes), Backup.status == "BackupSucceeded"
        )
    ).one()
    return int(count), int(stored)


def _gb(vol: Volume | None) -> int:
    return -(-vol.capacity // GB) if vol else 0


def to_seed(s, vault: Vault) -> dict:
    resources = []
    for srv in s.scalars(select(VaultServer).where(VaultServer.vault_id == vault.id).order_by(VaultServer.added_at)):
        disks = list(s.scalars(select(VaultResource.volume_uuid).where(VaultResource.server_uuid == srv.server_uuid)))
        count, stored = _backed_up(s, vault.id, disks)
        resources.append(
            {
                "id": srv.server_uuid,
                "name": srv.name,
                "type": SERVER_TYPE,
                "size": sum(_gb(s.get(Volume, d)) for d in disks),
                "backup_count": count,
                "backup_size": stored,
                "protect_status": "available",
                "extra_info": {"exclude_volumes": json.loads(srv.exclude_json)},
            }
        )
    for r in s.scalars(
        select(VaultResource)
        .where(VaultResource.vault_id == vault.id, VaultResource.server_uuid == "")
        .order_by(VaultResource.added_at, VaultResource.volume_uuid)
    ):
        vol = s.get(Volume, r.volume_uuid)
        count, stored = _backed_up(s, vault.id, [r.volume_uuid])
        resources.append(
            {
                "id": r.volume_uuid,
                "name": vol.name if vol else "",
                "type": RESOURCE_TYPE,
                "size": _gb(vol),
                "backup_count": count,
                "backup_size": stored,
                "protect_status": "available",
                "extra_info": None,
            }
        )
    n, logical, stored = usage(s, vault.id)
    used_mb = -(-stored // MB)  # the seed's used: whole MB, rounded up
    return {
        "id": vault.id,
        "name": vault.name,
        "description": vault.description,
        "project_id": vault.tenant,
        "provider_id": PROVIDER_ID,
        "created_at": iso(vault.created_at),
        "enterprise_project_id": "0",  # the seed's default enterprise project
        "user_id": "",  # tokens name a project, not a user
        "auto_bind": False,
        "bind_rules": {},
        "auto_expand": False,
        "tags": [],
        "backup_point_id": vault.backup_point_uuid,
        "policy_id": vault.policy_id or None,
        "backup_name_prefix": vault.backup_name_prefix,
        "status": vault.status,
        "state": _state(s, vault),
        "billing": {
            "status": vault.status,
            "size": vault.size_gb,
            "allocated": vault.size_gb,
            "used": used_mb,
            "frozen_scene": None,
            "object_type": vault.object_type,
            "protect_type": "backup",
            "consistent_level": vault.consistent_level,
            "charging_mode": "post_paid",
            "cloud_type": "public",
            "spec_code": f"vault.backup.{vault.object_type}.normal",
            "storage_unit": None,
            "order_id": None,
            "product_id": None,
        },
        "capacity": {
            "totalCapacity": vault.size_gb * GB,
            "availableCapacity": max(0, vault.size_gb * GB - stored),
            "usedCapacity": stored,
            "logicalCapacity": logical,
            "backups": n,
        },
        "resources": resources,
    }


def load_vault(s, tenant: str, vault_id: str) -> Vault:
    vault = s.get(Vault, vault_id)
    if vault is None or vault.tenant != tenant:
        raise NotFound(f"vault_id: vault {vault_id} does not exist", field="vault_id")
    return vault


@dataclass(frozen=True)
class _Server:
    uuid: str
    name: str
    volumes: tuple[str, ...]
    exclude: tuple[str, ...]


def _resources(s, tenant: str, items, field: str, object_type: str, dead_after: int) -> tuple[list[str], list[_Server]]:
    """A resources list: volumes of the tenant (a disk vault), or running
    VMs whose disks are volumes of the tenant (a server vault)."""
    rtype = SERVER_TYPE if object_type == "server" else RESOURCE_TYPE
    if not isinstance(items, list):
        raise v.bad(field, f'must be a list of {{"id": ..., "type": "{rtype}"}}')
    if len(items) > MAX_RESOURCES:
        raise v.bad(field, f"{len(items)} resources; at most {MAX_RESOURCES}")
    out: list[str] = []
    servers: list[_Server] = []
    for i, item in enumerate(items):
        f = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise v.bad(f, "must be an object with id and type")
        if item.get("type", rtype) != rtype:
            raise v.bad(f"{f}.type", f"{item.get('type')!r}: a vault of object_type {object_type} holds {rtype}")
        rid = v.uuid(str(item.get("id", "")), f"{f}.id")
        if rid in out or any(x.uuid == rid for x in servers):
            raise v.bad(f"{f}.id", f"resource {rid} is listed twice")
        if rtype == SERVER_TYPE:
            servers.append(_server(s, tenant, rid, item.get("extra_info"), f, dead_after))
            continue
        vol = s.get(Volume, rid)
        if vol is None or vol.tenant != tenant:
            raise NotFound(f"{f}.id: volume {rid} does not exist", field=f"{f}.id")
        out.append(rid)
    return out, servers


def _server(s, tenant: str, sid: str, extra, f: str, dead_after: int) -> _Server:
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise v.bad(f"{f}.extra_info", 'must be an object such as {"exclude_volumes": [...]}')
    raw = extra.get("exclude_volumes") or []
    if not isinstance(raw, list):
        raise v.bad(f"{f}.extra_info.exclude_volumes", "must be a list of volume ids")
    exclude = [v.uuid(str(x), f"{f}.extra_info.exclude_volumes[{j}]") for j, x in enumerate(raw)]
    found = running_vm(s, sid, dead_after)
    if found is None:
        raise NotFound(
            f"{f}.id: server {sid} is not running on any online host (agents report their running VMs)",
            field=f"{f}.id",
        )
    _, vm = found
    vols = server_volumes(s, tenant, vm, exclude, f)
    if not vols:
        raise v.bad(f"{f}.extra_info.exclude_volumes", f"no disk of server {vm['Name']} would be backed up")
    return _Server(sid, vm["Name"], tuple(vols), tuple(exclude))


def _attach(s, vault: Vault, volume_ids: list[str], field: str, servers: list[_Server] = ()) -> None:
    for i, vid in enumerate(volume_ids):
        other = s.get(VaultResource, vid)
        if other is not None:
            raise ResourceInVault(
                f"{field}[{i}].id: volume {vid} is in vault {other.vault_id} already", field=f"{field}[{i}].id"
            )
        s.add(VaultResource(volume_uuid=vid, vault_id=vault.id, tenant=vault.tenant, runs=0, added_at=time.time()))
    for i, srv in enumerate(servers):
        f = f"{field}[{i}].id"
        other_srv = s.get(VaultServer, srv.uuid)
        if other_srv is not None:
            raise ResourceInVault(f"{f}: server {srv.uuid} is in vault {other_srv.vault_id} already", field=f)
        s.add(
            VaultServer(
                server_uuid=srv.uuid,
                vault_id=vault.id,
                tenant=vault.tenant,
                name=srv.name,
                exclude_json=json.dumps(list(srv.exclude)),
                added_at=time.time(),
            )
        )
        for vid in srv.volumes:
            other = s.get(VaultResource, vid)
            if other is not None:
                raise ResourceInVault(
                    f"{f}: volume {vid}, a disk of server {srv.name}, is in vault {other.vault_id} already", field=f
                )
            s.add(
                VaultResource(  # the listed order: each its own time
                    volume_uuid=vid,
                    vault_id=vault.id,
                    tenant=vault.tenant,
                    runs=0,
                    added_at=time.time(),
                    server_uuid=srv.uuid,
                )
            )


def _size(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SIZE <= value <= MAX_SIZE:
        raise v.bad(field, f"{value!r}: an integer number of GB, {MIN_SIZE} to {MAX_SIZE}")
    return value


def _text(value, field: str, lo: int, hi: int) -> str:
    if not isinstance(value, str) or not lo <= len(value) <= hi:
        raise v.bad(field, f"must be a string of {lo} to {hi} characters")
    if any(ord(c) < 32 for c in value):
        raise v.bad(field, "may not contain control characters")
    return value


def _policy(s, tenant: str, policy_id, field: str) -> str:
    if policy_id in (None, ""):
        return ""
    pid = v.uuid(str(policy_id), field)
    p = s.get(Policy, pid)
    if p is None or p.tenant != tenant:
        raise NotFound(f"{field}: policy {pid} does not exist", field=field)
    return pid


def _conditions(q: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cond in q:
        key, sep, value = cond.partition("=")
        if not sep or key not in QUERY_KEYS:
            raise v.bad("q", f"{cond!r}: conditions are field=value with field one of {', '.join(sorted(QUERY_KEYS))}")
        out["uuid" if key == "id" else key] = value
    return out


router = APIRouter(prefix="/v3/{project_id}/vaults", tags=["vaults (seed 003)"])


@router.post("", **answers(v3.VaultAnswer, v3.VaultCreate))
def create(project_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or not isinstance(body.get("vault"), dict):
        raise v.bad("vault", 'the body must be {"vault": {...}}')
    b = body["vault"]
    name = _text(b.get("name"), "vault.name", 1, 64)
    description = _text(b.get("description", ""), "vault.description", 0, 64)
    prefix = _text(b.get("backup_name_prefix", "") or "", "vault.backup_name_prefix", 0, 32)
    billing = b.get("billing")
    if not isinstance(billing, dict):
        raise v.bad(
            "vault.billing",
            'required: {"object_type": "disk", "protect_type": "backup", '
            '"consistent_level": "crash_consistent", "size": GB}',
        )
    object_type = billing.get("object_type")
    if object_type not in ("disk", "server"):
        raise v.bad(
            "vault.billing.object_type", f"{object_type!r}: 'disk' (volumes) or 'server' (running VMs, all disks)"
        )
    if billing.get("protect_type") != "backup":
        raise v.bad("vault.billing.protect_type", f"{billing.get('protect_type')!r}: only 'backup'")
    if billing.get("consistent_level", "crash_consistent") != "crash_consistent":
        raise v.bad("vault.billing.consistent_level", f"{billing.get('consistent_level')!r}: only 'crash_consistent'")
    size = _size(billing.get("size"), "vault.billing.size")
    if "resources" not in b:
        raise v.bad("vault.resources", "required ([] for none)")
    default = context(request).cfg.default_backup_point
    if b.get("backup_point_id") in (None, "") and not default:
        raise v.bad(
            "vault.backup_point_id",
            "required: no [controller] default_backup_point is configured to take its place",
        )
    bpid = v.uuid(str(b.get("backup_point_id") or default), "vault.backup_point_id")
    now = time.time()
    with context(request).db.session() as s:
        bp = s.get(BackupPoint, bpid)
        if bpid == default and bp is None:
            raise FailedPrecondition(
                f"vault.backup_point_id: the default backup point {bpid} ([controller] default_backup_point) "
                "does not exist",
                field="vault.backup_point_id",
            )
        # a project's own backup point, or the one the operator made the default
        if bp is None or (bpid != default and (not caller.sees(bp.tenant) or bp.tenant != tenant)):
            raise NotFound(f"vault.backup_point_id: backup point {bpid} does not exist", field="vault.backup_point_id")
        dead = context(request).cfg.host_dead_after
        vols, servers = _resources(s, tenant, b.get("resources"), "vault.resources", object_type, dead)
        vault = Vault(
            id=str(uuidlib.uuid4()),
            tenant=tenant,
            name=name,
            description=description,
            backup_point_uuid=bpid,
            size_gb=size,
            object_type=object_type,
            consistent_level="crash_consistent",
            policy_id=_policy(s, tenant, b.get("backup_policy_id"), "vault.backup_policy_id"),
            policy_since=now,
            backup_name_prefix=prefix,
            status="available",
            created_at=now,
            updated_at=now,
        )
        s.add(vault)
        try:
            s.flush()
        except IntegrityError:
            raise AlreadyExists(f"vault.name: a vault named {name!r} exists", field="vault.name") from None
        _attach(s, vault, vols, "vault.resources", servers)
        s.flush()
        return {"vault": to_seed(s, vault)}


@router.get("", **answers(v3.VaultList))
def list_(
    project_id: str,
    request: Request,
    name: str = "",
    policy_id: str = "",
    status: str = "",
    object_type: str = "",
    limit: int = Query(1000, ge=1, le=1000),
    offset: int = Query(0, ge=0),
    q: list[str] = Query(default=[]),
    caller: Caller = Depends(authenticated),
):
    tenant = project(caller, project_id)
    cond = _conditions(q)
    with context(request).db.session() as s:
        query = select(Vault).where(Vault.tenant == tenant).order_by(Vault.created_at, Vault.id)
        for key, value in (("name", name), ("policy_id", policy_id), ("status", status)):
            if value:
                cond.setdefault(key, value)
        if object_type:
            query = query.where(Vault.object_type == object_type)
        columns = {
            "uuid": Vault.id,
            "name": Vault.name,
            "status": Vault.status,
            "policy_id": Vault.policy_id,
            "backup_point_id": Vault.backup_point_uuid,
        }
        for key, value in cond.items():
            if key in columns:
                query = query.where(columns[key] == value)
        rows = [x for x in s.scalars(query) if "state" not in cond or _state(s, x) == cond["state"]]
        page = rows[offset : offset + limit]
        return {"vaults": [to_seed(s, x) for x in page], "count": len(rows)}


@router.get("/{vault_id}", **answers(v3.VaultAnswer))
def get(project_id: str, vault_id: str, request: Request, caller: Caller = Depends(authenticated)):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        return {"vault": to_seed(s, load_vault(s, tenant, vault_id))}


@router.put("/{vault_id}", **answers(v3.VaultAnswer, v3.VaultUpdate))
def update(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or not isinstance(body.get("vault"), dict):
        raise v.bad("vault", 'the body must be {"vault": {...}}')
    b = body["vault"]
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        if "name" in b:
            vault.name = _text(b["name"], "vault.name", 1, 64)
        if "description" in b:
            vault.description = _text(b["description"], "vault.description", 0, 64)
        if "backup_name_prefix" in b:
            vault.backup_name_prefix = _text(b["backup_name_prefix"], "vault.backup_name_prefix", 0, 32)
        if isinstance(b.get("billing"), dict) and "size" in b["billing"]:
            size = _size(b["billing"]["size"], "vault.billing.size")
            _, _, stored = usage(s, vault.id)
            if size * GB < stored:
                raise v.bad("vault.billing.size", f"{size} GB is less than the {stored / GB:.1f} GB the vault uses")
            vault.size_gb = size
        vault.updated_at = time.time()
        try:
            s.flush()
        except IntegrityError:
            raise AlreadyExists(f"vault.name: a vault named {vault.name!r} exists", field="vault.name") from None
        return {"vault": to_seed(s, vault)}


@router.delete("/{vault_id}", status_code=204, response_class=Response)
def delete(
    project_id: str,
    vault_id: str,
    request: Request,
    deleteMode: str = "",
    mode: str = "",
    caller: Caller = Depends(authenticated),
):
    """deleteMode (seed 004; `mode` is taken too): Permissive refuses while
    the vault holds backups; Enforcing deletes them (from their
    repository), then the vault. Logged as a vault_delete task."""
    tenant = project(caller, project_id)
    field = "deleteMode" if deleteMode or not mode else "mode"
    mode = deleteMode or mode or "Permissive"
    if mode not in DELETE_MODES:
        raise v.bad(field, f"{mode!r}: Permissive or Enforcing")
    state = context(request)
    with state.db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        backups = list(s.scalars(select(Backup.uuid).where(Backup.vault_id == vault.id).order_by(Backup.ctime)))
        if backups and mode == "Permissive":
            raise VaultNotEmpty(
                f"vault_id: vault {vault.name} holds {len(backups)} backup(s); delete them or use mode=Enforcing",
                field="vault_id",
            )
        vault.status = "deleting"
    started = time.time()
    for bid in backups:
        remove_backup(state, bid, field="vault_id")
    with state.db.session() as s:
        for r_ in s.scalars(select(VaultResource).where(VaultResource.vault_id == vault_id)):
            s.delete(r_)
        for srv in s.scalars(select(VaultServer).where(VaultServer.vault_id == vault_id)):
            s.delete(srv)
        s.delete(s.get(Vault, vault_id))
        log_task(s, "vault_delete", tenant, vault_id, started, {"mode": mode, "backups_deleted": len(backups)})
    return Response(status_code=204)  # the seed answers 204, no body


@router.post("/{vault_id}/addresources", **answers(v3.ResourcesAdded, v3.ResourcesAdd))
def add_resources(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        items = body.get("resources") if isinstance(body, dict) else None
        dead = context(request).cfg.host_dead_after
        vols, servers = _resources(s, tenant, items, "resources", vault.object_type, dead)
        have = s.scalar(select(func.count()).select_from(VaultResource).where(VaultResource.vault_id == vault.id))
        adding = len(vols) + sum(len(x.volumes) for x in servers)
        if have + adding > MAX_RESOURCES:
            raise v.bad("resources", f"the vault would hold {have + adding} resources; at most {MAX_RESOURCES}")
        _attach(s, vault, vols, "resources", servers)
        vault.updated_at = time.time()
    return {"add_resource_ids": vols + [x.uuid for x in servers]}


@router.post("/{vault_id}/removeresources", **answers(v3.ResourcesRemoved, v3.ResourcesRemove))
def remove_resources(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    """The volumes leave the vault; their backups stay in it until deleted."""
    tenant = project(caller, project_id)
    ids = body.get("resource_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not ids:
        raise v.bad("resource_ids", "must be a non-empty list of volume ids")
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        for i, raw in enumerate(ids):
            vid = v.uuid(str(raw), f"resource_ids[{i}]")
            srv = s.get(VaultServer, vid)
            if srv is not None and srv.vault_id == vault.id:  # the server and its disks
                for r_ in s.scalars(select(VaultResource).where(VaultResource.server_uuid == vid)):
                    s.delete(r_)
                s.delete(srv)
                continue
            row = s.get(VaultResource, vid)
            if row is None or row.vault_id != vault.id:
                raise ResourceNotInVault(
                    f"resource_ids[{i}]: volume {vid} is not in vault {vault.name}", field=f"resource_ids[{i}]"
                )
            s.delete(row)
        vault.updated_at = time.time()
        log_task(
            s, "remove_resource", tenant, vault.id, vault.updated_at, {"remove_resource_ids": [str(x) for x in ids]}
        )
    return {"remove_resource_ids": [str(x) for x in ids]}


@router.post("/{vault_id}/migrateresources", **answers(v3.ResourcesMigrated, v3.ResourcesMigrate))
def migrate_resources(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    """Volumes (or servers, with their disks) move to another vault of the
    project with their backups, which keep their chains: the next
    checkpoint there is incremental from them. Both vaults must keep their
    backups on one backup point (moving data between backup points is a
    copy, not a migration), hold the same object type, and the destination
    must have room for what the backups use."""
    tenant = project(caller, project_id)
    if not isinstance(body, dict):
        raise v.bad("resource_ids", 'the body must be {"resource_ids": [...], "destination_vault_id": ...}')
    ids = body.get("resource_ids")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_RESOURCES:
        raise v.bad("resource_ids", f"must be a list of 1 to {MAX_RESOURCES} resource ids")
    dest_id = v.uuid(str(body.get("destination_vault_id") or ""), "destination_vault_id")
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        try:
            dest = load_vault(s, tenant, dest_id)
        except NotFound:
            field = "destination_vault_id"
            raise NotFound(f"{field}: vault {dest_id} does not exist", field=field) from None
        if dest.id == vault.id:
            raise v.bad("destination_vault_id", "is the vault the resources are in")
        if dest.backup_point_uuid != vault.backup_point_uuid:
            raise FailedPrecondition(
                f"destination_vault_id: vault {dest.name} keeps its backups on another backup point; "
                "a migration moves backups between vaults of one backup point",
                field="destination_vault_id",
            )
        if dest.object_type != vault.object_type:
            raise v.bad("destination_vault_id", f"holds {dest.object_type} resources, not {vault.object_type}")
        volumes: list[str] = []
        moved: list[str] = []
        for i, raw in enumerate(ids):
            rid = v.uuid(str(raw), f"resource_ids[{i}]")
            srv = s.get(VaultServer, rid)
            if srv is not None and srv.vault_id == vault.id:
                disks = list(s.scalars(select(VaultResource).where(VaultResource.server_uuid == rid)))
                srv.vault_id = dest.id
                volumes += [r_.volume_uuid for r_ in disks]
            else:
                row = s.get(VaultResource, rid)
                if row is None or row.vault_id != vault.id or row.server_uuid:
                    raise ResourceNotInVault(
                        f"resource_ids[{i}]: {rid} is not a resource of vault {vault.name}", field=f"resource_ids[{i}]"
                    )
                volumes.append(rid)
            moved.append(rid)
        backups = list(s.scalars(select(Backup).where(Backup.vault_id == vault.id, Backup.volume_uuid.in_(volumes))))
        running = [b.uuid for b in backups if b.status == "BackupStarted"]
        if running:
            raise BackupInProgress(
                f"resource_ids: backup {running[0]} of a resource is in progress; migrate when it ends",
                field="resource_ids",
            )
        adding = sum(b.stored_bytes for b in backups if b.status == "BackupSucceeded")
        _, _, used = usage(s, dest.id)
        if used + adding > dest.size_gb * GB:
            raise VaultFull(
                f"destination_vault_id: vault {dest.name} would use {used + adding} of {dest.size_gb * GB} bytes",
                field="destination_vault_id",
            )
        for vid in volumes:
            s.get(VaultResource, vid).vault_id = dest.id
        for b in backups:
            b.vault_id = dest.id
        vault.updated_at = dest.updated_at = time.time()
    return {"migrated_resources": moved}


@router.post("/{vault_id}/associatepolicy", **answers(v3.PolicyAssociated, v3.PolicyRef))
def associate(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        pid = _policy(s, tenant, body.get("policy_id") if isinstance(body, dict) else None, "policy_id")
        if not pid:
            raise v.bad("policy_id", "required")
        if vault.policy_id != pid:  # runs of the new policy are due from now on
            vault.policy_id, vault.policy_since = pid, time.time()
        vault.updated_at = time.time()
    return {"associate_policy": {"vault_id": vault_id, "policy_id": pid}}


@router.post("/{vault_id}/dissociatepolicy", **answers(v3.PolicyDissociated, v3.PolicyRef))
def dissociate(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    tenant = project(caller, project_id)
    with context(request).db.session() as s:
        vault = load_vault(s, tenant, vault_id)
        pid = v.uuid(str(body.get("policy_id", "") if isinstance(body, dict) else ""), "policy_id")
        if vault.policy_id != pid:
            raise NotFound(f"policy_id: policy {pid} is not applied to vault {vault.name}", field="policy_id")
        vault.policy_id, vault.updated_at = "", time.time()
    return {"dissociate_policy": {"vault_id": vault_id, "policy_id": pid}}


@router.put("/{vault_id}/actions", **answers(v3.VaultAnswer, v3.ReconnectAction))
def actions(
    project_id: str, vault_id: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)
):
    """Seed 004's actions: {"reconnectBackupStorage": {}} re-checks the
    vault's backup point through an agent (a new session) and answers
    its health with the vault."""
    tenant = project(caller, project_id)
    if not isinstance(body, dict) or "reconnectBackupStorage" not in body:
        raise v.bad("reconnectBackupStorage", 'the only action is {"reconnectBackupStorage": {}}')
    state = context(request)
    with state.db.session() as s:
        bp_uuid = load_vault(s, tenant, vault_id).backup_point_uuid
    host, st = reconnect_backup_point(state, bp_uuid, "vault_id")
    with state.db.session() as s:
        out = to_seed(s, load_vault(s, tenant, vault_id))
    out["backup_storage"] = {
        "uuid": bp_uuid,
        "status": st.status,
        "host_uuid": host.uuid,
        "totalCapacity": st.total_bytes,
        "availableCapacity": st.available_bytes,
        "latency_ms": round(st.latency_ms, 3),
        "error_code": st.error_code or None,
        "error": st.error or None,
    }
    return {"vault": out}
