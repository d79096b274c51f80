"""Job kinds for backups: backup, restore, verify, gc."""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

from agent.backup_points import BackupPoints
from agent.errors import AlreadyExists, DataCorrupt, InvalidArgument, RestoreTooSmall
from agent.exports import Exports
from agent.jobs.kinds import Claim, JobKind
from agent.jobs.locks import LockMode
from agent.kinds import instant
from agent.kinds.volumes import volume_resource
from agent.pools import PoolRegistry
from agent.repo import backup as backup_mod
from agent.repo import gc as gc_mod
from agent.repo import restore as restore_mod
from agent.repo import verify as verify_mod
from agent.repo.catalog import latest_for_volume
from agent.repo.gc import GcResult
from agent.repo.verify import VerifyResult
from agent.volumes.base import check_name, check_uuid


def backup_point_resource(uuid: str) -> str:
    return f"backup_point:{uuid}"


log = logging.getLogger("agent.restore")


@dataclass(frozen=True)
class BackupSpec:
    backup_point_uuid: str
    pool_uuid: str
    volume_uuid: str
    snapshot_uuid: str
    backup_uuid: str  # the new backup's id, chosen by the caller
    name: str = ""
    description: str = ""
    tenant: str = ""
    parent_backup_uuid: str = ""  # "": the volume's latest backup on this point, if any
    full: bool = False  # read everything even when a parent exists (full_backup_interval)
    bandwidth_limit: int = 0  # bytes per second for this job alone (a policy's limit); 0: none
    lock_until: int = 0  # unix seconds: locked until then at least (a policy's retention); 0: lock_days only


@dataclass(frozen=True)
class BackupResult:
    backup_uuid: str
    mode: str  # full, incremental or fallback
    parent_backup_uuid: str
    size: int
    image_digest: str
    chunks_read: int
    read_bytes: int
    new_chunks: int
    stored_bytes: int
    changed_chunks: int
    mode_reason: str = ""  # why every chunk was read, or why tracking was degraded
    consistency: str = ""  # the snapshot's (docs/live.md): application, crash or offline


def result_of(m, consistency: str) -> BackupResult:
    """A published backup's manifest as the job's result."""
    s = m.stats
    return BackupResult(
        m.backup_id,
        m.mode,
        m.parent or "",
        m.size,
        m.image_digest,
        s.chunks_read,
        s.read_bytes,
        s.new_chunks,
        s.stored_bytes,
        s.changed_chunks,
        s.mode_reason,
        consistency,
    )


@dataclass(frozen=True)
class RestoreSpec:
    backup_point_uuid: str
    backup_uuid: str
    pool_uuid: str  # the pool of the new volume (seed: new_pool_uuid)
    volume_uuid: str  # the new volume's uuid (in_place: the volume to overwrite)
    name: str  # the new volume's name (seed: new_volume_name)
    in_place: bool = False  # overwrite volume_uuid, after a safety snapshot
    keep_safety_snapshot: bool = False  # in_place: keep it after success too
    instant: bool = False  # the volume is an overlay on the backup's export, usable at once (agent/kinds/instant.py)
    wait_for_vm: int = 0  # instant: seconds to wait for a VM to start on the volume before copying without one


@dataclass(frozen=True)
class RestoreResult:
    pool_uuid: str
    volume_uuid: str
    access_path: str
    capacity: int
    image_digest: str
    written_bytes: int
    safety_snapshot_uuid: str = ""  # in_place: the volume as it was, when kept
    safety_snapshot_deleted: bool = False  # in_place: deleted after the restore succeeded
    instant_copy: str = ""  # instant: "live" (the VM's block-stream) or "offline" (qemu-img rebase)


@dataclass(frozen=True)
class VerifySpec:
    backup_point_uuid: str
    backup_uuid: str  # "" with repository
    deep: bool = False
    repository: bool = False  # every backup, pack and index of the backup point


@dataclass(frozen=True)
class GcSpec:
    backup_point_uuid: str
    wait_seconds: int = 0  # while the repository is held by others (0: REPOSITORY_LOCKED at once)


def _manifest(points: BackupPoints, bp_uuid: str, backup_uuid: str):
    repo = points.get(bp_uuid).repository()
    return repo, repo.manifest(check_uuid(backup_uuid, "backup_uuid"))


