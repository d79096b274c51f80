"""The controller's inventory questions and changes that more than one
part asks for (the routers, the dispatcher, the scheduler, checkpoints
and metrics): is a host online, which hosts serve a pool, what a vault
holds, a task the controller did itself, a backup point's live health,
reconnecting one, and deleting a backup."""

from __future__ import annotations

import json
import time
import uuid as uuidlib

from sqlalchemy import func, select

from agent.api.v1 import backups_pb2
from agent.controller.agents import backup_point_request
from agent.controller.context import ControllerContext
from agent.controller.health import host_state
from agent.controller.models import Backup, BackupMember, BackupPoint, Host, Pool, Task, Volume
from agent.errors import BackupInProgress, NotFound, TargetUnreachable


def serving_hosts(s, pool: Pool, dead_after: int, prefer: str = "") -> list[Host]:
    """Online hosts serving the pool, the preferred one first; for a shared
    LUN pool without those whose host lease lapsed, the metadata owner
    before all (only it changes volumes)."""
    hosts = [s.get(Host, h) for h in json.loads(pool.avail_hosts_json)]
    hosts = [h for h in hosts if h is not None and host_state(h, dead_after) == "online"]
    owner = ""
    if pool.kind == "lun":
        owner = metadata_owner(hosts, pool.uuid)
        lapsed = lapsed_lease_hosts(hosts, pool.uuid)
        hosts = [h for h in hosts if h.uuid not in lapsed]
    return sorted(hosts, key=lambda h: (h.uuid != owner, h.uuid != prefer))


def metadata_owner(hosts, pool_uuid: str) -> str:
    """The host that the freshest heartbeat names as a shared pool's
    metadata owner ("" when none does): after a take-over the new owner's
    word is newer than what a dead one said last."""
    named = [
        (h.last_seen or 0, p["metadata_owner"])
        for h in hosts
        for p in json.loads(h.pools_json or "[]")
        if p.get("pool_uuid") == pool_uuid and p.get("metadata_owner")
    ]
    return max(named)[1] if named else ""


def lapsed_lease_hosts(hosts, pool_uuid: str) -> set[str]:
    """The hosts whose host lease on a shared LUN pool lapsed (not renewed,
    not released: their agent died), as the freshest heartbeat read them."""
    named = [
        (h.last_seen or 0, p["lapsed_hosts"])
        for h in hosts
        for p in json.loads(h.pools_json or "[]")
        if p.get("pool_uuid") == pool_uuid and "lapsed_hosts" in p
    ]
    return set(max(named)[1]) if named else set()


def reported_backup_points(hosts) -> dict[str, set[str]]:
    """backup point uuid -> the hosts whose last heartbeat reported it."""
    out: dict[str, set[str]] = {}
    for h in hosts:
        for p in json.loads(h.backup_points_json or "[]"):
            out.setdefault(p.get("backup_point_uuid", ""), set()).add(h.uuid)
    return out


def reporting_hosts(hosts, bp_uuid: str) -> set[str]:
    """The hosts whose last heartbeat reported this backup point."""
    return reported_backup_points(hosts).get(bp_uuid, set())


def _reporting(s, bp_uuid: str, dead_after: int) -> list[Host]:
    """Online hosts whose last heartbeat reported the backup point."""
    hosts = s.scalars(select(Host).order_by(Host.uuid)).all()
    serving = reporting_hosts(hosts, bp_uuid)
    return [h for h in hosts if h.uuid in serving and host_state(h, dead_after) == "online"]


def running_vm(s, vm_uuid: str, dead_after: int) -> tuple[Host, dict] | None:
    """The online host whose agent reported the VM running last, and its
    report (docs/live.md: UUID, Name, State, GuestAgent, Manager, Disks)."""
    for h in s.scalars(select(Host).order_by(Host.last_seen.desc())):
        if host_state(h, dead_after) != "online":
            continue
        for vm in json.loads(h.vms_json):
            if vm.get("UUID") == vm_uuid:
                return h, vm
    return None


def server_volumes(s, tenant: str, vm: dict, exclude: list[str], field: str) -> list[str]:
    """The volumes of a reported VM's disks, less exclude. Disks that are
    no volume of a pool (an ISO, a disk on other storage) cannot be backed
    up and are left out; a volume of another tenant is refused."""
    disks = vm.get("Disks", [])
    known = {d.get("VolumeUUID") for d in disks if d.get("VolumeUUID")}
    for j, x in enumerate(exclude):
        if x not in known:
            f = f"{field}.extra_info.exclude_volumes[{j}]"
            raise NotFound(f"{f}: volume {x} is no disk of server {vm.get('Name', '')}", field=f)
    out = []
    for d in disks:
        vid = d.get("VolumeUUID", "")
        if not vid or vid in exclude:
            continue
        vol = s.get(Volume, vid)
        if vol is None or vol.tenant != tenant:
            raise NotFound(
                f"{field}.id: disk {d.get('Device', '')} of server {vm.get('Name', '')} is volume {vid}, "
                "which is no volume of this project",
                field=f"{field}.id",
            )
        out.append(vid)
    return out


