"""Checkpoints (seed 003's restore points): one run of a vault over its
volumes, scheduled by its policy or asked for by hand.

Making one, for each volume of the vault:
- skip it (with a code and a reason) when its vault is full, a backup of it
  is already waiting or running, or no online host serves its pool;
- take a snapshot through an agent (its name says which checkpoint made it);
- queue a backup task from that snapshot: incremental from the vault's last
  backup of the volume, or a full re-read every full_backup_interval runs
  (and when there is no earlier backup).
Finishing one (when all its tasks ended, from the scheduler's loop):
- the volume keeps one snapshot of ours, the base of its next incremental:
  after a good backup the previous base is deleted; after a failed one, the
  new snapshot is;
- the policy's retention runs on the vault's backups of each volume, per
  volume; what it drops is deleted from the repository, logged as a
  `delete` task with its counts, and a `gc` task reclaims the space.
"""

from __future__ import annotations

import json
import logging
import time
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from agent.api.v1 import jobs_pb2, volumes_pb2
from agent.controller import retention
from agent.controller.agents import lock_until
from agent.controller.context import ControllerContext
from agent.controller.dispatch import held_at, new_task, queue_backup_point_task, queue_copy
from agent.controller.inventory import log_task, remove_backup, running_vm, server_volumes, serving_hosts, usage
from agent.controller.models import (
    Backup,
    BackupPoint,
    Checkpoint,
    Host,
    Policy,
    Pool,
    Task,
    Vault,
    VaultResource,
    VaultServer,
    Volume,
)
from agent.controller.policy import OperationDefinition
from agent.errors import BackupLocked, BlockferryError, NotFound, cbr_code

log = logging.getLogger("controller.checkpoints")
FINAL = ("success", "failed", "skipped", "timeout")
GB = 1 << 30
SERVER_TYPE = "OS::Nova::Server"


@dataclass
class Skip:
    id: str
    name: str
    code: str
    reason: str
    type: str = "OS::Cinder::Volume"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "code": self.code,
            "reason": self.reason,
        }


def _definition(s, vault: Vault) -> OperationDefinition:
    p = s.get(Policy, vault.policy_id) if vault.policy_id else None
    return OperationDefinition(**json.loads(p.definition_json)) if p else OperationDefinition()


def _hosts(s, pool_uuid: str, dead_after: int) -> list[Host]:
    pool = s.get(Pool, pool_uuid)
    return serving_hosts(s, pool, dead_after) if pool is not None else []


def _running_servers(
    s, vault: Vault, skipped: list[Skip], dead_after: int, only: list[str] | None
) -> dict[str, tuple[Host, set[str], str]]:
    """The vault's servers that run on an online host, each with that host,
    the volumes of its disks now (a disk attached since it joined the vault
    joins too) and who runs it (libvirt or qemu); the others are skipped
    with the reason."""
    out = {}
    for srv in s.scalars(select(VaultServer).where(VaultServer.vault_id == vault.id).order_by(VaultServer.added_at)):
        members = set(s.scalars(select(VaultResource.volume_uuid).where(VaultResource.server_uuid == srv.server_uuid)))
        if only is not None and not members & set(only):
            continue
        found = running_vm(s, srv.server_uuid, dead_after)
        if found is None:
            skipped.append(
                Skip(
                    srv.server_uuid,
                    srv.name,
                    cbr_code("TARGET_UNREACHABLE"),
                    "the server runs on no online host (agents report their running VMs)",
                    SERVER_TYPE,
                )
            )
            continue
        host, vm = found
        try:
            disks = server_volumes(s, vault.tenant, vm, json.loads(srv.exclude_json), "server")
        except BlockferryError as e:
            skipped.append(Skip(srv.server_uuid, srv.name, cbr_code(e.code), e.message, SERVER_TYPE))
            continue
        for vid in disks:
            if vid not in members and s.get(VaultResource, vid) is None:
                s.add(
                    VaultResource(
                        volume_uuid=vid,
                        vault_id=vault.id,
                        tenant=vault.tenant,
                        runs=0,
                        added_at=time.time(),
                        server_uuid=srv.server_uuid,
                    )
                )
        s.flush()
        out[srv.server_uuid] = (host, set(disks), vm.get("Manager", "qemu"))
    return out