class BackupKind(JobKind):
    name = "backup"
    spec_type = BackupSpec
    result_type = BackupResult

    def __init__(self, pools: PoolRegistry, points: BackupPoints):
        self.pools, self.points = pools, points

    def prepare(self, spec: BackupSpec) -> Claim:
        pool = self.pools.get(spec.pool_uuid)
        pool.snapshot_info(spec.volume_uuid, spec.snapshot_uuid)
        repo = self.points.get(spec.backup_point_uuid).repository()
        check_uuid(spec.backup_uuid, "backup_uuid")
        if repo.has_backup(spec.backup_uuid):
            raise AlreadyExists(
                f"backup_uuid: backup {spec.backup_uuid} exists on backup point {spec.backup_point_uuid}",
                field="backup_uuid",
            )
        if spec.name:
            check_name(spec.name, "name")
        if spec.parent_backup_uuid:
            parent = repo.manifest(check_uuid(spec.parent_backup_uuid, "parent_backup_uuid"))
            if parent.volume_uuid != spec.volume_uuid:
                raise InvalidArgument(
                    f"parent_backup_uuid: backup {parent.backup_id} is of volume "
                    f"{parent.volume_uuid}, not {spec.volume_uuid}",
                    field="parent_backup_uuid",
                )
        # Reading a snapshot: others may read too, but nothing may rewrite its layers.
        return Claim(volume_resource(spec.pool_uuid, spec.volume_uuid), LockMode.SHARED)

    def run(self, spec: BackupSpec, ctx) -> BackupResult:
        pool = self.pools.get(spec.pool_uuid)
        repo = self.points.get(spec.backup_point_uuid).repository()
        parent = None
        if spec.parent_backup_uuid:
            parent = repo.manifest(spec.parent_backup_uuid)
        elif not spec.full:
            parent = latest_for_volume(repo, spec.volume_uuid)
        m = backup_mod.backup(
            pool,
            spec.volume_uuid,
            spec.snapshot_uuid,
            repo,
            parent=parent,
            full=spec.full,
            backup_id=spec.backup_uuid,
            name=spec.name,
            description=spec.description,
            tenant=spec.tenant,
            ctx=ctx,
            lock=self.points.get(spec.backup_point_uuid).lock_for(spec.lock_until),
        )
        return result_of(m, pool.snapshot_info(spec.volume_uuid, spec.snapshot_uuid).consistency)


class _CountingWriter:
    """Writes restored chunks into a target and counts the bytes; workers
    call it concurrently for targets that take parallel writes."""

    def __init__(self, target) -> None:
        self.target = target
        self.written = 0
        self._lock = threading.Lock()

    def __call__(self, offset: int, data) -> None:
        self.target.write(offset, data)
        with self._lock:
            self.written += len(data)


def _check_digest(m, digest: str) -> None:
    if digest != m.image_digest:
        raise DataCorrupt(
            f"backup {m.backup_id}: the restored content's image digest {digest} does not "
            f"match the manifest's {m.image_digest}"
        )


class RestoreKind(JobKind):
    name = "restore"
    spec_type = RestoreSpec
    result_type = RestoreResult

    def __init__(self, pools: PoolRegistry, points: BackupPoints, exports: Exports | None = None):
        self.pools, self.points, self.exports = pools, points, exports

    def prepare(self, spec: RestoreSpec) -> Claim:
        _, m = _manifest(self.points, spec.backup_point_uuid, spec.backup_uuid)
        pool = self.pools.get(spec.pool_uuid)
        vol = check_uuid(spec.volume_uuid, "volume_uuid")
        if spec.instant:
            instant.check(spec, pool, self.exports)
        if spec.in_place:
            capacity = pool.volume_info(vol).capacity  # NOT_FOUND when it does not exist
            if capacity < m.size:
                raise RestoreTooSmall(
                    f"volume_uuid: volume {vol} has {capacity} bytes, the backup {m.size}", field="volume_uuid"
                )
            return Claim(volume_resource(spec.pool_uuid, vol), LockMode.EXCLUSIVE)
        check_name(spec.name, "name")
        if pool.volume_exists(vol):
            raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {spec.pool_uuid}", field="volume_uuid")
        if any(v.name == spec.name for v in pool.list_volumes()):
            raise AlreadyExists(f"name: a volume named {spec.name!r} exists in pool {spec.pool_uuid}", field="name")
        return Claim(volume_resource(spec.pool_uuid, vol), LockMode.EXCLUSIVE)

    def run(self, spec: RestoreSpec, ctx) -> RestoreResult:
        repo, m = _manifest(self.points, spec.backup_point_uuid, spec.backup_uuid)
        pool = self.pools.get(spec.pool_uuid)
        if spec.in_place:
            return self._in_place(spec, repo, m, pool, ctx)
        if spec.instant:
            assert self.exports is not None  # prepare() checked
            done = instant.restore(spec, m, pool, self.exports, ctx)
            i = done.info
            return RestoreResult(
                spec.pool_uuid, i.uuid, i.access_path, i.capacity, done.digest, 0, instant_copy=done.how
            )
        target = pool.open_restore_target(spec.volume_uuid, spec.name, m.size, ctx.job_id)
        write = _CountingWriter(target)
        try:
            digest = restore_mod.restore(repo, m, write, ctx=ctx, concurrent=target.concurrent)
            _check_digest(m, digest)
            ctx.checkpoint()
            ctx.progress(phase="committing")
        except BaseException:
            target.abort()  # never a half-written volume that looks complete
            raise
        info = target.commit()
        return RestoreResult(spec.pool_uuid, info.uuid, info.access_path, info.capacity, digest, write.written)

    def _in_place(self, spec: RestoreSpec, repo, m, pool, ctx) -> RestoreResult:
        """Safety snapshot, then overwrite (data, zero chunks, and the tail
        beyond the backup's size); on any failure, back to the snapshot,
        which stays; after success it is deleted unless the spec keeps it."""
        vol = spec.volume_uuid
        capacity = pool.volume_info(vol).capacity
        if capacity < m.size:
            raise RestoreTooSmall(
                f"volume_uuid: volume {vol} has {capacity} bytes, the backup {m.size}", field="volume_uuid"
            )
        pool.check_not_in_use(vol)  # before anything changes: a VM's disk is never overwritten
        safety = str(uuid.uuid4())
        pool.create_snapshot(
            vol,
            safety,
            f"pre-restore-{ctx.job_id[:24]}",
            description=f"the volume before backup {m.backup_id} was restored into it",
        )
        try:
            target = pool.open_overwrite_target(vol)
            write = _CountingWriter(target)
            try:
                digest = restore_mod.restore(repo, m, write, ctx=ctx, zero=target.zero)
                if capacity > m.size:
                    target.zero(m.size, capacity - m.size)
                _check_digest(m, digest)
                ctx.checkpoint()
                ctx.progress(phase="committing")
                info = target.commit()
            except BaseException:
                target.abort()
                raise
        except BaseException:
            try:
                pool.rollback_snapshot(vol, safety)  # the volume as it was: never half restored
            except Exception:  # noqa: BLE001 - say so loudly; the snapshot stays for the operator
                log.exception(
                    "restore in place failed and the rollback too", extra={"volume": vol, "safety_snapshot": safety}
                )
            raise
        deleted = False
        if not spec.keep_safety_snapshot:
            try:  # the restore is good: the way back is not needed, and they would pile up
                pool.delete_snapshot(vol, safety)
                deleted = True
            except Exception:  # noqa: BLE001 - the restore stands; the snapshot stays, named in the result
                log.warning(
                    "restore in place succeeded; its safety snapshot could not be deleted",
                    exc_info=True,
                    extra={"volume": vol, "safety_snapshot": safety},
                )
        return RestoreResult(
            spec.pool_uuid,
            info.uuid,
            info.access_path,
            info.capacity,
            digest,
            write.written,
            "" if deleted else safety,
            deleted,
        )


