"""The vm_backup job kind: a libvirt VM's disks backed up live, at one
instant, through libvirt's pull backup (docs/live.md).

One libvirt backup job covers every disk named: the guest is frozen through
libvirt for the instant the job begins (when a guest agent runs), libvirt
creates the next checkpoint at that same instant, and each disk's point in
time is read over NBD into the backup point's repository, incrementally
from the checkpoint its parent backup made (libvirt exports the dirty
bitmap since then). When the checkpoint a parent names is gone, or libvirt
cannot use its bitmap (qemu was killed), the disk is read whole and its
backup says why (mode "fallback"). After a successful run the older
checkpoints this agent made for the same backup point are deleted: only the
newest is needed by the next incremental, and every checkpoint keeps a
bitmap recording the guest's writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid as uuidlib
from contextlib import ExitStack
from dataclasses import dataclass, fields

from agent.backup_points import BackupPoints
from agent.errors import AlreadyExists, FailedPrecondition, HypervisorError, InvalidArgument
from agent.hypervisor.holders import holders
from agent.hypervisor.libvirt import CHECKPOINT_PREFIX, LibvirtVm
from agent.jobs.kinds import Claim, JobKind
from agent.jobs.locks import LockMode
from agent.kinds.backups import BackupResult, result_of
from agent.pools import PoolRegistry
from agent.repo import backup as backup_mod
from agent.repo.catalog import latest_for_volume
from agent.volumes.base import check_name, check_uuid
from agent.volumes.pull import PullSource

log = logging.getLogger("agent.backup")


@dataclass(frozen=True)
class VmBackupDisk:
    pool_uuid: str
    volume_uuid: str
    backup_uuid: str  # the new backup's id, chosen by the caller
    parent_backup_uuid: str = ""  # "": the volume's latest backup on this point, if any


def _disk(d) -> VmBackupDisk:
    if isinstance(d, VmBackupDisk):
        return d
    if isinstance(d, dict):  # from the journal
        return VmBackupDisk(**d)
    return VmBackupDisk(**{f.name: getattr(d, f.name) for f in fields(VmBackupDisk)})  # from protobuf


@dataclass(frozen=True)
class VmBackupSpec:
    backup_point_uuid: str
    disks: tuple[VmBackupDisk, ...]  # volumes of one running VM
    name: str = ""
    description: str = ""
    tenant: str = ""
    full: bool = False  # read every disk whole even when parents exist
    no_freeze: bool = False  # crash-consistent: do not ask the guest agent
    bandwidth_limit: int = 0  # bytes per second for this job alone (a policy's limit); 0: none

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(_disk(d) for d in self.disks))


@dataclass(frozen=True)
class VmBackupResult:
    vm: str  # the libvirt domain's name
    vm_uuid: str
    consistency: str  # application or crash
    reason: str  # why it is crash-consistent
    frozen_ms: float
    checkpoint: str  # the checkpoint made with this backup (libvirt's name)
    backups: tuple[BackupResult, ...]
    pruned_checkpoints: tuple[str, ...]
    vm_definition: str = ""  # the domain XML

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "backups", tuple(b if isinstance(b, BackupResult) else BackupResult(**b) for b in self.backups)
        )
        object.__setattr__(self, "pruned_checkpoints", tuple(self.pruned_checkpoints))


def _description(bp_uuid: str) -> str:
    return f"blockferry backup point {bp_uuid}"


class VmBackupKind(JobKind):
    name = "vm_backup"
    spec_type = VmBackupSpec
    result_type = VmBackupResult

    def __init__(self, pools: PoolRegistry, points: BackupPoints, work_dir: str, freeze_timeout: float = 10.0):
        self.pools, self.points = pools, points
        self.work_dir = work_dir
        self.freeze_timeout = freeze_timeout

    # ---- which VM ----

    def _libvirt(self):
        lv = self.pools.hypervisor.libvirt
        if lv is None:
            raise FailedPrecondition(
                "disks: a vm_backup job needs libvirt: set [vms] libvirt_uri in the agent's config", field="disks"
            )
        return lv

    def _device(self, vm: LibvirtVm, pool_uuid: str, volume_uuid: str) -> str | None:
        driver = self.pools.get(pool_uuid)
        if driver.kind == "rbd":
            d = vm.rbd_disk(driver.rbd_pool, driver.namespace, volume_uuid)
        else:
            d = vm.disk_of(driver.head_path(volume_uuid))
        return d.device if d else None

    def _vm(self, spec: VmBackupSpec) -> tuple[LibvirtVm, dict[str, str]]:
        """The one libvirt domain running all the disks, and each volume's device."""
        lv = self._libvirt()
        first = spec.disks[0]
        driver = self.pools.get(first.pool_uuid)
        if driver.kind == "rbd":
            vm = lv.rbd_holder(driver.rbd_pool, driver.namespace, first.volume_uuid)
        else:
            vm = lv.holder(driver.head_path(first.volume_uuid))
        if vm is None:
            raise FailedPrecondition(
                f"disks[0]: no running libvirt domain of {lv.uri} has volume {first.volume_uuid} as a disk; "
                "back up a snapshot of it instead",
                field="disks",
            )
        devices = {}
        for i, d in enumerate(spec.disks):
            dev = self._device(vm, d.pool_uuid, d.volume_uuid)
            if dev is None:
                raise FailedPrecondition(
                    f"disks[{i}]: volume {d.volume_uuid} is no disk of libvirt domain {vm.name}, "
                    f"which runs volume {first.volume_uuid}: one job backs up the disks of one VM",
                    field="disks",
                )
            if vm.disk_format(dev) != "qcow2":  # libvirt 9 refuses a checkpoint of any other format
                raise FailedPrecondition(
                    f"disks[{i}]: disk {dev} of libvirt domain {vm.name} is {vm.disk_format(dev)}, and libvirt "
                    "checkpoints only qcow2 disks: take a snapshot set of it instead (CreateSnapshotSet; RBD "
                    "images are snapshotted by Ceph while the VM runs)",
                    field="disks",
                )
            devices[d.volume_uuid] = dev
        return vm, devices

    # ---- the kind ----

    def prepare(self, spec: VmBackupSpec) -> Claim:
        if not spec.disks:
            raise InvalidArgument("disks: name at least one volume of the VM", field="disks")
        repo = self.points.get(spec.backup_point_uuid).repository()
        seen = set()
        for i, d in enumerate(spec.disks):
            self.pools.get(d.pool_uuid)
            check_uuid(d.volume_uuid, f"disks[{i}].volume_uuid")
            check_uuid(d.backup_uuid, f"disks[{i}].backup_uuid")
            if d.volume_uuid in seen or d.backup_uuid in seen:
                raise InvalidArgument(f"disks[{i}]: volume or backup uuid named twice", field="disks")
            seen |= {d.volume_uuid, d.backup_uuid}
            if repo.has_backup(d.backup_uuid):
                raise AlreadyExists(
                    f"disks[{i}].backup_uuid: backup {d.backup_uuid} exists on backup point {spec.backup_point_uuid}",
                    field="backup_uuid",
                )
            if d.parent_backup_uuid:
                parent = repo.manifest(check_uuid(d.parent_backup_uuid, f"disks[{i}].parent_backup_uuid"))
                if parent.volume_uuid != d.volume_uuid:
                    raise InvalidArgument(
                        f"disks[{i}].parent_backup_uuid: backup {parent.backup_id} is of volume "
                        f"{parent.volume_uuid}, not {d.volume_uuid}",
                        field="parent_backup_uuid",
                    )
        if spec.name:
            check_name(spec.name, "name")
        vm, _ = self._vm(spec)
        vm_uuid = vm.summary().uuid
        # libvirt runs one backup job per domain at a time.
        return Claim(f"vm:{vm_uuid}", LockMode.EXCLUSIVE)

    def run(self, spec: VmBackupSpec, ctx) -> VmBackupResult:
        vm, devices = self._vm(spec)
        repo = self.points.get(spec.backup_point_uuid).repository()
        ours = {n for n, desc, _ in vm.checkpoints() if desc == _description(spec.backup_point_uuid)}
        parents, since, lost = {}, {}, {}
        for d in spec.disks:
            dev = devices[d.volume_uuid]
            parent = None
            if d.parent_backup_uuid:
                parent = repo.manifest(d.parent_backup_uuid)
            elif not spec.full:
                parent = latest_for_volume(repo, d.volume_uuid)
            parents[d.volume_uuid] = parent
            wanted = CHECKPOINT_PREFIX + parent.snapshot_uuid if parent is not None and not spec.full else ""
            since[dev] = wanted if wanted in ours else ""
            if wanted and wanted not in ours:
                lost[dev] = (
                    f"libvirt domain {vm.name} has no checkpoint {wanted} of this backup point "
                    "(the parent backup was not taken live, or the checkpoint was deleted)"
                )
        vm_uuid = vm.summary().uuid
        checkpoint_uuid = str(uuidlib.uuid4())
        checkpoint = CHECKPOINT_PREFIX + checkpoint_uuid
        work = self._work_dir(vm, spec)
        definition = vm.definition()
        try:
            ctx.progress(phase="beginning libvirt's pull backup")
            with ExitStack() as stack:
                with vm.frozen(timeout=self.freeze_timeout, wanted=not spec.no_freeze) as fr:
                    exports = self._begin(vm, stack, since, lost, checkpoint, spec.backup_point_uuid, work)
                log.info(
                    "libvirt pull backup begun",
                    extra={"vm": vm.name, "checkpoint": checkpoint, "consistency": fr.consistency},
                )
                results = []
                for d in spec.disks:
                    ctx.checkpoint()
                    ex = exports[devices[d.volume_uuid]]
                    source = PullSource(
                        d.pool_uuid,
                        d.volume_uuid,
                        socket=ex.socket,
                        export=ex.export,
                        bitmap=ex.bitmap,
                        since=ex.since[len(CHECKPOINT_PREFIX) :],
                        lost=lost.get(ex.device, ""),
                        vm_definition=definition,
                        checkpoint=checkpoint_uuid,
                        vm=vm.name,
                        consistency=fr.consistency,
                    )
                    m = backup_mod.backup(
                        source,
                        d.volume_uuid,
                        checkpoint_uuid,
                        repo,
                        parent=parents[d.volume_uuid],
                        full=spec.full,
                        backup_id=d.backup_uuid,
                        name=spec.name,
                        description=spec.description,
                        tenant=spec.tenant,
                        ctx=ctx,
                        lock=self.points.get(spec.backup_point_uuid).lock_for(),
                    )
                    results.append(result_of(m, fr.consistency))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        pruned = self._prune(vm, spec.backup_point_uuid, checkpoint)
        return VmBackupResult(
            vm.name,
            vm_uuid,
            fr.consistency,
            fr.reason,
            round(fr.frozen_ms, 1),
            checkpoint,
            tuple(results),
            tuple(pruned),
            definition,
        )

    def _begin(self, vm: LibvirtVm, stack: ExitStack, since: dict, lost: dict, checkpoint: str, bp: str, work: str):
        """Begin the pull backup; when libvirt cannot begin it incremental
        (qemu was killed and never stored a checkpoint's bitmap), begin it
        reading every disk whole, and say why in `lost` (device -> reason).
        The unusable checkpoints go with the older ones after a success."""
        try:
            return stack.enter_context(vm.pull_backup(since, checkpoint, _description(bp), work))
        except HypervisorError as e:
            if not any(since.values()):
                raise
            log.warning(
                "libvirt could not begin an incremental backup: reading every disk whole",
                extra={"vm": vm.name, "error": e.message},
            )
            exports = stack.enter_context(vm.pull_backup(dict.fromkeys(since, ""), checkpoint, _description(bp), work))
            for dev, name in since.items():
                if name:
                    lost[dev] = f"libvirt could not count changes from checkpoint {name}: {e.message}"
            return exports

    def _work_dir(self, vm: LibvirtVm, spec: VmBackupSpec) -> str:
        """A private directory for the NBD socket and scratch files, owned
        by the user the VM's qemu runs as (qemu creates the socket)."""
        os.makedirs(self.work_dir, mode=0o755, exist_ok=True)
        work = tempfile.mkdtemp(prefix="pull-", dir=self.work_dir)
        uid = gid = -1
        for d in vm.disks():
            if d.file and os.path.exists(d.file):
                for h in holders(d.file):
                    st = os.stat(f"/proc/{h.pid}")
                    uid, gid = st.st_uid, st.st_gid
                    break
            if uid != -1:
                break
        if uid not in (-1, os.getuid()):
            os.chown(work, uid, gid)
        return work

    def _prune(self, vm: LibvirtVm, bp: str, newest: str) -> list[str]:
        """Delete the older checkpoints this agent made for this backup
        point, oldest first; a failure is logged (the next run tries again)."""
        pruned = []
        for name, desc, _ in vm.checkpoints():
            if name == newest or desc != _description(bp):
                continue
            try:
                vm.delete_checkpoint(name)
                pruned.append(name)
            except HypervisorError as e:
                log.warning("an old checkpoint could not be deleted", extra={"vm": vm.name, "error": e.message})
        return pruned