def create(
    ctx: ControllerContext,
    vault_id: str,
    *,
    due_at: float,
    manual: bool,
    only: list[str] | None = None,
    name: str = "",
    description: str = "",
    incremental: bool = True,
) -> str | None:
    """Make a checkpoint of the vault; returns its id, or None when one for
    this due time exists already (a scheduled run is never made twice)."""
    cp_id = str(uuidlib.uuid4())
    now = time.time()
    plan = []  # (volume, host, runs so far, base snapshot) to snapshot and back up
    skipped: list[Skip] = []
    with ctx.db.session() as s:
        vault = s.get(Vault, vault_id)
        if vault is None:
            raise NotFound(f"vault_id: vault {vault_id} does not exist", field="vault_id")
        if s.scalar(select(Checkpoint.id).where(Checkpoint.vault_id == vault_id, Checkpoint.due_at == due_at)):
            return None
        servers = _running_servers(s, vault, skipped, ctx.cfg.host_dead_after, only)
        rows = list(
            s.scalars(
                select(VaultResource)
                .where(VaultResource.vault_id == vault_id)
                .order_by(VaultResource.added_at, VaultResource.volume_uuid)
            )
        )
        if only is not None:
            rows = [r for r in rows if r.volume_uuid in only]
        full_vault = usage(s, vault_id)[2] >= vault.size_gb * GB
        for r in rows:
            vol = s.get(Volume, r.volume_uuid)
            label = vol.name if vol else ""
            if vol is None or vol.state != "ready":
                skipped.append(
                    Skip(r.volume_uuid, label, cbr_code("NOT_FOUND"), "the volume does not exist or is not ready")
                )
                continue
            if full_vault:
                skipped.append(
                    Skip(vol.uuid, label, cbr_code("VAULT_FULL"), f"vault {vault.name} is full ({vault.size_gb} GB)")
                )
                continue
            busy = s.scalar(select(Backup.uuid).where(Backup.volume_uuid == vol.uuid, Backup.status == "BackupStarted"))
            if busy:
                skipped.append(
                    Skip(vol.uuid, label, cbr_code("BACKUP_IN_PROGRESS"), f"backup {busy} of the volume is in progress")
                )
                continue
            if r.server_uuid:  # a disk of a server: snapshotted with its other disks on the VM's host
                if r.server_uuid not in servers:
                    continue  # the server is skipped, and says why
                host, disks, _ = servers[r.server_uuid]
                if vol.uuid not in disks:
                    skipped.append(
                        Skip(vol.uuid, label, cbr_code("NOT_FOUND"), f"no longer a disk of server {r.server_uuid}")
                    )
                    continue
                plan.append((vol, host, r.runs, r.base_snapshot, r.server_uuid))
                continue
            hosts = _hosts(s, vol.pool_uuid, ctx.cfg.host_dead_after)
            if not hosts:
                skipped.append(
                    Skip(vol.uuid, label, cbr_code("TARGET_UNREACHABLE"), f"no online host serves pool {vol.pool_uuid}")
                )
                continue
            plan.append((vol, hosts[0], r.runs, r.base_snapshot, ""))
        # "preparing" until its tasks are queued: finish_ready leaves it alone meanwhile
        s.add(
            Checkpoint(
                id=cp_id,
                vault_id=vault_id,
                tenant=vault.tenant,
                policy_id=vault.policy_id,
                due_at=due_at,
                status="preparing",
                manual=manual,
                created_at=now,
                skipped_json=json.dumps([x.to_json() for x in skipped]),
            )
        )
        try:
            s.flush()
        except IntegrityError:  # the unique (vault, due time): made meanwhile
            s.rollback()
            return None
        vault_name, prefix, bp = vault.name, vault.backup_name_prefix, vault.backup_point_uuid
    made = []  # (volume, snapshot, runs, base, extra_info, server run by libvirt)
    with ctx.db.session() as s:
        rbd_pools = set(s.scalars(select(Pool.uuid).where(Pool.kind == "rbd")))
    stamp = datetime.fromtimestamp(due_at, UTC).strftime("%Y%m%d-%H%M%S")
    groups: dict[str, list] = {}  # a server's disks, or one volume alone
    for item in plan:
        groups.setdefault(item[4] or item[0].uuid, []).append(item)
    for items in groups.values():
        host, server = items[0][1], items[0][4]
        on_rbd = [vol.pool_uuid in rbd_pools for vol, *_ in items]
        if server and servers[server][2] == "libvirt" and any(on_rbd):
            if not all(on_rbd):  # libvirt checkpoints only qcow2 disks, and snapshots none of them
                for vol, *_ in items:
                    skipped.append(
                        Skip(
                            vol.uuid,
                            vol.name,
                            cbr_code("FAILED_PRECONDITION"),
                            f"server {server} runs under libvirt on qcow2 and RBD disks at once: libvirt backs up "
                            "only qcow2 disks live and snapshots none; keep its disks on one kind of pool",
                        )
                    )
                continue
        elif server and servers[server][2] == "libvirt":  # backed up live by one vm_backup job, no snapshot
            for vol, _, runs, base, _ in items:
                made.append((vol, "", runs, base, {"server_id": server, "snapshot_id": ""}, server))
            continue
        reqs = [
            volumes_pb2.CreateSnapshotRequest(
                pool_uuid=vol.pool_uuid,
                volume_uuid=vol.uuid,
                snapshot_uuid=str(uuidlib.uuid4()),
                name=f"cbr-{stamp}-{cp_id[:8]}",
                description=f"blockferry checkpoint {cp_id} of vault {vault_name}",
            )
            for vol, *_ in items
        ]
        try:
            if server:  # a server's disks at one point in time (docs/live.md)
                agent = ctx.agents.client(host)
                got = agent.create_snapshot_set(volumes_pb2.CreateSnapshotSetRequest(snapshots=reqs))
                consistency = got.consistency
            else:  # one volume (frozen too when a running VM's guest agent answers)
                consistency = ctx.agents.client(host).create_snapshot(reqs[0]).consistency
        except BlockferryError as e:
            for vol, *_ in items:
                skipped.append(Skip(vol.uuid, vol.name, cbr_code(e.code), f"snapshot failed: {e.message}"))
            continue
        extra = {"server_id": server, "consistency": consistency} if server else None
        for (vol, _, runs, base, _), req in zip(items, reqs, strict=True):
            made.append((vol, req.snapshot_uuid, runs, base, extra and {**extra, "snapshot_id": req.snapshot_uuid}, ""))
    resources = []
    live: dict[str, list] = {}  # server run by libvirt -> its disks' (volume, backup, parent, full) for one job
    with ctx.db.session() as s:
        vault = s.get(Vault, vault_id)
        od = _definition(s, vault)
        locked_until = lock_until(s.get(BackupPoint, bp), ctx.secrets, od.retention_duration_days, time.time())
        for vol, snap, runs, base, extra, live_server in made:
            ours = select(Backup).where(
                Backup.vault_id == vault_id, Backup.volume_uuid == vol.uuid, Backup.status == "BackupSucceeded"
            )
            # the backup of the base snapshot: its bitmaps lead from there to the new one
            parent = (s.scalar(ours.where(Backup.snapshot_uuid == base)) if base else None) or s.scalar(
                ours.order_by(Backup.ctime.desc(), Backup.uuid.desc())
            )
            every = od.full_backup_interval
            full = parent is None or not incremental or (every >= 0 and runs % (every + 1) == 0 and runs > 0)
            bid, task_id = str(uuidlib.uuid4()), str(uuidlib.uuid4())
            if live_server:  # the server's one task, made below
                task_id = live.setdefault(live_server, [str(uuidlib.uuid4())])[0]
            bname = (f"{prefix}_" if prefix else "") + (name or f"autobk_{cp_id[:8]}")
            ts = int(time.time())
            s.add(
                Backup(
                    uuid=bid,
                    tenant=vault.tenant,
                    cluster_uuid=vol.cluster_uuid,
                    name=bname[:128],
                    description=description,
                    backup_point_uuid=bp,
                    volume_uuid=vol.uuid,
                    volume_capacity=vol.capacity,
                    volume_type=vol.vtype,
                    pool_uuid=vol.pool_uuid,
                    snapshot_uuid=snap,
                    snapshot_name=f"cbr-{stamp}-{cp_id[:8]}" if snap else "",
                    status="BackupStarted",
                    task_id=task_id,
                    vault_id=vault_id,
                    checkpoint_id=cp_id,
                    ctime=ts,
                    mtime=ts,
                )
            )
            if live_server:
                live[live_server].append((vol, bid, "" if full or parent is None else parent.uuid, full, bname))
            else:
                spec = jobs_pb2.BackupSpec(
                    backup_point_uuid=bp,
                    pool_uuid=vol.pool_uuid,
                    volume_uuid=vol.uuid,
                    snapshot_uuid=snap,
                    backup_uuid=bid,
                    name=bname[:128],
                    description=description,
                    tenant=vault.tenant,
                    parent_backup_uuid="" if full or parent is None else parent.uuid,
                    full=full,
                    bandwidth_limit=od.bandwidth_limit,
                    lock_until=locked_until,
                )
                new_task(
                    s,
                    task_id=task_id,
                    operation="backup",
                    tenant=vault.tenant,
                    resource_type="backup",
                    resource_uuid=bid,
                    job_kind="backup",
                    spec=spec,
                    pool_uuid=vol.pool_uuid,
                    backup_point_uuid=bp,
                )
            row = s.get(VaultResource, vol.uuid)
            if row is not None:
                row.runs += 1
            resources.append(
                {
                    "id": vol.uuid,
                    "name": vol.name,
                    "type": "OS::Cinder::Volume",
                    "backup_id": bid,
                    "task_id": task_id,
                    "snapshot_id": snap,
                    "full": full,
                    "resource_size": str(-(-vol.capacity // GB)),
                    "extra_info": extra,
                }
            )
        for server, (task_id, *disks) in live.items():
            # one instant for all its disks, read live through libvirt's pull backup (docs/live.md)
            vm_spec = jobs_pb2.VmBackupSpec(
                backup_point_uuid=bp,
                disks=[
                    jobs_pb2.VmBackupDisk(
                        pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid, backup_uuid=bid, parent_backup_uuid=parent
                    )
                    for vol, bid, parent, _, _ in disks
                ],
                name=disks[0][4][:128],
                description=description,
                tenant=vault.tenant,
                bandwidth_limit=od.bandwidth_limit,
                full=any(full for *_, full, _ in disks),
            )
            new_task(
                s,
                task_id=task_id,
                operation="backup",
                tenant=vault.tenant,
                resource_type="server",
                resource_uuid=server,
                job_kind="vm_backup",
                spec=vm_spec,
                pool_uuid=disks[0][0].pool_uuid,
                backup_point_uuid=bp,
            )
        cp = s.get(Checkpoint, cp_id)
        cp.resources_json = json.dumps(resources)
        cp.skipped_json = json.dumps([x.to_json() for x in skipped])
        if not resources:
            cp.status = "error" if skipped else "available"
        else:
            cp.status = "protecting"
    log.info(
        "checkpoint made",
        extra={
            "checkpoint": cp_id,
            "vault": vault_id,
            "resources": len(resources),
            "skipped": len(skipped),
            "manual": manual,
        },
    )
    if resources and ctx.dispatcher is not None:
        ctx.dispatcher.wake()
    return cp_id


def finish_ready(ctx: ControllerContext, now: float | None = None) -> list[str]:
    """Finish the checkpoints whose backups all ended: snapshots, retention,
    GC. Returns their ids."""
    done = []
    with ctx.db.session() as s:
        pending = list(s.scalars(select(Checkpoint).where(Checkpoint.status == "protecting")))
        for cp in pending:
            res = json.loads(cp.resources_json)
            tasks = [s.get(Task, r["task_id"]) for r in res]
            if all(t is not None and t.status in FINAL for t in tasks):
                done.append((cp.id, cp.vault_id, res, [t.status for t in tasks]))
    finished = []
    for cp_id, vault_id, res, statuses in done:
        with ctx.db.session() as s:  # claim it: another thread finishing it too would prune twice
            claimed = s.execute(
                update(Checkpoint)
                .where(Checkpoint.id == cp_id, Checkpoint.status == "protecting")
                .values(status="finishing")
            ).rowcount
        if claimed:
            _finish(ctx, cp_id, vault_id, res, statuses, now if now is not None else time.time())
            finished.append(cp_id)
    return finished


def recover(ctx: ControllerContext) -> None:
    """At start: checkpoints a stopped controller left half made or half
    finished. Finishing runs again (its steps are idempotent); one never
    prepared has no tasks: it ends in error, its reason said."""
    with ctx.db.session() as s:
        s.execute(update(Checkpoint).where(Checkpoint.status == "finishing").values(status="protecting"))
        for cp in s.scalars(select(Checkpoint).where(Checkpoint.status == "preparing")):
            cp.status = "error"
            cp.skipped_json = json.dumps(
                json.loads(cp.skipped_json)
                + [
                    {
                        "id": "",
                        "type": "",
                        "name": "",
                        "code": cbr_code("INTERRUPTED"),
                        "reason": "the controller stopped while this checkpoint was being made",
                    }
                ]
            )


def _delete_snapshot(ctx: ControllerContext, vol: Volume, snap: str) -> None:
    with ctx.db.session() as s:
        hosts = _hosts(s, vol.pool_uuid, ctx.cfg.host_dead_after)
    if not hosts:
        log.warning("snapshot left: no host", extra={"volume": vol.uuid, "snapshot": snap})
        return
    try:
        ctx.agents.client(hosts[0]).delete_snapshot(
            volumes_pb2.SnapshotRef(pool_uuid=vol.pool_uuid, volume_uuid=vol.uuid, snapshot_uuid=snap)
        )
    except NotFound:
        pass
    except BlockferryError as e:  # left for an operator; the next checkpoint works from its own base
        log.warning("snapshot not deleted", extra={"volume": vol.uuid, "snapshot": snap, "error": e.message})


def _finish(
    ctx: ControllerContext, cp_id: str, vault_id: str, res: list[dict], statuses: list[str], now: float
) -> None:

    for r, status in zip(res, statuses, strict=True):
        with ctx.db.session() as s:
            vol = s.get(Volume, r["id"])
            row = s.get(VaultResource, r["id"])
            old = None
            if status == "success" and row is not None:
                old, row.base_snapshot = row.base_snapshot, r["snapshot_id"]
            drop = old if status == "success" else r["snapshot_id"]
        if vol is not None and drop:
            _delete_snapshot(ctx, vol, drop)
    # retention, per volume, over the vault's finished backups; then the copies' own
    with ctx.db.session() as s:
        vault = s.get(Vault, vault_id)
        od = _definition(s, vault) if vault else OperationDefinition()
        backups = list(s.scalars(select(Backup).where(Backup.vault_id == vault_id, Backup.status == "BackupSucceeded")))
        due = {c.id: c.due_at for c in s.scalars(select(Checkpoint).where(Checkpoint.vault_id == vault_id))}
        plan = _plan(backups, od.rule(), due, now)
        tenant, bp = (vault.tenant, vault.backup_point_uuid) if vault else ("", "")
    # the policy's copy rule: this checkpoint's backups to the second backup point, then
    # the copies' retention, counting the copies just queued (never deleting one in flight)
    copy_to = od.copy_backup_point_id
    with ctx.db.session() as s:
        queued = _copy_new(s, od, vault_id, cp_id, bp)
    with ctx.db.session() as s:
        copies = []
        if copy_to:
            copies = list(
                s.scalars(
                    select(Backup).where(
                        Backup.backup_point_uuid == copy_to,
                        Backup.copy_of != "",
                        Backup.checkpoint_id.in_(list(due)),
                        Backup.status.in_(("BackupSucceeded", "BackupStarted")),
                    )
                )
            )
        in_flight = {b.uuid for b in copies if b.status == "BackupStarted"}
        go, keep, counts = _plan(copies, od.copy_rule(), due, now)
        copy_plan = ([b for b in go if b not in in_flight], keep, counts)
    pruned = _prune(ctx, plan)
    copies_pruned = _prune(ctx, copy_plan)
    with ctx.db.session() as s:
        cp = s.get(Checkpoint, cp_id)
        cp.status = "available" if all(x == "success" for x in statuses) else "error"
        for point, result in ((bp, pruned), (copy_to, copies_pruned)):
            if result.logged:
                result.log(s, tenant, vault_id, now, point, cp_id)
            if result.deleted:  # at once: retention ran, nothing else deletes meanwhile
                queue_backup_point_task(
                    s,
                    operation="gc",
                    tenant=tenant,
                    bp_uuid=point,
                    spec=jobs_pb2.GcSpec(backup_point_uuid=point, wait_seconds=600),
                )
    deleted, errors = pruned.deleted, pruned.errors
    log.info(
        "checkpoint finished",
        extra={"checkpoint": cp_id, "vault": vault_id, "deleted": len(deleted), "failed_deletes": len(errors)},
    )
    if (deleted or copies_pruned.deleted or queued) and ctx.dispatcher is not None:
        ctx.dispatcher.wake()


@dataclass
class _Pruned:
    """What a retention pass did to one backup point's backups."""

    deleted: list[str]
    kept: int
    counts: dict[str, int]
    errors: list[str]
    locked: list[str]

    @property
    def logged(self) -> bool:
        return bool(self.deleted or self.errors or self.locked)

    def log(self, s, tenant: str, vault_id: str, now: float, point: str, cp_id: str) -> None:
        """A delete task with seed 003's OpExtendInfoDelete counts."""
        log_task(
            s,
            "delete",
            tenant,
            vault_id,
            now,
            {
                "OpExtendInfoDelete": {
                    "deleted": len(self.deleted) - len(self.errors),
                    "kept": self.kept,
                    "failed": len(self.errors),
                    **self.counts,
                },
                "deleted_backups": self.deleted,
            },
            status="failed" if self.errors else "success",
            pool_uuid="",
            backup_point_uuid=point,
            job_kind="retention",
            spec_json=json.dumps({"checkpoint_id": cp_id}),
            attempts=1,
            error_code="RETENTION" if self.errors else "",
            error_message="; ".join(self.errors),
        )


def _plan(backups: list[Backup], rule, due: dict[str, float], now: float) -> tuple[list[str], int, dict[str, int]]:
    """Retention per volume: the backups to delete, how many are kept, the counts by rule."""
    by_volume: dict[str, list[Backup]] = {}
    for b in backups:
        by_volume.setdefault(b.volume_uuid, []).append(b)

    def when(b: Backup) -> datetime:  # the checkpoint's time (sub-second), else the backup's
        return datetime.fromtimestamp(due.get(b.checkpoint_id, b.ctime), UTC)

    deleted, kept, counts = [], 0, {}
    for items in by_volume.values():
        d = retention.decide([retention.Backup(b.uuid, when(b)) for b in items], rule, datetime.fromtimestamp(now, UTC))
        deleted += list(d.delete)
        kept += len(d.keep)
        for k, n in d.counts().items():
            counts[k] = counts.get(k, 0) + n
    return deleted, kept, counts


def _prune(ctx: ControllerContext, plan: tuple[list[str], int, dict[str, int]]) -> _Pruned:
    """Delete what a retention plan lets go; a locked backup stays (kept_by_lock)."""
    deleted, kept, counts = plan
    errors, locked = [], []
    for bid in deleted:
        try:
            remove_backup(ctx, bid)
        except BackupLocked:
            locked.append(bid)  # kept until its lock ends: a later run prunes it
        except BlockferryError as e:
            errors.append(f"{bid}: {e.code}: {e.message}")
    deleted = [b for b in deleted if b not in locked]
    if locked:  # the retention rule let them go, their lock keeps them
        counts["kept"] = counts.get("kept", 0) + len(locked)
        counts["deleted"] = counts.get("deleted", 0) - len(locked)
        counts["kept_by_lock"] = len(locked)
    return _Pruned(deleted, kept + len(locked), counts, errors, locked)


def _copy_new(s, od: OperationDefinition, vault_id: str, cp_id: str, bp: str) -> list[dict]:
    """A policy's copy rule: this checkpoint's backups to its second backup
    point (each a copy task; only what is not there yet)."""
    target = od.copy_backup_point_id
    if not target or target == bp:
        return []
    if s.get(BackupPoint, target) is None:
        log.warning("copy rule: its backup point is gone", extra={"vault": vault_id, "backup_point": target})
        return []
    made = select(Backup).where(
        Backup.checkpoint_id == cp_id, Backup.vault_id == vault_id, Backup.status == "BackupSucceeded"
    )
    held = held_at(s, target)
    return [queue_copy(s, b, target, checkpoint_id=cp_id) for b in s.scalars(made) if b.uuid not in held]