class VerifyKind(JobKind):
    """A backup, or the whole repository. Damage fails the job with
    DATA_CORRUPT naming every damaged item; the job's result lists them
    all, with the backups they make unrestorable."""

    name = "verify"
    spec_type = VerifySpec
    result_type = VerifyResult

    def __init__(self, points: BackupPoints):
        self.points = points

    def prepare(self, spec: VerifySpec) -> Claim:
        if spec.repository:
            if spec.backup_uuid:
                raise InvalidArgument(
                    "backup_uuid: must be empty when the whole repository is verified", field="backup_uuid"
                )
            self.points.get(spec.backup_point_uuid).repository()
            return Claim(backup_point_resource(spec.backup_point_uuid), LockMode.SHARED)
        _manifest(self.points, spec.backup_point_uuid, spec.backup_uuid)
        return Claim(f"{backup_point_resource(spec.backup_point_uuid)}/{spec.backup_uuid}", LockMode.SHARED)

    def run(self, spec: VerifySpec, ctx) -> VerifyResult:
        if spec.repository:
            repo = self.points.get(spec.backup_point_uuid).repository()
            r = verify_mod.verify_repository(repo, deep=spec.deep, ctx=ctx)
        else:
            repo, m = _manifest(self.points, spec.backup_point_uuid, spec.backup_uuid)
            r = verify_mod.verify(repo, m, deep=spec.deep, ctx=ctx)
        if r.damage:
            log.error(
                "verify found damage",
                extra={"backup_point": spec.backup_point_uuid, "damage": [d.describe() for d in r.damage]},
            )
            raise DataCorrupt(f"backup point {spec.backup_point_uuid}: {r.summary()}", field="backup_uuid", result=r)
        return r


class GcKind(JobKind):
    name = "gc"
    spec_type = GcSpec
    result_type = GcResult

    def __init__(self, points: BackupPoints):
        self.points = points

    def prepare(self, spec: GcSpec) -> Claim:
        self.points.get(spec.backup_point_uuid).repository()
        return Claim(backup_point_resource(spec.backup_point_uuid), LockMode.EXCLUSIVE)

    def run(self, spec: GcSpec, ctx) -> GcResult:
        repo = self.points.get(spec.backup_point_uuid).repository()
        if spec.wait_seconds:
            ctx.progress(0, 0, "waiting for the repository")
        return gc_mod.gc(repo, ctx=ctx, lock_timeout=max(0, spec.wait_seconds))
