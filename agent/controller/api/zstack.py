"""Seed 004: ZStack's backup storage API at its own paths. A backup
storage is a backup point (seed 000): GET /zstack/v1/backup-storage (a
query: `q=` conditions, limit, start, count, replyWithCount, sort), GET
/zstack/v1/backup-storage/{uuid} (the same query by uuid), PUT
.../{uuid}/actions {"reconnectBackupStorage": {}}, and DELETE
.../{uuid}?deleteMode=Permissive|Enforcing. The caller's token may come
as `Authorization: OAuth <token>`; errors are ZStack's envelope (see
envelope.py). The conditions are parsed by agent.controller.zquery;
uuids are taken with or without dashes (ZStack writes 32 hex digits)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from sqlalchemy import func, select

from agent.controller import validate as v
from agent.controller import zquery
from agent.controller.api.auth import Caller, authenticated, context
from agent.controller.api.shapes import answers
from agent.controller.api.shapes import zstack as zs
from agent.controller.health import Fleet
from agent.controller.inventory import reconnect_backup_point, remove_backup
from agent.controller.models import Backup, BackupPoint, Host, Task, Vault
from agent.errors import Busy, HasDependents, InvalidArgument, NotFound, from_code

DELETE_MODES = ("Permissive", "Enforcing")
CONNECTED = ("healthy", "degraded")  # our health states a client may use
FIELDS = {
    "uuid": "uuid",
    "name": str,
    "url": str,
    "description": str,
    "type": str,
    "state": str,
    "status": str,
    "totalCapacity": int,
    "availableCapacity": int,
    "createDate": "date",
    "lastOpDate": "date",
    "attachedZoneUuids": list,
}


def zdate(t: float) -> str:
    """ZStack's time stamps, as its examples show them: Apr 11, 2018 2:50:54 PM
    (the controller's local time)."""
    d = datetime.fromtimestamp(t)
    return f"{d:%b} {d.day}, {d.year} {d.hour % 12 or 12}:{d:%M:%S} {d:%p}"


def url_of(bp: BackupPoint) -> str:
    where = bp.root_dir.rstrip("/") + (f"/{bp.sub_dir}" if bp.sub_dir else "")
    if bp.btype in ("local", "disk", "fc"):
        return where
    if bp.btype == "iscsi":
        return f"iscsi://{bp.ip}/{bp.root_dir}"
    if bp.btype == "s3":
        return f"s3://{bp.ip}/{bp.root_dir}" + (f"/{bp.sub_dir}" if bp.sub_dir else "")
    scheme = "smb" if bp.btype == "samba" else bp.btype
    return f"{scheme}://{bp.ip}/{where.lstrip('/')}"


def inventory(s, bp: BackupPoint, fleet: Fleet) -> dict:
    """A BackupStorageInventory: Connected while the hosts' heartbeats say
    it is usable (healthy or degraded, health.py); when no host reports it,
    what the last reconnect found."""
    health = fleet.backup_point(bp.uuid)
    connected = health.state in CONNECTED if health.reports else bp.state in CONNECTED
    total, avail = (health.total_bytes, health.available_bytes) if connected else (0, 0)
    zones = {bp.zone_uuid} if bp.zone_uuid else set()
    for r in health.reports if not zones else ():
        h = s.get(Host, r.host_uuid)
        if h is not None and h.zone_uuid and r.online:
            zones.add(h.zone_uuid)
    return {
        "uuid": bp.uuid,
        "name": bp.name,
        "url": url_of(bp),
        "description": "",
        "totalCapacity": total,
        "availableCapacity": avail,
        "type": bp.btype,
        "state": "Enabled",
        "status": "Connected" if connected else "Disconnected",
        "createDate": zdate(bp.ctime),
        "lastOpDate": zdate(bp.mtime),
        "attachedZoneUuids": sorted(zones),
    }


def _visible(s, caller: Caller, dead_after: int) -> list[dict]:
    q = select(BackupPoint).order_by(BackupPoint.ctime, BackupPoint.name, BackupPoint.uuid)
    if not caller.operator:
        q = q.where(BackupPoint.tenant == caller.tenant)
    fleet = Fleet(s, dead_after)
    return [inventory(s, bp, fleet) for bp in s.scalars(q)]


router = APIRouter(prefix="/zstack/v1/backup-storage", tags=["backup storage (seed 004)"])


def _query(
    request: Request,
    caller: Caller,
    conditions: list[str],
    limit: int | None,
    start: int,
    count: bool,
    reply_with_count: bool,
    sort: str,
) -> dict:
    parsed = [zquery.parse(c, FIELDS, "q") for c in conditions]
    if limit is not None and limit < 0:
        raise InvalidArgument("limit: must be 0 or more", field="limit")
    if start < 0:
        raise InvalidArgument("start: must be 0 or more", field="start")
    with context(request).db.session() as s:
        rows = [
            r for r in _visible(s, caller, context(request).cfg.host_dead_after) if zquery.matches(r, parsed, FIELDS)
        ]
    if count:
        return {"total": len(rows), "success": True}
    if sort:
        rows = zquery.sort(rows, sort, FIELDS, "sort")
    page = rows[start : None if limit is None else start + limit]
    out: dict[str, Any] = {"inventories": page, "success": True}
    if reply_with_count:
        out["total"] = len(rows)
    return out


@router.get("", **answers(zs.Inventories))
def query(
    request: Request,
    q: list[str] = Query(default=[]),
    limit: int | None = Query(None),
    start: int = Query(0),
    count: bool = Query(False),
    replyWithCount: bool = Query(False),
    sort: str = Query(""),
    caller: Caller = Depends(authenticated),
):
    """QueryBackupStorage: every backup storage the caller may see that
    meets all conditions."""
    return _query(request, caller, q, limit, start, count, replyWithCount, sort)


@router.get("/{uuid}", **answers(zs.Inventories))
def get(
    uuid: str,
    request: Request,
    q: list[str] = Query(default=[]),
    caller: Caller = Depends(authenticated),
):
    """The same query with uuid=<uuid> first: an unknown uuid answers an
    empty `inventories`, as ZStack does."""
    bid = v.uuid(zquery.uuid_text(uuid), "uuid")
    return _query(request, caller, [f"uuid={bid}", *q], None, 0, False, False, "")


def _load(s, caller: Caller, uuid: str) -> BackupPoint:
    bid = v.uuid(zquery.uuid_text(uuid), "uuid")
    bp = s.get(BackupPoint, bid)
    if bp is None or not caller.sees(bp.tenant):
        raise NotFound(f"uuid: backup storage {bid} does not exist", field="uuid")
    return bp


@router.put("/{uuid}/actions", **answers(zs.InventoryAnswer, zs.ReconnectBody))
def actions(uuid: str, request: Request, body: Any = Body(None), caller: Caller = Depends(authenticated)):
    """ReconnectBackupStorage: a new session from an online host; the
    answer is the inventory with the status found, or the reason it
    cannot be reached."""
    if not isinstance(body, dict) or not isinstance(body.get("reconnectBackupStorage"), dict):
        raise v.bad("reconnectBackupStorage", 'the only action is {"reconnectBackupStorage": {}}')
    unknown = set(body) - {"reconnectBackupStorage", "systemTags", "userTags"}
    if unknown:
        raise v.bad(sorted(unknown)[0], "is not a key of this action (reconnectBackupStorage, systemTags, userTags)")
    state = context(request)
    with state.db.session() as s:
        bid = _load(s, caller, uuid).uuid
    host, st = reconnect_backup_point(state, bid, "uuid")
    if st.status not in CONNECTED:
        raise from_code(
            st.error_code or "TARGET_UNREACHABLE",
            f"uuid: backup storage {bid} from host {host.hostname or host.uuid}: {st.status}: {st.error}",
            "uuid",
        )
    with state.db.session() as s:
        inv = inventory(s, _load(s, caller, bid), Fleet(s, state.cfg.host_dead_after))
    inv["status"] = "Connected"
    inv["totalCapacity"], inv["availableCapacity"] = st.total_bytes, st.available_bytes
    return {"inventory": inv}


@router.delete("/{uuid}", **answers(zs.Deleted))
def delete(
    uuid: str,
    request: Request,
    deleteMode: str = Query("Permissive"),
    caller: Caller = Depends(authenticated),
):
    """DeleteBackupStorage. Permissive (the default) refuses while backups,
    vaults or running tasks use it; Enforcing deletes its backups from the
    repository first, and still refuses while a vault or a task uses it
    (delete the vault, or wait for the task)."""
    if deleteMode not in DELETE_MODES:
        raise v.bad("deleteMode", f"{deleteMode!r}: Permissive or Enforcing")
    state = context(request)
    with state.db.session() as s:
        bp = _load(s, caller, uuid)
        vaults = sorted(s.scalars(select(Vault.name).where(Vault.backup_point_uuid == bp.uuid)))
        if vaults:
            raise HasDependents(
                f"uuid: backup storage {bp.name!r} holds vault(s) {', '.join(vaults)}; delete them first",
                field="uuid",
            )
        busy = s.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.backup_point_uuid == bp.uuid, Task.status.in_(("waiting", "running")))
        )
        if busy:
            raise Busy(f"uuid: {busy} task(s) use backup storage {bp.name!r}; try again when they end", field="uuid")
        backups = list(s.scalars(select(Backup.uuid).where(Backup.backup_point_uuid == bp.uuid).order_by(Backup.ctime)))
        if backups and deleteMode == "Permissive":
            raise HasDependents(
                f"uuid: backup storage {bp.name!r} holds {len(backups)} backup(s); delete them, "
                "or use deleteMode=Enforcing",
                field="uuid",
            )
        bid = bp.uuid
    for b in backups:
        remove_backup(state, b, field="uuid")
    with state.db.session() as s:
        row = s.get(BackupPoint, bid)
        if row is not None:
            row.mtime = int(time.time())
            s.delete(row)
    return {}
