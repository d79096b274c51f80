"""The RBD volume driver: volumes in a Ceph pool, through the Python rados
and rbd bindings.

- A volume is an image named by its UUID; its display name, creation time,
  snapshot metadata and the snapshot the live state grows from are image
  metadata (`bf.*` keys), so any agent on any host sees the same volume.
- A snapshot is an RBD snapshot named by its UUID. RBD snapshots are a line
  per image; the tree (with rollback branches) comes from the `parent` each
  snapshot records, as with qcow2.
- Linked clones are COW children of a protected snapshot (protected and
  unprotected automatically), possibly in another pool of the same cluster.
- Change tracking is `diff_iterate`: `whole_object=True` (fast-diff) when the
  object map is valid, the exact path when its flags say it is invalid. An
  invalid object map is reported, not used silently: the volume's or
  snapshot's tracking is "degraded", and a backup records why its changes
  came the slow way (`rbd object-map rebuild` repairs it).
- Every librados/librbd call that can block is bounded by the pool's
  `timeout` (rados_mon_op_timeout, rados_osd_op_timeout,
  client_mount_timeout); an unreachable cluster is a clean StorageIOError and
  the pool reports "unreachable" until a later call reconnects.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack, contextmanager

import rados
import rbd

from agent.errors import (
    AlreadyExists,
    BlockferryError,
    Cancelled,
    FailedPrecondition,
    HasDependents,
    InUse,
    InvalidArgument,
    NotFound,
    StorageIOError,
)
from agent.extents import AllocExtent, Extent, merge_extents
from agent.hypervisor.base import Hypervisor, RunningVm
from agent.hypervisor.freeze import CRASH, OFFLINE, vm_definition
from agent.volumes.base import (
    HEAD,
    ChangedExtents,
    PoolStatus,
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
from agent.volumes.rbd.connection import CephConnection, CephTarget
from agent.volumes.rbd.reader import RbdReader, RbdSnapshotReader
from agent.volumes.rbd.writers import RbdOverwriteTarget, RbdRestoreTarget, RbdWriter

log = logging.getLogger("agent.rbd")

FEATURE_BITS = {
    "layering": rbd.RBD_FEATURE_LAYERING,
    "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
    "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
    "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
    "journaling": rbd.RBD_FEATURE_JOURNALING,
}
KEY_NAME, KEY_CREATED, KEY_HEAD_PARENT, KEY_SNAP = "bf.name", "bf.created_at", "bf.head_parent", "bf.snap."


class RbdPool(VolumeDriver):
    kind = "rbd"

    def __init__(
        self,
        pool_uuid: str,
        *,
        ceph_conf: str,
        client_name: str,
        keyring: str,
        rbd_pool: str,
        namespace: str,
        features: list[str],
        timeout: float,
        hypervisor: Hypervisor | None = None,
    ):
        """hypervisor: who to ask about a VM on this host running on an image."""
        self.pool_uuid = check_uuid(pool_uuid, "pool_uuid")
        self.hypervisor = hypervisor
        self.rbd_pool = rbd_pool
        self.namespace = namespace
        self.features = 0
        for f in features:
            self.features |= FEATURE_BITS[f]
        self.timeout = timeout
        self.conn = CephConnection.get(CephTarget(ceph_conf, client_name, keyring, timeout))

    # ---- cluster access ----

    @contextmanager
    def ioctx(self):
        cluster = self.conn.cluster()
        try:
            io = cluster.open_ioctx(self.rbd_pool)
        except rados.ObjectNotFound:
            raise StorageIOError(f"pool_uuid: RADOS pool {self.rbd_pool!r} does not exist", field="pool_uuid") from None
        except (rados.Error, OSError) as e:
            self.conn.reset(str(e))
            raise StorageIOError(
                f"pool_uuid: cannot open RADOS pool {self.rbd_pool!r}: {e}", field="pool_uuid"
            ) from None
        try:
            if self.namespace:
                io.set_namespace(self.namespace)
            yield io
        except (rados.TimedOut, rbd.Timeout, rados.ConnectionShutdown, rbd.ConnectionShutdown) as e:
            self.conn.reset(str(e))
            raise StorageIOError(
                f"pool_uuid: ceph cluster did not answer within {self.timeout:.0f}s (pool {self.rbd_pool}): {e}",
                field="pool_uuid",
            ) from None
        finally:
            io.close()

    def pool_status(self) -> PoolStatus:
        try:
            with self.ioctx() as io:
                rbd.RBD().list2(io)
                stats = self.conn.cluster().get_cluster_stats()
        except StorageIOError as e:
            return PoolStatus(self.pool_uuid, self.kind, "unreachable", error=e.message)
        kb, used, avail = stats["kb"], stats["kb_used"], stats["kb_avail"]
        return PoolStatus(self.pool_uuid, self.kind, "healthy", kb << 10, used << 10, avail << 10)

    @contextmanager
    def open_image(self, io, vol: str, *, snapshot: str | None = None, read_only: bool = False):
        try:
            img = rbd.Image(io, vol, snapshot=snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            if snapshot:
                raise NotFound(
                    f"snapshot_uuid: no snapshot {snapshot} on volume {vol}", field="snapshot_uuid"
                ) from None
            raise NotFound(f"volume_uuid: no volume {vol} in pool {self.pool_uuid}", field="volume_uuid") from None
        try:
            yield img
        except rbd.ImageBusy as e:
            raise InUse(f"volume_uuid: volume {vol} is busy: {e}", field="volume_uuid") from None
        finally:
            img.close()

    def refuse_if_open(self, io, vol: str) -> None:
        """A read-only handle registers no watch: any watcher is another client."""
        with self.open_image(io, vol, read_only=True) as img:
            if list(img.watchers_list()):
                raise InUse(f"volume_uuid: volume {vol} is open by a client (a running VM?)", field="volume_uuid")

    # ---- metadata ----

    @staticmethod
    def stamp(img, name: str) -> None:
        """Mark an image as a blockferry volume with its display name."""
        img.metadata_set(KEY_NAME, name)
        img.metadata_set(KEY_CREATED, repr(time.time()))

    @staticmethod
    def _meta(img) -> dict[str, str]:
        return dict(img.metadata_list())

    @staticmethod
    def _snaps_meta(meta: dict[str, str]) -> dict[str, dict]:
        return {k[len(KEY_SNAP) :]: json.loads(v) for k, v in meta.items() if k.startswith(KEY_SNAP)}

    def _snap_meta(self, img, vol: str, snap: str) -> dict:
        snap = check_uuid(snap, "snapshot_uuid")
        s = self._snaps_meta(self._meta(img)).get(snap)
        if s is None:
            raise NotFound(f"snapshot_uuid: no snapshot {snap} on volume {vol}", field="snapshot_uuid")
        return s

    # ---- volumes ----

    def create_volume(
        self, volume_uuid: str, name: str, capacity: int | None, backing_file: str | None = None
    ) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        with self.ioctx() as io:
            if backing_file:
                return self._adopt(io, vol, name, backing_file, capacity)
            if capacity is None:
                raise InvalidArgument("capacity: required when no backing_file is given", field="capacity")
            check_capacity(capacity)
            try:
                rbd.RBD().create(io, vol, capacity, old_format=False, features=self.features)
            except rbd.ImageExists:
                raise AlreadyExists(
                    f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid"
                ) from None
            with self.open_image(io, vol) as img:
                self.stamp(img, name)
                log.info("volume created", extra={"pool": self.pool_uuid, "volume": vol, "capacity": capacity})
                return self.info_of(io, img, vol)

    def _adopt(self, io, vol: str, name: str, image_name: str, capacity: int | None) -> VolumeInfo:
        """Adopt an existing image of this RADOS pool, named alone or as
        "<rados pool>/<image>": it is renamed to the volume UUID (refused
        while a client has it open)."""
        rados_pool, _, image_name = image_name.rpartition("/")
        if rados_pool and rados_pool != self.rbd_pool:
            raise InvalidArgument(
                f"backing_file: {rados_pool}/{image_name} is in RADOS pool {rados_pool!r}, this "
                f"pool is {self.rbd_pool!r}",
                field="backing_file",
            )
        if "/" in image_name or "@" in image_name or not image_name:
            raise InvalidArgument(
                f"backing_file: give the name of an image in this RBD pool (or {self.rbd_pool}/<image>)",
                field="backing_file",
            )
        try:
            with rbd.Image(io, image_name, read_only=True) as img:
                size = img.size()
                if list(img.watchers_list()):  # read-only: our handle is not a watcher
                    raise InUse(f"backing_file: image {image_name!r} is open by a client", field="backing_file")
        except rbd.ImageNotFound:
            raise NotFound(
                f"backing_file: no image {image_name!r} in RADOS pool {self.rbd_pool}", field="backing_file"
            ) from None
        if capacity and capacity < size:
            raise InvalidArgument(f"capacity: {capacity} is smaller than the image ({size} bytes)", field="capacity")
        try:
            rbd.RBD().rename(io, image_name, vol)
        except rbd.ImageExists:
            raise AlreadyExists(
                f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid"
            ) from None
        with self.open_image(io, vol) as img:
            if capacity and capacity > size:
                img.resize(capacity)
            self.stamp(img, name)
            return self.info_of(io, img, vol)

    def delete_volume(self, volume_uuid: str, force: bool = False) -> None:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self._locked(vol), self.ioctx() as io:
            with self.open_image(io, vol) as img:
                snaps = [s["name"] for s in list(img.list_snaps())]
                clones = self._children(img, snaps)
                snap_names = self._snaps_meta(self._meta(img))
                if clones and not force:
                    raise HasDependents(
                        f"volume_uuid: volume {vol} has linked clones "
                        f"{', '.join(c for _, c in clones)}; flatten or delete them first, or "
                        "delete with force (which flattens them)",
                        field="volume_uuid",
                    )
                if snaps and not force:
                    names = ", ".join(f"{snap_names.get(s, {}).get('name', s)} ({s})" for s in snaps)
                    raise HasDependents(
                        f"volume_uuid: volume {vol} has snapshots {names}; delete them first, or delete with force",
                        field="volume_uuid",
                    )
            self.refuse_if_open(io, vol)
            for pool, clone in clones:  # force: keep the clones alive on their own
                self._flatten_image(pool, clone)
            with self.open_image(io, vol) as img:
                for s in list(img.list_snaps()):
                    if img.is_protected_snap(s["name"]):
                        img.unprotect_snap(s["name"])
                    img.remove_snap(s["name"])
            rbd.RBD().remove(io, vol)
            log.info("volume deleted", extra={"pool": self.pool_uuid, "volume": vol, "force": force})

    def _children(self, img, snaps: Iterable[str]) -> list[tuple[str, str]]:
        """(rados pool, image) of the linked clones of the given snapshots."""
        out = []
        for s in snaps:
            img.set_snap(s)
            out += [(c["pool"], c["image"]) for c in img.list_children2()]
        img.set_snap(None)
        return out

    def _flatten_image(self, rados_pool: str, image: str) -> None:
        io = self.conn.cluster().open_ioctx(rados_pool)
        try:
            if self.namespace:
                io.set_namespace(self.namespace)
            with rbd.Image(io, image) as img:
                img.flatten()
        finally:
            io.close()

    def volume_info(self, volume_uuid: str) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io, self.open_image(io, vol, read_only=True) as img:
            return self.info_of(io, img, vol)

    def _tracking(self, img) -> str:
        """'degraded' when the image (at its current snapshot) has an object
        map whose flags say it is invalid; else 'ok'."""
        if img.features() & rbd.RBD_FEATURE_OBJECT_MAP and img.flags() & (
            rbd.RBD_FLAG_OBJECT_MAP_INVALID | rbd.RBD_FLAG_FAST_DIFF_INVALID
        ):
            return "degraded"
        return "ok"

    def info_of(self, io, img, vol: str) -> VolumeInfo:
        meta = self._meta(img)
        tracking = self._tracking(img)  # the head's, before the snapshot sizes move the image to snapshots
        size = img.size()
        used = sum(e.length for e in self._extents(img, size, None, whole_object=False, include_parent=True))
        snaps = list(img.list_snaps())
        snap_bytes = sum(self._snap_size(img, snaps, i) for i in range(len(snaps)))
        parent_vol = parent_snap = None
        try:
            spec = img.get_parent_image_spec()
            parent_vol, parent_snap = spec["image_name"], spec["snap_name"]
        except rbd.ImageNotFound:
            pass
        children = [c for _, c in self._children(img, [s["name"] for s in snaps])]
        return VolumeInfo(
            uuid=vol,
            name=meta.get(KEY_NAME, vol),
            pool_uuid=self.pool_uuid,
            capacity=size,
            used=used,
            snapshot_bytes=snap_bytes,
            access_path=f"rbd:{self.rbd_pool}/{self.namespace + '/' if self.namespace else ''}{vol}",
            created_at=float(meta.get(KEY_CREATED, "0")),
            parent_volume=parent_vol,
            parent_snapshot=parent_snap,
            children=tuple(children),
            format="rbd",
            tracking=tracking,
        )

    def _snap_size(self, img, snaps: list[dict], i: int) -> int:
        """Bytes that changed from the previous snapshot to snapshot i (du-style)."""
        name = snaps[i]["name"]
        since = snaps[i - 1]["name"] if i else None
        img.set_snap(name)
        try:
            n = [0]
            img.diff_iterate(
                0,
                img.size(),
                since,
                lambda o, ln, e: n.__setitem__(0, n[0] + (ln if e else 0)),
                include_parent=False,
                whole_object=self._fast_diff_ok(img),
            )
            return n[0]
        finally:
            img.set_snap(None)

    def list_volumes(self) -> list[VolumeInfo]:
        out = []
        with self.ioctx() as io:
            for entry in rbd.RBD().list2(io):
                name = entry["name"]
                try:
                    check_uuid(name, "volume_uuid")
                except InvalidArgument:
                    continue  # not one of ours
                try:
                    with self.open_image(io, name, read_only=True) as img:
                        if KEY_NAME in self._meta(img):
                            out.append(self.info_of(io, img, name))
                except NotFound:
                    continue
        return out

    def resize_volume(self, volume_uuid: str, capacity: int) -> VolumeInfo:
        check_capacity(capacity)
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self._locked(vol), self.ioctx() as io, self.open_image(io, vol) as img:
            if capacity < img.size():
                raise InvalidArgument(
                    f"capacity: shrinking from {img.size()} to {capacity} bytes would lose "
                    "data; only growing is supported",
                    field="capacity",
                )
            if capacity > img.size():
                img.resize(capacity)
            return self.info_of(io, img, vol)

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
        """Snapshots of RBD volumes of this pool at one point in time. When a
        VM on this host runs on them (qemu's rbd driver), the guest is frozen
        through its guest agent when it answers, and for more than one image
        the VM is paused around the snapshots (an image's snapshot is atomic,
        a set of them is not): the pause is the set's switch_ms. within: the
        caller froze and paused the VM, whose disks these images must be."""
        if not requests:
            raise InvalidArgument("snapshots: name at least one volume", field="snapshots")
        wanted = []
        for i, r in enumerate(requests):
            if r.pool_uuid != self.pool_uuid:
                raise InvalidArgument(
                    f"snapshots[{i}].pool_uuid: a set of RBD volumes stays in one pool ({self.pool_uuid})",
                    field=f"snapshots[{i}].pool_uuid",
                )
            check_name(r.name, "snapshot_name")
            if len(r.description) > 1024:
                raise InvalidArgument("desc: at most 1024 characters", field="desc")
            wanted.append((check_uuid(r.volume_uuid, "volume_uuid"), check_uuid(r.snapshot_uuid, "snapshot_uuid"), r))
        if len({w[0] for w in wanted}) != len(wanted):
            raise InvalidArgument("snapshots: a volume is named twice", field="snapshots")
        if within is not None:
            held = within.vm
            for i, (vol, _, _) in enumerate(wanted):
                if held.rbd_disk(self.rbd_pool, self.namespace, vol) is None:
                    raise InvalidArgument(
                        f"snapshots[{i}]: volume {vol} is no disk of VM {held.name}, whose other disks are in the set",
                        field=f"snapshots[{i}]",
                    )
            vm: RunningVm | None = held
        else:
            vm = self._running_vm([w[0] for w in wanted])
        with ExitStack() as stack:
            if vm is not None and within is None:
                stack.enter_context(vm)
            for vol in sorted(w[0] for w in wanted):
                stack.enter_context(self._locked(vol))
            io = stack.enter_context(self.ioctx())
            imgs = []
            for vol, snap, r in wanted:
                img = stack.enter_context(self.open_image(io, vol))
                snaps = self._snaps_meta(self._meta(img))
                if snap in snaps:
                    raise AlreadyExists(f"snapshot_uuid: snapshot {snap} exists", field="snapshot_uuid")
                if any(x["name"] == r.name for x in snaps.values()):
                    raise AlreadyExists(
                        f"snapshot_name: volume {vol} has a snapshot named {r.name!r}", field="snapshot_name"
                    )
                imgs.append(img)
            if vm is None:
                owned = any(list(img.lock_get_owners()) for img in imgs)  # a writer elsewhere (another host)
                consistency = CRASH if owned else OFFLINE
                infos = [
                    self._take(img, vol, snap, r, consistency, "")
                    for img, (vol, snap, r) in zip(imgs, wanted, strict=True)
                ]
                return SnapshotSet(tuple(infos), consistency, "", "", 0.0, 0.0)
            if within is not None:  # frozen and paused by the caller
                infos = [
                    self._take(img, vol, snap, r, within.consistency, within.definition)
                    for img, (vol, snap, r) in zip(imgs, wanted, strict=True)
                ]
                return SnapshotSet(tuple(infos), within.consistency, vm.name, "", 0.0, 0.0, within.definition)
            definition = vm_definition(vm)
            with vm.frozen(timeout=freeze_timeout, wanted=freeze) as fr:
                paused = len(imgs) > 1
                started = time.monotonic()
                if paused:
                    vm.pause()
                try:
                    infos = [
                        self._take(img, vol, snap, r, fr.consistency, definition)
                        for img, (vol, snap, r) in zip(imgs, wanted, strict=True)
                    ]
                finally:
                    if paused:
                        vm.resume()
                    pause_ms = (time.monotonic() - started) * 1000 if paused else 0.0
            log.info(
                "snapshot set of a running VM",
                extra={
                    "vm": vm.name,
                    "disks": len(imgs),
                    "consistency": fr.consistency,
                    "pause_ms": round(pause_ms, 1),
                },
            )
            return SnapshotSet(tuple(infos), fr.consistency, vm.name, fr.reason, fr.frozen_ms, pause_ms, definition)

    def _running_vm(self, vols: list[str]) -> RunningVm | None:
        """The VM on this host that runs on these images; refused when they
        are disks of two VMs."""
        if self.hypervisor is None:
            return None
        found: RunningVm | None = None
        for vm in self.hypervisor.running_vms():
            try:
                mine = [v for v in vols if vm.rbd_disk(self.rbd_pool, self.namespace, v) is not None]
            except BlockferryError:
                mine = []
            if not mine:
                vm.close()
                continue
            if found is not None:
                vm.close()
                found.close()
                raise InvalidArgument(
                    f"snapshots: volume {mine[0]} is a disk of VM {vm.name}, others of VM {found.name}: "
                    "a set holds the disks of one VM",
                    field="snapshots",
                )
            found = vm
        return found

    def _take(self, img, vol: str, snap: str, r: SnapshotRequest, consistency: str, definition: str) -> SnapshotInfo:
        meta = self._meta(img)
        parent = meta.get(KEY_HEAD_PARENT) or None
        record = {
            "name": r.name,
            "description": r.description,
            "created_at": time.time(),
            "parent": parent,
            "consistency": consistency,
            "vm_definition": definition,
        }
        img.metadata_set(KEY_SNAP + snap, json.dumps(record))  # before the snapshot: never an unknown snap
        try:
            img.create_snap(snap)
        except Exception:
            img.metadata_remove(KEY_SNAP + snap)
            raise
        img.metadata_set(KEY_HEAD_PARENT, snap)
        log.info("snapshot created", extra={"volume": vol, "snapshot": snap, "consistency": consistency})
        return self._snap_info(img, vol, snap, self._snaps_meta(self._meta(img)))

    def _snap_info(self, img, vol: str, snap: str, snaps: dict[str, dict]) -> SnapshotInfo:
        rec = snaps[snap]
        meta = self._meta(img)
        children = [u for u, r in snaps.items() if r.get("parent") == snap]
        if meta.get(KEY_HEAD_PARENT) == snap:
            children.append(HEAD)
        listed = img.list_snaps()
        idx = next((i for i, s in enumerate(listed) if s["name"] == snap), None)
        size = self._snap_size(img, list(listed), idx) if idx is not None else 0
        img.set_snap(snap)
        tracking = self._tracking(img)
        clones = [c for _, c in self._children(img, [snap])]
        return SnapshotInfo(
            uuid=snap,
            name=rec["name"],
            volume_uuid=vol,
            description=rec.get("description", ""),
            created_at=rec.get("created_at", 0.0),
            size=size,
            parent=rec.get("parent"),
            children=tuple(children),
            clones=tuple(clones),
            tracking=tracking,
            consistency=rec.get("consistency", ""),
            vm_definition=rec.get("vm_definition", ""),
        )

    def snapshot_info(self, volume_uuid: str, snapshot_uuid: str) -> SnapshotInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io, self.open_image(io, vol, read_only=True) as img:
            self._snap_meta(img, vol, snapshot_uuid)
            return self._snap_info(img, vol, snapshot_uuid, self._snaps_meta(self._meta(img)))

    def delete_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> None:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self._locked(vol), self.ioctx() as io, self.open_image(io, vol) as img:
            rec = self._snap_meta(img, vol, snapshot_uuid)
            clones = self._children(img, [snapshot_uuid])
            if clones:
                raise HasDependents(
                    f"snapshot_uuid: snapshot {rec['name']} ({snapshot_uuid}) has linked clones "
                    f"{', '.join(c for _, c in clones)}; flatten or delete them first",
                    field="snapshot_uuid",
                )
            if img.is_protected_snap(snapshot_uuid):
                img.unprotect_snap(snapshot_uuid)
            img.remove_snap(snapshot_uuid)
            snaps = self._snaps_meta(self._meta(img))
            for u, r in snaps.items():  # children move up to the deleted snapshot's parent
                if r.get("parent") == snapshot_uuid:
                    r["parent"] = rec.get("parent")
                    img.metadata_set(KEY_SNAP + u, json.dumps(r))
            if self._meta(img).get(KEY_HEAD_PARENT) == snapshot_uuid:
                if rec.get("parent"):
                    img.metadata_set(KEY_HEAD_PARENT, rec["parent"])
                else:
                    img.metadata_remove(KEY_HEAD_PARENT)
            img.metadata_remove(KEY_SNAP + snapshot_uuid)
            log.info("snapshot deleted", extra={"volume": vol, "snapshot": snapshot_uuid})

    def rollback_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self._locked(vol), self.ioctx() as io:
            self.refuse_if_open(io, vol)
            with self.open_image(io, vol) as img:
                self._snap_meta(img, vol, snapshot_uuid)
                img.rollback_to_snap(snapshot_uuid)
                img.metadata_set(KEY_HEAD_PARENT, snapshot_uuid)
                log.info("rolled back", extra={"volume": vol, "snapshot": snapshot_uuid})
                return self.info_of(io, img, vol)

    def list_snapshots(self, volume_uuid: str) -> list[SnapshotInfo]:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io, self.open_image(io, vol, read_only=True) as img:
            snaps = self._snaps_meta(self._meta(img))
            existing = {s["name"] for s in img.list_snaps()}
            return sorted(
                (self._snap_info(img, vol, u, snaps) for u in snaps if u in existing), key=lambda s: s.created_at
            )

    def snapshot_tree(self, volume_uuid: str) -> SnapshotTree:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io, self.open_image(io, vol, read_only=True) as img:
            meta = self._meta(img)
            snaps = self._snaps_meta(meta)
        return build_tree(
            [(u, r["name"], r.get("parent"), r.get("created_at", 0)) for u, r in snaps.items()],
            meta.get(KEY_HEAD_PARENT),
        )

    # ---- extents ----

    @staticmethod
    def _fast_diff_ok(img) -> bool:
        return bool(img.features() & rbd.RBD_FEATURE_FAST_DIFF) and not (
            img.flags() & (rbd.RBD_FLAG_OBJECT_MAP_INVALID | rbd.RBD_FLAG_FAST_DIFF_INVALID)
        )

    @staticmethod
    def _extents(img, size: int, since: str | None, *, whole_object: bool, include_parent: bool) -> list[Extent]:
        out: list[Extent] = []

        def cb(offset, length, exists):
            # Since a snapshot, a range that no longer exists (discarded,
            # zeroed) changed too: leaving it out would keep the old data in
            # an incremental backup. Without one, only allocated data counts.
            if exists or since is not None:
                out.append(Extent(offset, length))
            return 0

        img.diff_iterate(0, size, since, cb, include_parent=include_parent, whole_object=whole_object)
        return merge_extents(out)

    def data_extents(self, volume_uuid: str, snapshot_uuid: str | None) -> list[AllocExtent]:
        vol = check_uuid(volume_uuid, "volume_uuid")
        if snapshot_uuid:
            check_uuid(snapshot_uuid, "snapshot_uuid")
        with self.ioctx() as io, self.open_image(io, vol, snapshot=snapshot_uuid, read_only=True) as img:
            return self.alloc_extents(img)

    def alloc_extents(self, img) -> list[AllocExtent]:
        size = img.size()
        data = self._extents(img, size, None, whole_object=False, include_parent=True)
        out: list[AllocExtent] = []
        pos = 0
        for e in data:
            if e.start > pos:
                out.append(AllocExtent(pos, e.start - pos, zero=True, hole=True))
            out.append(AllocExtent(e.start, e.length, zero=False, hole=False))
            pos = e.end
        if pos < size:
            out.append(AllocExtent(pos, size - pos, zero=True, hole=True))
        return out

    def changed_extents(self, volume_uuid: str, snapshot_uuid: str, since_snapshot_uuid: str | None) -> ChangedExtents:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io:
            with self.open_image(io, vol, read_only=True) as img:
                snaps = self._snaps_meta(self._meta(img))
                if check_uuid(snapshot_uuid, "snapshot_uuid") not in snaps:
                    raise NotFound(f"snapshot_uuid: no snapshot {snapshot_uuid} on volume {vol}", field="snapshot_uuid")
                if since_snapshot_uuid is not None:
                    since = check_uuid(since_snapshot_uuid, "since_snapshot_uuid")
                    if since not in snaps:
                        raise NotFound(
                            f"since_snapshot_uuid: no snapshot {since} on volume {vol}", field="since_snapshot_uuid"
                        )
                    cur = snaps[snapshot_uuid].get("parent")
                    while cur != since:
                        if cur is None:
                            raise FailedPrecondition(
                                f"since_snapshot_uuid: snapshot {since} is not an ancestor of snapshot {snapshot_uuid}",
                                field="since_snapshot_uuid",
                            )
                        cur = snaps.get(cur, {}).get("parent")
            with self.open_image(io, vol, snapshot=snapshot_uuid, read_only=True) as img:
                degraded = []
                for snap in filter(None, (since_snapshot_uuid, snapshot_uuid)):
                    img.set_snap(snap)
                    if self._tracking(img) == "degraded":
                        degraded.append(snap)
                img.set_snap(snapshot_uuid)
                fast = self._fast_diff_ok(img) and not degraded
                extents = self._extents(
                    img, img.size(), since_snapshot_uuid, whole_object=fast, include_parent=since_snapshot_uuid is None
                )
                note = ""
                if degraded:
                    note = (
                        f"the object map of snapshot {', '.join(degraded)} is invalid: changes found by a slow "
                        f"exact diff (repair: rbd object-map rebuild {self.rbd_pool}/{vol}@<snapshot>)"
                    )
                    log.warning("change tracking degraded", extra={"volume": vol, "why": note})
                return ChangedExtents(
                    extents, exact=not fast, granularity=(1 << img.stat()["order"]) if fast else 512, degraded=note
                )

    # ---- clones ----

    def linked_clone(
        self, source: RbdPool, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str
    ) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "clone_volume_uuid")
        check_name(name, "clone_dst_vol_name")
        if source.conn.target.ceph_conf != self.conn.target.ceph_conf:
            raise FailedPrecondition(
                "target_pool_uuid: a linked clone must be in the same Ceph cluster", field="target_pool_uuid"
            )
        with source.ioctx() as sio, self.ioctx() as dio:
            with source.open_image(sio, source_volume) as img:
                source._snap_meta(img, source_volume, snapshot_uuid)
                if not img.is_protected_snap(snapshot_uuid):
                    img.protect_snap(snapshot_uuid)  # clones need it; undone when the last clone goes
            try:
                rbd.RBD().clone(sio, source_volume, snapshot_uuid, dio, vol, features=self.features)
            except rbd.ImageExists:
                raise AlreadyExists(
                    f"clone_volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="clone_volume_uuid"
                ) from None
            with self.open_image(dio, vol) as img:
                self.stamp(img, name)
                log.info(
                    "linked clone created", extra={"volume": vol, "origin": source_volume, "snapshot": snapshot_uuid}
                )
                return self.info_of(dio, img, vol)

    def flatten(self, volume_uuid: str, *, on_percent=None, checkpoint=None) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self._locked(vol), self.ioctx() as io, self.open_image(io, vol) as img:
            try:
                spec = img.get_parent_image_spec()
            except rbd.ImageNotFound:
                raise FailedPrecondition(
                    f"volume_uuid: volume {vol} is not a linked clone", field="volume_uuid"
                ) from None
            cancelled = []

            def progress(offset, total):
                if on_percent and total:
                    on_percent(100.0 * offset / total)
                if checkpoint:
                    try:
                        checkpoint()
                    except Exception as e:  # cannot raise through librbd: ask it to stop
                        cancelled.append(e)
                        return -errno.ECANCELED
                return 0

            try:
                img.flatten(on_progress=progress)
            except rbd.OperationCanceled:
                raise cancelled[0] if cancelled else Cancelled("flatten cancelled") from None
            self._unprotect_if_unused(spec)
            log.info("clone flattened", extra={"volume": vol})
            return self.info_of(io, img, vol)

    def _unprotect_if_unused(self, spec: dict) -> None:
        """After the last clone of a snapshot leaves, unprotect it again."""
        try:
            cluster = self.conn.cluster()
            io = cluster.open_ioctx(spec["pool_name"])
            try:
                if spec.get("pool_namespace"):
                    io.set_namespace(spec["pool_namespace"])
                with rbd.Image(io, spec["image_name"], snapshot=spec["snap_name"]) as parent:
                    if not list(parent.list_children2()) and parent.is_protected_snap(spec["snap_name"]):
                        parent.unprotect_snap(spec["snap_name"])
            finally:
                io.close()
        except (rbd.Error, rados.Error) as e:
            log.warning("could not unprotect the origin snapshot", extra={"error": str(e)})

    def full_clone(
        self, source: RbdPool, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str, ctx
    ) -> tuple[VolumeInfo, int]:
        """A deep copy of a snapshot into a new image, through aio reads and
        writes; zero blocks are not written. The copy is made under a
        temporary name and renamed when complete; cancelled or failed, it is
        removed."""
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        tmp = f".{vol}.copy"
        with source.ioctx() as sio, self.ioctx() as dio:
            if vol in rbd.RBD().list(dio):
                raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
            with source.open_image(sio, source_volume, snapshot=snapshot_uuid, read_only=True) as src:
                size = src.size()
                data = self._extents(src, size, None, whole_object=False, include_parent=True)
                total = sum(e.length for e in data)
                try:
                    rbd.RBD().remove(dio, tmp)  # a leftover of an interrupted copy with this very id
                except rbd.ImageNotFound:
                    pass
                rbd.RBD().create(dio, tmp, size, old_format=False, features=self.features)
                try:
                    with self.open_image(dio, tmp) as dst:
                        ctx.progress(0, total, "copying")
                        done = 0
                        writer = RbdWriter(dst)

                        def on_data(offset, view):
                            nonlocal done
                            ctx.throttle(len(view))
                            writer.write_nonzero(view, offset)
                            done += len(view)
                            ctx.progress(done)

                        RbdReader(src).read_extents(data, on_data, checkpoint=ctx.checkpoint)
                        writer.finish()
                        self.stamp(dst, name)
                    ctx.checkpoint()
                    rbd.RBD().rename(dio, tmp, vol)
                except BaseException:
                    try:
                        rbd.RBD().remove(dio, tmp)
                    except (rbd.Error, rados.Error) as e:
                        log.error("could not remove a partial copy", extra={"image": tmp, "error": str(e)})
                    raise
            with self.open_image(dio, vol) as img:
                return self.info_of(dio, img, vol), total

    def volume_exists(self, volume_uuid: str) -> bool:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io:
            return vol in rbd.RBD().list(io)

    def image_digest(self, volume_uuid: str, snapshot_uuid: str | None, ctx=None):
        """bf-image-sha256-v1 of the live state or a snapshot, read with aio."""
        from agent.volumes.digest import digest_stream

        vol = check_uuid(volume_uuid, "volume_uuid")
        if snapshot_uuid:
            check_uuid(snapshot_uuid, "snapshot_uuid")
        with self.ioctx() as io, self.open_image(io, vol, snapshot=snapshot_uuid or None, read_only=True) as img:
            size = img.size()
            data = self._extents(img, size, None, whole_object=False, include_parent=True)
            return digest_stream(
                size,
                data,
                lambda ext, on_data, checkpoint: RbdReader(img).read_extents(ext, on_data, checkpoint=checkpoint),
                ctx,
            )

    @contextmanager
    def open_reader(self, volume_uuid: str, snapshot_uuid: str, only=None):
        """A snapshot through one read-only image handle (only: not needed)."""
        vol = check_uuid(volume_uuid, "volume_uuid")
        with (
            self.ioctx() as io,
            self.open_image(io, vol, snapshot=check_uuid(snapshot_uuid, "snapshot_uuid"), read_only=True) as img,
        ):
            yield RbdSnapshotReader(self, img)

    def check_not_in_use(self, volume_uuid: str) -> None:
        vol = check_uuid(volume_uuid, "volume_uuid")
        with self.ioctx() as io:
            self.refuse_if_open(io, vol)

    def open_overwrite_target(self, volume_uuid: str) -> RbdOverwriteTarget:
        return RbdOverwriteTarget(self, check_uuid(volume_uuid, "volume_uuid"))

    def open_restore_target(self, volume_uuid: str, name: str, capacity: int, job_id: str) -> RbdRestoreTarget:
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        if self.volume_exists(vol):
            raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
        return RbdRestoreTarget(self, vol, name, capacity)
