"""The qcow2 volume driver: volumes in a directory pool, with real qemu-img
and qemu-nbd.

Snapshots are an external overlay chain, not internal qcow2 snapshots:
a linked clone must be an overlay on a snapshot, and an overlay can only
name a file as its backing, never an internal snapshot; and qemu-img refuses
to apply internal snapshots while persistent dirty bitmaps are enabled. So:

    <root>/pool-<pool>/volume/<vol>             the live state ("head"), an overlay
    <root>/pool-<pool>/snapshot/<vol>/<snap>    each snapshot's frozen layer
    <root>/pool-<pool>/meta/<vol>.json          the snapshot tree, clones, tracking
    <root>/pool-<pool>/locks/<vol>.lock         a POSIX record lock around metadata changes, so
                                                agents sharing the pool's storage take turns
                                                (NFS pools: lock objects locks/<vol>/<id>)

- Snapshot: the head file is renamed to the snapshot's layer (its content is
  then frozen) and a new empty head is created on top of it.
- Rollback: a new empty head on the snapshot's layer replaces the head.
  Snapshots taken after it stay, as another branch of the tree.
- Deleting a snapshot: each child layer (child snapshots, the head) is rebased
  in safe mode onto the deleted layer's parent, which copies in exactly the
  data the child still needs, so every other snapshot keeps its content.
- Linked clone: a new volume whose head is an overlay on the snapshot's layer
  (constant time). Flatten rebases the clone onto nothing.

Backing files are named by absolute path: files are renamed between
directories, and a pool is mounted at the same path on every host.

The same driver serves NFS pools (kind "nfs"): every file is named by the
nfs://server/export/... URL that qemu's nfs block driver opens, backing files
too, and the driver's own file operations go through libnfs
(agent.volumes.qcow2.poolfs), so the host needs no NFS mount. Snapshot reads and
restores of NFS pools go through qemu-nbd (the direct readers and writers of
direct.py need host files).

Change tracking: every layer gets a persistent dirty bitmap `bf-dirty` when
it is created; it is disabled when the layer is frozen by a snapshot. The
changes between snapshot A and a later snapshot B are the union of the
bitmaps of the layers on the tree path (A, B]. A bitmap left inconsistent
(qemu-nbd killed) is removed at the next snapshot and that layer is marked
"tracking lost"; asking for changes across it raises TrackingLost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext

from agent import native
from agent.errors import (
    AlreadyExists,
    BlockferryError,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    NotFound,
    StorageIOError,
    TargetUnreachable,
    TrackingLost,
)
from agent.extents import AllocExtent, Extent, merge_extents
from agent.hypervisor.base import ChainNode, Hypervisor, LiveLayer, RunningVm
from agent.hypervisor.freeze import OFFLINE, Freeze, vm_definition
from agent.hypervisor.holders import holders
from agent.hypervisor.qemu import QemuHypervisor
from agent.paths import resolve_under_roots
from agent.volumes.base import (
    HEAD,
    ChangedExtents,
    PoolStatus,
    RestoreTarget,
    SetInstant,
    SnapshotInfo,
    SnapshotRequest,
    SnapshotSet,
    SnapshotTree,
    VolumeDriver,
    VolumeInfo,
    build_tree,
    check_capacity,
    check_name,
    check_uuid,
)
from agent.volumes.nbd import REQUEST_SIZE as NBD_REQUEST
from agent.volumes.nbd import AsyncWriter, NbdSnapshotReader, QemuNbd
from agent.volumes.qcow2 import qemu_img
from agent.volumes.qcow2.bitmap import dirty_extents
from agent.volumes.qcow2.direct import DirectRestoreTarget, open_mapped
from agent.volumes.qcow2.meta import TRACKING_LOST, TRACKING_OK, SnapMeta, VolMeta, load, save
from agent.volumes.qcow2.poolfs import LocalFiles, PoolFiles

log = logging.getLogger("agent.qcow2")
ZERO_RUN = 64 << 10  # zero runs of this size are not written into a new image
# Restores up to this capacity write into preallocated metadata (L2 tables:
# 128 MiB per TiB of capacity, written at creation).
DIRECT_RESTORE_MAX = 1 << 40

BITMAP = "bf-dirty"
GRANULARITY = 65536


def freeze_tracking(path: str) -> str:
    """Disable a layer's bitmap as it becomes a snapshot; an inconsistent
    or missing bitmap is removed and the layer is marked lost. path: a file,
    or a json: image name (a shared pool's slice)."""
    bm = qemu_img.info(path).bitmap(BITMAP)
    if bm is None:
        return TRACKING_LOST
    if not bm.consistent:
        log.warning(
            "dirty bitmap inconsistent (qemu-nbd or qemu was killed?); change tracking lost for this layer",
            extra={"path": path},
        )
        qemu_img.bitmap(path, "remove", BITMAP)
        return TRACKING_LOST
    qemu_img.bitmap(path, "disable", BITMAP)
    return TRACKING_OK


def _disk_usage(fs: PoolFiles, path: str) -> int:
    try:
        return fs.disk_usage(path)
    except FileNotFoundError:
        return 0


LEFTOVER_AGE = 600.0  # seconds without a write before a temporary file counts as abandoned


class Qcow2Pool(VolumeDriver):
    kind = "dir"

    def __init__(
        self,
        pool_uuid: str,
        root: str,
        *,
        run_dir: str,
        allowed_roots: list[str],
        lookup: Callable[[str], Qcow2Pool] | None = None,
        fs: PoolFiles | None = None,
        hypervisor: Hypervisor | None = None,
    ):
        """root: the pool's directory, or with fs=NfsFiles the export's URL;
        hypervisor: who to ask about a running VM that holds a volume (by
        default the QMP adapter, for local files)."""
        self.pool_uuid = check_uuid(pool_uuid, "pool_uuid")
        self.lookup = lookup or (lambda pool: self)  # other pools, for clones across pools
        self.fs = fs or LocalFiles()
        self.kind = "dir" if self.fs.local else "nfs"
        self.hypervisor = hypervisor or (QemuHypervisor() if self.fs.local else None)
        self.root = os.path.realpath(root) if self.fs.local else root.rstrip("/")
        self.base = os.path.join(self.root, f"pool-{self.pool_uuid}")
        self.run_dir = run_dir
        self.allowed_roots = allowed_roots
        self._prepared = False
        try:
            self._prepare()
        except TargetUnreachable as e:
            if self.fs.local:
                raise
            # an NFS server down while the agent starts: the pool is served
            # (and reported unreachable); it is prepared at its first use
            log.warning(
                "pool storage does not answer; preparing it at first use",
                extra={"pool": self.pool_uuid, "error": e.message},
            )

    def _prepare(self) -> None:
        """The pool's directories, and the sweep of what a crash left."""
        if self._prepared:
            return
        for sub in ("volume", "snapshot", "meta", "locks"):
            self.fs.makedirs(os.path.join(self.base, sub))
        self._prepared = True
        self._remove_leftovers()

    @contextmanager
    def _locked(self, vol: str):
        """Serialise changes of one volume's metadata: between this agent's
        threads (the base class), and between agents that share the pool's
        storage (PoolFiles.lock: a POSIX record lock on <pool>/locks/<vol>.lock,
        or a lock object on NFS), taken by the outermost holder only (closing
        any descriptor of a file drops all of a process's POSIX locks on it)."""
        with super()._locked(vol):
            self._prepare()
            held = self.__dict__.setdefault("_flocks", {})
            if vol in held:  # nested: this thread holds it already
                held[vol] += 1
                try:
                    yield
                finally:
                    held[vol] -= 1
                return
            with self.fs.lock(
                os.path.join(self.base, "locks"),
                vol,
                f"volume {vol} metadata",
                drop=lambda: not self.fs.exists(self.meta_path(vol)),
            ):
                held[vol] = 1
                try:
                    yield
                finally:
                    del held[vol]

    def _remove_leftovers(self) -> None:
        """Temporary files of operations a crash interrupted (a half-made
        copy or layer) never became visible; remove them. Only those nobody
        wrote for LEFTOVER_AGE seconds: on shared storage another agent may
        be writing a fresh one right now (a younger leftover goes at a later
        start). A half-done snapshot is repaired under the volume's lock,
        which an agent making a snapshot holds."""
        now = time.time()
        for sub in ("volume", "snapshot"):
            for path in self.fs.walk_files(os.path.join(self.base, sub)):
                f = os.path.basename(path)
                if f.startswith(".") and (f.endswith(".copy") or f.endswith(".new")):
                    try:
                        if now - self.fs.mtime(path) < LEFTOVER_AGE:
                            continue
                        log.warning("removing leftover of an interrupted operation", extra={"path": path})
                        self.fs.unlink(path)
                    except FileNotFoundError:
                        continue
        for f in self.fs.listdir(os.path.join(self.base, "meta")):
            if f.endswith(".json"):
                with self._locked(f[:-5]):
                    self._repair_interrupted_snapshot(f[:-5])

    def _repair_interrupted_snapshot(self, vol: str) -> None:
        """A crash between renaming the head to a snapshot layer and writing
        the metadata leaves no head and one layer the metadata does not know:
        that layer is the live state; put it back."""
        try:
            meta = load(self.fs, self.meta_path(vol))
        except (OSError, ValueError, StorageIOError):
            return
        head = self.head_path(vol)
        if self.fs.exists(head) or not self.fs.isdir(self.snap_dir(vol)):
            return
        known = {s.uuid for s in meta.snapshots}
        orphans = [f for f in self.fs.listdir(self.snap_dir(vol)) if not f.startswith(".") and f not in known]
        if len(orphans) != 1:
            log.error(
                "volume has no live state and cannot be repaired automatically",
                extra={"volume": vol, "unknown_layers": len(orphans)},
            )
            return
        self.fs.rename(self.snap_path(vol, orphans[0]), head)
        bm = qemu_img.info(head).bitmap(BITMAP)
        if bm is not None and bm.consistent and not bm.enabled:
            qemu_img.bitmap(head, "enable", BITMAP)
        log.warning("repaired a snapshot interrupted by a crash: the live state is back", extra={"volume": vol})

    # ---- paths ----

    def head_path(self, vol: str) -> str:
        return os.path.join(self.base, "volume", vol)

    def snap_dir(self, vol: str) -> str:
        return os.path.join(self.base, "snapshot", vol)

    def snap_path(self, vol: str, snap: str) -> str:
        return os.path.join(self.snap_dir(vol), snap)

    def meta_path(self, vol: str) -> str:
        return os.path.join(self.base, "meta", f"{vol}.json")

    def _meta(self, vol: str) -> VolMeta:
        vol = check_uuid(vol, "volume_uuid")
        try:
            return load(self.fs, self.meta_path(vol))
        except FileNotFoundError:
            raise NotFound(f"volume_uuid: no volume {vol} in pool {self.pool_uuid}", field="volume_uuid") from None

    def _save(self, meta: VolMeta) -> None:
        save(self.fs, self.meta_path(meta.uuid), meta)

    def _snap(self, meta: VolMeta, snap: str) -> SnapMeta:
        return meta.snap(check_uuid(snap, "snapshot_uuid"))

    def layer_path(self, meta: VolMeta, snap: str | None) -> str:
        """The file whose chain shows a snapshot (or the live state for None)."""
        return self.head_path(meta.uuid) if snap is None else self.snap_path(meta.uuid, snap)

    def _backing_of(self, meta: VolMeta, snap: str | None) -> tuple[str | None, str]:
        """(file, format) a layer sitting on snapshot `snap` (None: the bottom) has as backing."""
        if snap is not None:
            return self.snap_path(meta.uuid, snap), "qcow2"
        if meta.parent_file:
            return meta.parent_file, "qcow2"
        if meta.base_file:
            return meta.base_file, meta.base_format or "raw"
        return None, "qcow2"

    # ---- layers and bitmaps ----

    def _new_layer(self, path: str, capacity: int, backing: str | None, backing_format: str) -> None:
        """Create a qcow2 layer with an enabled dirty bitmap, atomically at path."""
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.new")
        if self.fs.exists(tmp):
            self.fs.unlink(tmp)
        qemu_img.create(tmp, capacity, backing=backing, backing_format=backing_format)
        qemu_img.bitmap(tmp, "add", BITMAP)
        self.fs.rename(tmp, path)

    def _head_tracking(self, meta: VolMeta, info: qemu_img.ImageInfo) -> str:
        """Whether the live state's changes are tracked, from the head's info."""
        if meta.head_tracking != TRACKING_OK:
            return TRACKING_LOST
        bm = info.bitmap(BITMAP)
        return TRACKING_OK if bm is not None and bm.consistent else TRACKING_LOST

    # ---- volumes ----

    def create_volume(
        self, volume_uuid: str, name: str, capacity: int | None, backing_file: str | None = None
    ) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        with self._locked(vol):
            if self.fs.exists(self.meta_path(vol)):
                raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
            meta = VolMeta(uuid=vol, name=name, created_at=time.time())
            if backing_file and not self.fs.local:
                raise InvalidArgument(
                    f"backing_file: pool {self.pool_uuid} is on NFS, where a file of one host "
                    "cannot be the base of a volume; import it with a full copy instead",
                    field="backing_file",
                )
            if backing_file:
                real = resolve_under_roots(backing_file, self.allowed_roots, "backing_file")
                if not os.path.isfile(real):
                    raise NotFound(f"backing_file: {backing_file!r} is not an existing file", field="backing_file")
                info = qemu_img.info(real)
                if info.format not in ("qcow2", "raw"):
                    raise InvalidArgument(
                        f"backing_file: format {info.format!r} is not qcow2 or raw", field="backing_file"
                    )
                if capacity is None or capacity == 0:
                    capacity = info.virtual_size
                elif capacity < info.virtual_size:
                    raise InvalidArgument(
                        f"capacity: {capacity} is smaller than backing_file ({info.virtual_size} bytes)",
                        field="capacity",
                    )
                meta.base_file, meta.base_format = real, info.format
            elif capacity is None:
                raise InvalidArgument("capacity: required when no backing_file is given", field="capacity")
            check_capacity(capacity)
            backing, fmt = self._backing_of(meta, None)
            self._new_layer(self.head_path(vol), capacity, backing, fmt)
            self._save(meta)
            log.info("volume created", extra={"pool": self.pool_uuid, "volume": vol, "capacity": capacity})
            return self._info(meta)

    def delete_volume(self, volume_uuid: str, force: bool = False) -> None:
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            clones = meta.clones_blocking_delete(force)
            qemu_img.ensure_not_in_use(self.head_path(meta.uuid))
        for clone in clones:  # force: keep the clones alive on their own
            pool, vol = clone.split("/")
            self.lookup(pool).flatten(vol)
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            if meta.parent_volume:
                self._forget_clone(meta)
            for path in [self.head_path(meta.uuid)] + [self.snap_path(meta.uuid, s.uuid) for s in meta.snapshots]:
                try:
                    self.fs.unlink(path)
                except FileNotFoundError:
                    pass
            try:
                self.fs.rmdir(self.snap_dir(meta.uuid))
            except FileNotFoundError:
                pass
            self.fs.unlink(self.meta_path(meta.uuid))
            log.info("volume deleted", extra={"pool": self.pool_uuid, "volume": meta.uuid, "force": force})

    def _forget_clone(self, meta: VolMeta) -> None:
        """Remove a linked clone from its origin snapshot's clone list."""
        origin_pool = self.lookup(meta.parent_pool or self.pool_uuid)
        key = f"{self.pool_uuid}/{meta.uuid}"
        with origin_pool._locked(meta.parent_volume):
            try:
                origin = origin_pool._meta(meta.parent_volume)
            except NotFound:
                return
            snap = origin.snapshot(meta.parent_snapshot)
            if snap and key in snap.clones:
                snap.clones.remove(key)
                origin_pool._save(origin)

    def volume_info(self, volume_uuid: str) -> VolumeInfo:
        return self._info(self._meta(volume_uuid))

    def _info(self, meta: VolMeta) -> VolumeInfo:
        head = self.head_path(meta.uuid)
        info = qemu_img.info(head)
        used = qemu_img.allocated_data(head)
        snap_bytes = sum(_disk_usage(self.fs, self.snap_path(meta.uuid, s.uuid)) for s in meta.snapshots)
        return VolumeInfo(
            uuid=meta.uuid,
            name=meta.name,
            pool_uuid=self.pool_uuid,
            capacity=info.virtual_size,
            used=used,
            snapshot_bytes=snap_bytes,
            access_path=head,
            created_at=meta.created_at,
            parent_volume=meta.parent_volume,
            parent_snapshot=meta.parent_snapshot,
            children=tuple(c.split("/")[1] for c in meta.linked_clones()),
            format="qcow2",
            tracking=self._head_tracking(meta, info),
        )

    def volume_uuids(self) -> list[str]:
        """The volumes of the pool, by their metadata files (no image is opened)."""
        self._prepare()
        return [f[:-5] for f in sorted(self.fs.listdir(os.path.join(self.base, "meta"))) if f.endswith(".json")]

    def list_volumes(self) -> list[VolumeInfo]:
        out = []
        for vol in self.volume_uuids():
            try:
                out.append(self.volume_info(vol))
            except (NotFound, InvalidArgument):
                continue
        return out

    def resize_volume(self, volume_uuid: str, capacity: int) -> VolumeInfo:
        check_capacity(capacity)
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            current = qemu_img.info(self.head_path(meta.uuid)).virtual_size
            if capacity < current:
                raise InvalidArgument(
                    f"capacity: shrinking from {current} to {capacity} bytes would lose "
                    "data; only growing is supported",
                    field="capacity",
                )
            if capacity > current:
                qemu_img.resize(self.head_path(meta.uuid), capacity)
            return self._info(meta)

    # ---- snapshots ----

    def create_snapshot(self, volume_uuid: str, snapshot_uuid: str, name: str, description: str = "") -> SnapshotInfo:
        request = SnapshotRequest(self.pool_uuid, volume_uuid, snapshot_uuid, name, description)
        return self.create_snapshot_set([request]).snapshots[0]

    def create_snapshot_set(
        self,
        requests: Sequence[SnapshotRequest],
        *,
        freeze: bool = True,
        freeze_timeout: float = 10.0,
        within: SetInstant | None = None,
    ) -> SnapshotSet:
        """Snapshots of volumes of this host's qcow2 pools at one point in
        time. The disks a running VM holds switch to new layers in one QMP
        transaction, inside a guest freeze when the VM's guest agent answers
        (else crash-consistent, and the set says why); idle volumes of the
        set are snapshotted just before, and put back if the switch fails.
        Volumes of two different running VMs are refused: a set is one VM's.
        within: the VM is the caller's (frozen and paused by it), and every
        volume a process holds must be one of its disks."""
        if not requests:
            raise InvalidArgument("snapshots: name at least one volume", field="snapshots")
        items = [self._set_item(i, r) for i, r in enumerate(requests)]
        if len({(it.pool.pool_uuid, it.meta_uuid) for it in items}) != len(items):
            raise InvalidArgument("snapshots: a volume is named twice", field="snapshots")
        with ExitStack() as stack:
            for it in sorted(items, key=lambda it: (it.pool.pool_uuid, it.meta_uuid)):
                stack.enter_context(it.pool._locked(it.meta_uuid))
            vm: RunningVm | None = within.vm if within is not None else None
            for it in items:
                it.prepare()
                if vm is not None and vm.disk_of(it.head) is not None:
                    it.vm = vm  # asked on the connection open already: a monitor serves one client
                    continue
                if within is not None:
                    qemu_img.ensure_not_in_use(it.head)  # idle, or held by something that is not the VM
                    continue
                held = it.pool._running_vm(it.head)
                if held is None:
                    continue
                stack.callback(held.close)
                if vm is not None and held.ident != vm.ident:
                    raise InvalidArgument(
                        f"snapshots[{it.index}]: volume {it.meta_uuid} is a disk of VM {held.name}, the others "
                        f"of VM {vm.name}: a set holds the disks of one VM",
                        field=f"snapshots[{it.index}]",
                    )
                vm = vm or held
                it.vm = held
            live = [it for it in items if it.vm is not None]
            idle = [it for it in items if it.vm is None]
            done: list[_SetItem] = []
            if vm is None or (within is not None and not live):
                try:
                    for it in idle:
                        it.tracking = it.pool._offline_switch(it.head, it.layer)
                        done.append(it)
                except BaseException:  # all or none: put back the ones switched
                    for it in done:
                        it.pool._offline_undo(it.head, it.layer)
                    raise
                return self._finish_set(items, "", OFFLINE, "", 0.0, 0.0)
            try:
                layers = [it.pool._live_prepare(vm, it) for it in live]
                for it in idle:
                    it.tracking = it.pool._offline_switch(it.head, it.layer)
                    done.append(it)
                frozen = (
                    vm.frozen(timeout=freeze_timeout, wanted=freeze)
                    if within is None
                    else nullcontext(Freeze(within.consistency))
                )
                with frozen as fr:
                    started = time.monotonic()
                    vm.add_layers(layers)
                    switch_ms = (time.monotonic() - started) * 1000
            except BaseException:
                for it in live:
                    if it.tmp and it.pool.fs.exists(it.tmp):
                        it.pool.fs.unlink(it.tmp)
                for it in done:
                    it.pool._offline_undo(it.head, it.layer)
                raise
            for it in live:
                it.pool._live_rename(vm, it)
            definition = within.definition if within is not None else vm_definition(vm)
            return self._finish_set(items, vm.name, fr.consistency, fr.reason, fr.frozen_ms, switch_ms, definition)

    def _set_item(self, index: int, r: SnapshotRequest) -> _SetItem:
        pool = self.lookup(r.pool_uuid)
        if not isinstance(pool, Qcow2Pool):
            raise InvalidArgument(
                f"snapshots[{index}].pool_uuid: pool {r.pool_uuid} is not a qcow2 pool of this host",
                field=f"snapshots[{index}].pool_uuid",
            )
        snap = check_uuid(r.snapshot_uuid, "snapshot_uuid")
        check_name(r.name, "snapshot_name")
        if len(r.description) > 1024:
            raise InvalidArgument("desc: at most 1024 characters", field="desc")
        return _SetItem(index, pool, check_uuid(r.volume_uuid, "volume_uuid"), snap, r.name, r.description)

    def _finish_set(
        self,
        items: list[_SetItem],
        vm: str,
        consistency: str,
        reason: str,
        frozen_ms: float,
        switch_ms: float,
        definition: str = "",
    ) -> SnapshotSet:
        infos = []
        for it in items:
            pool, meta = it.pool, it.meta
            assert meta is not None
            tracking = it.tracking if meta.head_tracking == TRACKING_OK else TRACKING_LOST
            s = SnapMeta(
                uuid=it.snap,
                name=it.name,
                description=it.description,
                created_at=time.time(),
                parent=meta.head_parent,
                tracking=tracking,
                consistency=consistency,
                vm_definition=definition,
            )
            meta.snapshots.append(s)
            meta.head_parent = it.snap
            meta.head_tracking = TRACKING_OK
            pool._save(meta)
            log.info(
                "snapshot created",
                extra={
                    "volume": meta.uuid,
                    "snapshot": it.snap,
                    "tracking": tracking,
                    "vm": vm,
                    "consistency": consistency,
                },
            )
            infos.append(pool._snap_info(meta, s))
        if vm:
            log.info(
                "snapshot set of a running VM",
                extra={
                    "vm": vm,
                    "disks": len(items),
                    "consistency": consistency,
                    "reason": reason,
                    "frozen_ms": round(frozen_ms, 1),
                    "switch_ms": round(switch_ms, 1),
                },
            )
        return SnapshotSet(tuple(infos), consistency, vm, reason, frozen_ms, switch_ms, definition)

    def _offline_switch(self, head: str, layer: str) -> str:
        """An idle volume's snapshot: the head becomes the layer, a new head
        grows from it. Returns the layer's tracking."""
        capacity = qemu_img.info(head).virtual_size
        tracking = freeze_tracking(head)
        self.fs.rename(head, layer)
        try:
            self._new_layer(head, capacity, layer, "qcow2")
        except Exception:
            self.fs.rename(layer, head)  # put the live state back as it was
            raise
        return tracking

    def _offline_undo(self, head: str, layer: str) -> None:
        self.fs.unlink(head)
        self.fs.rename(layer, head)

    def _running_vm(self, path: str) -> RunningVm | None:
        """None when no process holds the image; the running VM that holds
        it; InUse, naming who holds it, when that is not a VM the agent can
        drive (a qemu-nbd, a qemu without a QMP socket, or a remote file)."""
        try:
            qemu_img.ensure_not_in_use(path)
            return None
        except InUse as e:
            if self.hypervisor is None:
                raise
            vm = self.hypervisor.holder(path)
            if vm is not None:
                return vm
            held = ", ".join(f"pid {h.pid} ({h.program})" for h in holders(path)) or "a process on another host"
            raise InUse(
                f"{e.message}; it is held by {held}, and no running VM with a QMP socket holds it",
                field=e.field,
            ) from None

    def _live_prepare(self, vm: RunningVm, it: _SetItem) -> LiveLayer:
        """The new head of a running VM's disk, created next to the old one:
        backed by the layer's path-to-be, with an empty bitmap."""
        disk = vm.disk_of(it.head)
        if disk is None:
            raise InUse(f"volume head {it.head} is no longer held by VM {vm.name}")
        it.tracking = TRACKING_OK if BITMAP in disk.bitmaps else TRACKING_LOST
        capacity = qemu_img.info(it.head, force_share=True).virtual_size
        it.tmp = os.path.join(os.path.dirname(it.head), f".{os.path.basename(it.head)}.new")
        if self.fs.exists(it.tmp):
            self.fs.unlink(it.tmp)
        qemu_img.create(it.tmp, capacity, backing=it.layer, backing_format="qcow2", unsafe=True)
        try:
            qemu_img.bitmap(it.tmp, "add", BITMAP)
        except BaseException:
            self.fs.unlink(it.tmp)
            raise
        return LiveLayer(disk, it.tmp, it.head, BITMAP if it.tracking == TRACKING_OK else "")

    def _live_rename(self, vm: RunningVm, it: _SetItem) -> None:
        """After qemu switched to the new head: the old head takes the
        layer's path and the new one the head's (qemu keeps its descriptors).
        Only now: qemu reopened the old top read-only during the switch, and
        a file node qemu made itself (a VM started with -drive) is reopened
        by its name."""
        try:
            self.fs.rename(it.head, it.layer)
            self.fs.rename(it.tmp, it.head)
        except OSError as e:  # the VM writes to tmp now: say where everything is
            log.critical(
                "live snapshot switched but its files were not renamed",
                extra={"vm": vm.name, "head": it.head, "live_file": it.tmp, "layer": it.layer, "error": str(e)},
            )
            raise StorageIOError(
                f"snapshot of {it.head}: VM {vm.name} now writes to {it.tmp}, but renaming the files failed: "
                f"{e.strerror or e}; rename them by hand ({it.head} to {it.layer}, then {it.tmp} to {it.head})"
            ) from None

    def _snap_info(self, meta: VolMeta, s: SnapMeta) -> SnapshotInfo:
        children = [c.uuid for c in meta.children_of(s.uuid)]
        if meta.head_parent == s.uuid:
            children.append(HEAD)
        return SnapshotInfo(
            uuid=s.uuid,
            name=s.name,
            volume_uuid=meta.uuid,
            description=s.description,
            created_at=s.created_at,
            size=_disk_usage(self.fs, self.snap_path(meta.uuid, s.uuid)),
            parent=s.parent,
            children=tuple(children),
            clones=tuple(c.split("/")[1] for c in s.clones),
            tracking=s.tracking,
            consistency=s.consistency,
            vm_definition=s.vm_definition,
        )

    def delete_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> None:
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            s = self._snap(meta, snapshot_uuid)
            s.check_no_clones()
            layer = self.snap_path(meta.uuid, s.uuid)
            new_backing, new_fmt = self._backing_of(meta, s.parent)
            children = [(c, self.snap_path(meta.uuid, c.uuid)) for c in meta.children_of(s.uuid)]
            if meta.head_parent == s.uuid:
                children.append((None, self.head_path(meta.uuid)))
            with ExitStack() as stack:
                vm = self._running_vm(self.head_path(meta.uuid))
                if vm is not None:
                    stack.enter_context(vm)
                    live = self._live_chain(vm, meta, s)
                    if live is not None:  # the child in the VM's chain: qemu merges it
                        merged = self._live_delete(vm, meta, s, *live, new_backing)
                        children = [(c, p) for c, p in children if p != merged]
                self._offline_delete(meta, s, layer, children, new_backing, new_fmt)
            if meta.head_parent == s.uuid:
                meta.head_parent = s.parent
            meta.snapshots.remove(s)
            self._save(meta)
            self.fs.unlink(layer)
            log.info(
                "snapshot deleted",
                extra={"volume": meta.uuid, "snapshot": s.uuid, "rebased": len(children), "live": vm is not None},
            )

    def _offline_delete(
        self,
        meta: VolMeta,
        s: SnapMeta,
        layer: str,
        children: list[tuple[SnapMeta | None, str]],
        new_backing: str | None,
        new_fmt: str,
    ) -> None:
        """Rebase the children no process holds onto the deleted layer's parent."""
        for _, path in children:
            qemu_img.ensure_not_in_use(path)
        for child, path in children:
            # Copy in what the child still needs from the layer going away.
            qemu_img.rebase(path, new_backing, backing_format=new_fmt)
            child_ok = (child.tracking if child else meta.head_tracking) == TRACKING_OK
            if child_ok and s.tracking == TRACKING_OK:
                # changes since the new parent = the deleted layer's + the child's
                qemu_img.bitmap(path, "merge", BITMAP, source_file=layer, source=BITMAP)
            elif child:
                child.tracking = TRACKING_LOST
            else:
                meta.head_tracking = TRACKING_LOST
            if child:
                child.parent = s.parent

    def _live_chain(
        self, vm: RunningVm, meta: VolMeta, s: SnapMeta
    ) -> tuple[SnapMeta | None, int, list[ChainNode]] | None:
        """When the snapshot going away is in the running disk's chain: its
        child there (None: the head), its depth (0 is the head) and the chain
        qemu holds, top first."""
        path: list[SnapMeta | None] = [None, *self._chain_snaps(meta)]  # the head, then its parents
        depth = next((i for i, p in enumerate(path) if p is s), None)
        if depth is None:
            return None
        disk = vm.disk_of(self.head_path(meta.uuid))
        if disk is None:
            raise InUse(f"volume head {self.head_path(meta.uuid)} is no longer held by VM {vm.name}")
        chain = vm.chain(disk)
        if len(chain) < len(path):
            raise FailedPrecondition(
                f"snapshot_uuid: VM {vm.name} runs volume {meta.uuid} on {len(chain)} layers, its snapshot tree "
                f"has {len(path)}: stop the VM, then delete the snapshot",
                field="snapshot_uuid",
            )
        return path[depth - 1], depth, chain

    def _live_delete(
        self,
        vm: RunningVm,
        meta: VolMeta,
        s: SnapMeta,
        child: SnapMeta | None,
        depth: int,
        chain: list[ChainNode],
        new_backing: str | None,
    ) -> str:
        """The running VM's qemu copies the deleted layer's data into its
        child (block-stream), writes the new backing name itself, and lets the
        layer go. The child's bitmap gains the deleted layer's when qemu can
        write it (the head); an intermediate layer is read-only in qemu, so
        its tracking is kept only when nothing is older than it afterwards.
        Returns the child's path."""
        child_path = self.head_path(meta.uuid) if child is None else self.snap_path(meta.uuid, child.uuid)
        top, gone = chain[depth - 1], chain[depth]
        base = chain[depth + 1] if depth + 1 < len(chain) else None
        if base is None and new_backing is not None:
            raise FailedPrecondition(
                f"snapshot_uuid: VM {vm.name} does not hold the base image {new_backing} of volume {meta.uuid}: "
                "stop the VM, then delete the snapshot",
                field="snapshot_uuid",
            )
        if top.read_only and top.reopens_by_stale_name(child_path):
            raise FailedPrecondition(
                f"snapshot_uuid: VM {vm.name} opened layer {child_path} under a name that is now another file "
                f"({top.file_name}), and qemu would reopen it by that name to merge into it: stop the VM, then "
                "delete the snapshot",
                field="snapshot_uuid",
            )
        child_ok = (child.tracking if child else meta.head_tracking) == TRACKING_OK
        if child is None and child_ok and s.tracking == TRACKING_OK:
            vm.merge_bitmap(top, gone, BITMAP)  # before the stream: at worst more than changed, never less
        elif s.parent is not None:
            if child is None:
                meta.head_tracking = TRACKING_LOST
            else:
                child.tracking = TRACKING_LOST
        vm.stream(top, gone, base, new_backing)
        if child is not None:
            child.parent = s.parent
        log.info("live snapshot merged", extra={"vm": vm.name, "volume": meta.uuid, "snapshot": s.uuid})
        return child_path

    def _chain_snaps(self, meta: VolMeta) -> list[SnapMeta]:
        """The snapshots under the head, newest first."""
        out, cur = [], meta.head_parent
        while cur is not None:
            out.append(self._snap(meta, cur))
            cur = out[-1].parent
        return out

    def rollback_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> VolumeInfo:
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            s = self._snap(meta, snapshot_uuid)
            head = self.head_path(meta.uuid)
            try:
                qemu_img.ensure_not_in_use(head)
            except InUse as e:
                raise InUse(f"{e.message}: a rollback replaces the disk under a running VM; stop it first") from None
            capacity = qemu_img.info(head).virtual_size
            self._new_layer(head, capacity, self.snap_path(meta.uuid, s.uuid), "qcow2")
            meta.head_parent = s.uuid
            meta.head_tracking = TRACKING_OK
            self._save(meta)
            log.info("rolled back", extra={"volume": meta.uuid, "snapshot": s.uuid})
            return self._info(meta)

    def list_snapshots(self, volume_uuid: str) -> list[SnapshotInfo]:
        meta = self._meta(volume_uuid)
        return [self._snap_info(meta, s) for s in sorted(meta.snapshots, key=lambda s: s.created_at)]

    def snapshot_info(self, volume_uuid: str, snapshot_uuid: str) -> SnapshotInfo:
        meta = self._meta(volume_uuid)
        return self._snap_info(meta, self._snap(meta, snapshot_uuid))

    def snapshot_tree(self, volume_uuid: str) -> SnapshotTree:
        meta = self._meta(volume_uuid)
        return build_tree([(s.uuid, s.name, s.parent, s.created_at) for s in meta.snapshots], meta.head_parent)

    # ---- extents ----

    def data_extents(self, volume_uuid: str, snapshot_uuid: str | None) -> list[AllocExtent]:
        meta = self._meta(volume_uuid)
        if snapshot_uuid:
            self._snap(meta, snapshot_uuid)
        with QemuNbd(self.layer_path(meta, snapshot_uuid), readonly=True, run_dir=self.run_dir) as srv:
            with srv.connect() as c:
                return c.allocation()

    def changed_extents(self, volume_uuid: str, snapshot_uuid: str, since_snapshot_uuid: str | None) -> ChangedExtents:
        meta = self._meta(volume_uuid)
        self._snap(meta, snapshot_uuid)
        if since_snapshot_uuid is None:
            data = [Extent(e.start, e.length) for e in self.data_extents(volume_uuid, snapshot_uuid) if not e.zero]
            return ChangedExtents(data, exact=True, granularity=GRANULARITY)
        # Each layer's own bitmap, read from its file: missing, in use or
        # inconsistent is TrackingLost. Under the volume's lock: deleting a
        # snapshot merges its bitmap into its children's files.
        dirty: list[Extent] = []
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            self._snap(meta, snapshot_uuid)
            since = self._snap(meta, since_snapshot_uuid).uuid
            layers = meta.path_to(snapshot_uuid, since)
            lost = [s for s in layers if s.tracking != TRACKING_OK]
            if lost:
                raise TrackingLost(
                    f"snapshot_uuid: change tracking was lost for snapshot "
                    f"{', '.join(f'{s.name} ({s.uuid})' for s in lost)} (when it was "
                    "taken, its layer's dirty bitmap was missing or inconsistent: written by a program "
                    "that keeps no bitmap, or qemu or qemu-nbd was killed)",
                    field="snapshot_uuid",
                )
            for s in layers:
                dirty.extend(
                    dirty_extents(
                        self.snap_path(meta.uuid, s.uuid), BITMAP, f"snapshot {s.name} ({s.uuid})", fs=self.fs
                    )
                )
        return ChangedExtents(merge_extents(dirty), exact=True, granularity=GRANULARITY)

    # ---- clones ----

    def linked_clone(
        self, source: Qcow2Pool, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str
    ) -> VolumeInfo:
        """A new volume in this pool on top of a snapshot of source (constant time)."""
        vol = check_uuid(volume_uuid, "clone_volume_uuid")
        check_name(name, "clone_dst_vol_name")
        if source.kind != self.kind:
            raise FailedPrecondition(
                f"target_pool_uuid: a linked clone of a {source.kind} pool's snapshot cannot "
                f"live in a {self.kind} pool (its backing file would be out of reach); make a "
                "full clone",
                field="target_pool_uuid",
            )
        with source._locked(source_volume):
            origin = source._meta(source_volume)
            s = source._snap(origin, snapshot_uuid)
            layer = source.snap_path(origin.uuid, s.uuid)
            with self._locked(vol):
                if self.fs.exists(self.meta_path(vol)):
                    raise AlreadyExists(
                        f"clone_volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="clone_volume_uuid"
                    )
                capacity = qemu_img.info(layer).virtual_size
                meta = VolMeta(
                    uuid=vol,
                    name=name,
                    created_at=time.time(),
                    parent_volume=origin.uuid,
                    parent_pool=source.pool_uuid,
                    parent_snapshot=s.uuid,
                    parent_file=layer,
                )
                self._new_layer(self.head_path(vol), capacity, layer, "qcow2")
                self._save(meta)
            s.clones.append(f"{self.pool_uuid}/{vol}")
            source._save(origin)
            log.info("linked clone created", extra={"volume": vol, "origin": origin.uuid, "snapshot": s.uuid})
            return self._info(meta)

    def flatten(self, volume_uuid: str, *, on_percent=None, checkpoint=None) -> VolumeInfo:
        """Make a linked clone independent of its origin snapshot."""
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            if not meta.parent_file:
                raise FailedPrecondition(f"volume_uuid: volume {meta.uuid} is not a linked clone", field="volume_uuid")
            # The bottom layer of the clone is the one backed by the origin.
            roots = meta.children_of(None)
            bottom = self.snap_path(meta.uuid, roots[0].uuid) if roots else self.head_path(meta.uuid)
            qemu_img.ensure_not_in_use(bottom)
            qemu_img.rebase(bottom, None, on_percent=on_percent, checkpoint=checkpoint)
            self._forget_clone(meta)
            meta.parent_volume = meta.parent_pool = meta.parent_snapshot = meta.parent_file = None
            self._save(meta)
            log.info("clone flattened", extra={"volume": meta.uuid})
            return self._info(meta)

    def create_volume_over(self, volume_uuid: str, name: str, capacity: int, source_uri: str) -> VolumeInfo:
        """A volume whose head is an overlay on a read-only NBD source (an
        instant restore: the backup's export), usable at once; it stands on
        its own after detach_source()."""
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        check_capacity(capacity)
        if not self.fs.local:
            raise InvalidArgument(
                f"pool_uuid: pool {self.pool_uuid} is on NFS; an instant restore's volume reads from an export "
                "on this host, so it needs a pool on this host's disks",
                field="pool_uuid",
            )
        with self._locked(vol):
            if self.fs.exists(self.meta_path(vol)):
                raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
            meta = VolMeta(uuid=vol, name=name, created_at=time.time(), base_file=source_uri, base_format="raw")
            self._new_layer(self.head_path(vol), capacity, source_uri, "raw")
            self._save(meta)
            log.info("volume created over a source", extra={"volume": vol, "source": source_uri})
            return self._info(meta)

    def detach_source(self, volume_uuid: str, *, on_percent=None, checkpoint=None) -> str:
        """Copy into the head what it still reads from its source, then drop
        the source: by the running VM's own block-stream when a VM runs on
        the head ("live"), else by qemu-img rebase ("offline")."""
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            if not meta.base_file or meta.snapshots:
                raise FailedPrecondition(
                    f"volume_uuid: volume {meta.uuid} has no source to detach from", field="volume_uuid"
                )
            head = self.head_path(meta.uuid)
            vm = self._running_vm(head)
            if vm is None:
                qemu_img.rebase(head, None, on_percent=on_percent, checkpoint=checkpoint)
                how = "offline"
            else:
                with vm:
                    disk = vm.disk_of(head)
                    chain = vm.chain(disk) if disk is not None else []
                    if len(chain) < 2:
                        raise InUse(f"volume head {head} is held by VM {vm.name} without its source under it")
                    vm.stream(chain[0], chain[1], None, None)
                how = "live"
            meta.base_file = meta.base_format = None
            self._save(meta)
            log.info("volume detached from its source", extra={"volume": meta.uuid, "how": how})
            return how

    def new_volume_for_copy(
        self, volume_uuid: str, name: str, capacity: int, job_id: str = "copy", preallocation: str = "off"
    ) -> tuple[str, Callable, Callable]:
        """Reserve a volume for a full copy: returns (temporary head path,
        commit(), abort()). Until commit the volume does not exist."""
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        check_capacity(capacity)
        with self._locked(vol):
            if self.fs.exists(self.meta_path(vol)) or self.fs.exists(self.head_path(vol)):
                raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
        tag = hashlib.sha256(job_id.encode()).hexdigest()[:12]
        tmp = os.path.join(self.base, "volume", f".{vol}.{tag}.copy")
        if self.fs.exists(tmp):
            self.fs.unlink(tmp)
        qemu_img.create(tmp, capacity, preallocation=preallocation)

        def commit() -> VolumeInfo:
            with self._locked(vol):
                if self.fs.exists(self.meta_path(vol)):
                    raise AlreadyExists(
                        f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid"
                    )
                qemu_img.bitmap(tmp, "add", BITMAP)
                self.fs.fsync(tmp)  # the copy is durable before the volume exists
                self.fs.rename(tmp, self.head_path(vol))
                meta = VolMeta(uuid=vol, name=name, created_at=time.time())
                self._save(meta)
                return self._info(meta)

        def abort() -> None:
            try:
                self.fs.unlink(tmp)
            except FileNotFoundError:
                pass

        return tmp, commit, abort

    def pool_status(self) -> PoolStatus:
        try:
            total, used, avail = self.fs.statvfs(self.base)
        except OSError as e:
            return PoolStatus(self.pool_uuid, self.kind, "unreachable", error=f"{self.base}: {e.strerror}")
        except BlockferryError as e:
            return PoolStatus(self.pool_uuid, self.kind, "unreachable", error=e.message)
        return PoolStatus(self.pool_uuid, self.kind, "healthy", total, used, avail)

    def volume_exists(self, volume_uuid: str) -> bool:
        return self.fs.exists(self.meta_path(check_uuid(volume_uuid, "volume_uuid")))

    def image_digest(self, volume_uuid: str, snapshot_uuid: str | None, ctx=None):
        from agent.volumes.digest import image_digest

        meta = self._meta(volume_uuid)
        if snapshot_uuid:
            self._snap(meta, snapshot_uuid)
        return image_digest(self.layer_path(meta, snapshot_uuid or None), run_dir=self.run_dir, ctx=ctx)

    @contextmanager
    def open_reader(self, volume_uuid: str, snapshot_uuid: str, only=None):
        """A snapshot's extents, then its data: read straight from the layer
        files at the offsets qemu-img map gives (agent.volumes.qcow2.direct),
        or through one read-only qemu-nbd when some clusters are compressed
        or encrypted. only=(size, ranges): just these ranges will be read."""
        with self._locked(volume_uuid):  # the map and the open layers agree
            meta = self._meta(volume_uuid)
            self._snap(meta, snapshot_uuid)
            layer = self.layer_path(meta, snapshot_uuid)
            mapped = open_mapped(layer, only) if self.fs.local else None
        if mapped is not None:
            with mapped:
                yield mapped
            return
        with QemuNbd(layer, readonly=True, run_dir=self.run_dir) as srv:
            with srv.connect() as c:
                yield NbdSnapshotReader(c)

    def full_clone(
        self, source: Qcow2Pool, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str, ctx
    ) -> tuple[VolumeInfo, int]:
        """An independent copy of a snapshot. qcow2 -> qcow2 on this host goes
        through qemu-img convert, faster than copying through two qemu-nbd
        servers (bench/qcow2_bench.py, docs/benchmarks.md). The copy
        becomes a volume only when complete and fsynced."""
        meta = source._meta(source_volume)
        source._snap(meta, snapshot_uuid)
        layer = source.layer_path(meta, snapshot_uuid)
        capacity = qemu_img.info(layer).virtual_size
        data = qemu_img.allocated_data(layer)
        tmp, commit, abort = self.new_volume_for_copy(volume_uuid, name, capacity, job_id=ctx.job_id)
        try:
            ctx.progress(0, data, "copying")
            qemu_img.convert_into(
                layer,
                tmp,
                on_percent=lambda pct: ctx.progress(int(data * pct / 100)),
                checkpoint=ctx.checkpoint,
                rate_limit=ctx.bandwidth_limit,
            )
            ctx.checkpoint()
            ctx.progress(data, data, "committing")
            return commit(), data
        except BaseException:
            abort()  # a cancelled or failed copy leaves no volume behind
            raise

    def check_not_in_use(self, volume_uuid: str) -> None:
        meta = self._meta(check_uuid(volume_uuid, "volume_uuid"))
        qemu_img.ensure_not_in_use(self.head_path(meta.uuid))

    def open_overwrite_target(self, volume_uuid: str) -> Qcow2OverwriteTarget:
        meta = self._meta(check_uuid(volume_uuid, "volume_uuid"))
        head = self.head_path(meta.uuid)
        qemu_img.ensure_not_in_use(head)  # a VM's qemu holds the lock: IN_USE
        return Qcow2OverwriteTarget(head, self.run_dir, lambda: self.volume_info(meta.uuid))

    def open_restore_target(self, volume_uuid: str, name: str, capacity: int, job_id: str) -> RestoreTarget:
        """Up to DIRECT_RESTORE_MAX, into an image with preallocated metadata,
        written straight at its clusters' offsets (agent.volumes.qcow2.direct:
        measured faster than qemu-nbd, bench/backup_bench.py); larger ones,
        whose metadata would cost too much up front, through qemu-nbd."""
        direct = capacity <= DIRECT_RESTORE_MAX and self.fs.local
        tmp, commit, abort = self.new_volume_for_copy(
            volume_uuid, name, capacity, job_id=job_id, preallocation="metadata" if direct else "off"
        )
        try:
            if direct:
                return DirectRestoreTarget(tmp, commit, abort)
            return Qcow2RestoreTarget(tmp, commit, abort, self.run_dir)
        except BaseException:
            abort()
            raise


class _NbdTarget(RestoreTarget):
    """Writes into an image through a writable qemu-nbd, several in flight."""

    def __init__(self, image: str, run_dir: str):
        self.server = QemuNbd(image, readonly=False, run_dir=run_dir).start()
        try:
            self.client = self.server.connect()
            self.writer = AsyncWriter(self.client)
        except BaseException:
            self.server.stop()
            raise

    def _write_run(self, view: memoryview, offset: int) -> None:
        for pos in range(0, len(view), NBD_REQUEST):  # servers take at most 32 MiB a request
            self.writer.write(view[pos : pos + NBD_REQUEST], offset + pos)

    def _close(self) -> None:
        if self.server is not None:
            try:
                self.client.close()
            finally:
                self.server.stop()
                self.server = None


class Qcow2RestoreTarget(_NbdTarget):
    """Writes through a writable qemu-nbd on the hidden temporary image that
    new_volume_for_copy reserved; commit() renames it into the pool."""

    def __init__(self, tmp: str, commit: Callable, abort: Callable, run_dir: str):
        self._commit, self._abort = commit, abort
        super().__init__(tmp, run_dir)

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        for a, b in native.nonzero_runs(view, ZERO_RUN):  # a new image reads as zeros already
            self._write_run(view[a:b], offset + a)

    def commit(self) -> VolumeInfo:
        try:
            self.writer.finish()
            self._close()
            return self._commit()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self._abort()


class Qcow2OverwriteTarget(_NbdTarget):
    """A restore in place: the volume's head through a writable qemu-nbd
    (which fails while a VM holds the image lock). Zero ranges become zero
    clusters in the head, so nothing of the backing layers shows through;
    the head's dirty bitmap records every write for the next incremental."""

    def __init__(self, head: str, run_dir: str, info: Callable[[], VolumeInfo]):
        self._info = info
        super().__init__(head, run_dir)

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        pos = 0
        for a, b in native.nonzero_runs(view, ZERO_RUN):
            if a > pos:
                self.zero(offset + pos, a - pos)
            self._write_run(view[a:b], offset + a)
            pos = b
        if pos < len(view):
            self.zero(offset + pos, len(view) - pos)

    def zero(self, offset: int, length: int) -> None:
        self.client.zero(length, offset)

    def commit(self) -> VolumeInfo:
        try:
            self.writer.finish()
        finally:
            self._close()
        return self._info()

    def abort(self) -> None:
        self._close()


class _SetItem:
    """One volume of a snapshot set while the set is taken."""

    def __init__(self, index: int, pool: Qcow2Pool, volume: str, snap: str, name: str, description: str):
        self.index, self.pool, self.meta_uuid = index, pool, volume
        self.snap, self.name, self.description = snap, name, description
        self.meta: VolMeta | None = None
        self.head = self.layer = self.tmp = ""
        self.tracking = TRACKING_OK
        self.vm: RunningVm | None = None

    def prepare(self) -> None:
        """Under the volume's lock: the checks, and where its files go."""
        meta = self.meta = self.pool._meta(self.meta_uuid)
        if meta.snapshot(self.snap):
            raise AlreadyExists(f"snapshot_uuid: snapshot {self.snap} exists", field="snapshot_uuid")
        if any(s.name == self.name for s in meta.snapshots):
            raise AlreadyExists(
                f"snapshot_name: volume {meta.uuid} has a snapshot named {self.name!r}", field="snapshot_name"
            )
        self.head = self.pool.head_path(meta.uuid)
        self.pool.fs.makedirs(self.pool.snap_dir(meta.uuid))
        self.layer = self.pool.snap_path(meta.uuid, self.snap)