def usage(s, vault_id: str) -> tuple[int, int, int]:
    """(backups, logical bytes, stored bytes) of the vault's finished backups."""
    n, logical, stored = s.execute(
        select(
            func.count(Backup.uuid),
            func.coalesce(func.sum(Backup.size), 0),
            func.coalesce(func.sum(Backup.stored_bytes), 0),
        ).where(Backup.vault_id == vault_id, Backup.status == "BackupSucceeded")
    ).one()
    return int(n), int(logical), int(stored)


def log_task(
    s, operation: str, tenant: str, vault_id: str, started: float, result: dict, *, status: str = "success", **columns
) -> None:
    """An operation done by the controller itself (no agent job), in
    /v1/tasks with seed 003's operation_type; columns: more Task fields."""
    fields = {"job_kind": "", "spec_json": "{}", "attempts": 0, **columns}
    s.add(
        Task(
            id=str(uuidlib.uuid4()),
            operation_type=operation,
            status=status,
            progress=100.0,
            tenant=tenant,
            resource_type="vault",
            resource_uuid=vault_id,
            idempotent=True,
            result_json=json.dumps(result),
            created_at=started,
            started_at=started,
            ended_at=time.time(),
            **fields,
        )
    )


def reconnect_backup_point(ctx: ControllerContext, bp_uuid: str, field: str):
    """Re-check a backup point through an online host (a new session,
    attached there first) and keep its state: (host, BackupPointStatus)."""
    with ctx.db.session() as s:
        bp = s.get(BackupPoint, bp_uuid)
        hosts = [
            h for h in s.scalars(select(Host).order_by(Host.uuid)) if host_state(h, ctx.cfg.host_dead_after) == "online"
        ]
    if bp is None:
        raise NotFound(f"{field}: backup point {bp_uuid} was deleted", field=field)
    if not hosts:
        raise TargetUnreachable(f"{field}: no online host to reach the backup point from", field=field)
    client = ctx.agents.client(hosts[0])
    client.attach_backup_point(backup_point_request(bp, ctx.secrets))
    st = client.reconnect_backup_point(backups_pb2.BackupPointRef(backup_point_uuid=bp.uuid))
    with ctx.db.session() as s:
        row = s.get(BackupPoint, bp.uuid)
        if row is not None:
            row.state = st.status
    return hosts[0], st


def remove_backup(ctx: ControllerContext, bid: str, field: str = "backup_uuid") -> None:
    """Delete a backup from its repository (through an agent that can reach
    the backup point), then its row. A running backup is refused."""
    with ctx.db.session() as s:
        b = s.get(Backup, bid)
        if b is None:
            raise NotFound(f"{field}: backup {bid} does not exist", field=field)
        if b.status == "BackupStarted":
            raise BackupInProgress(f"{field}: backup {bid} is still running", field=field)
        bp = s.get(BackupPoint, b.backup_point_uuid)
        pool = s.get(Pool, b.pool_uuid)
        # the hosts that serve its backup point first: a directory is one host's (a copy's
        # may be another host's than its volume's pool), attached elsewhere it is another one
        hosts = _reporting(s, b.backup_point_uuid, ctx.cfg.host_dead_after)
        if not hosts and bp is not None and bp.btype not in ("local", "disk", "fc"):
            hosts = serving_hosts(s, pool, ctx.cfg.host_dead_after) if pool else []
        elif not hosts and pool is not None and b.copy_of == "":
            hosts = serving_hosts(s, pool, ctx.cfg.host_dead_after)
    if b.status == "BackupSucceeded" and bp is not None:
        if not hosts:
            raise TargetUnreachable(f"{field}: no online host can reach its backup point", field=field)
        ctx.agents.client(hosts[0]).attach_backup_point(backup_point_request(bp, ctx.secrets))
        try:
            ctx.agents.client(hosts[0]).delete_backup(
                backups_pb2.DeleteBackupRequest(backup_point_uuid=bp.uuid, backup_uuid=bid)
            )
        except NotFound:
            pass  # gone from the repository already
    with ctx.db.session() as s:
        row = s.get(Backup, bid)
        if row is None:
            return
        if row.status == "BackupSucceeded":
            bp_row = s.get(BackupPoint, row.backup_point_uuid)
            if bp_row is not None:
                bp_row.ref = max(0, bp_row.ref - 1)
                # its space comes back at the backup point's GC, gc_after_delete after the last deletion
                bp_row.gc_wanted_at = time.time()
        for m in s.scalars(select(BackupMember).where(BackupMember.backup_id == bid)):
            s.delete(m)  # its shares end with it
        s.delete(row)
