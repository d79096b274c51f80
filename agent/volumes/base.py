"""The volume-driver interface, shared by the qcow2 and RBD drivers, and the
typed objects it returns."""

from __future__ import annotations

import re
import threading
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from agent.errors import Busy, InvalidArgument, OutOfRange
from agent.extents import Extent
from agent.hypervisor.base import RunningVm

HEAD = "head"  # the live state in a snapshot tree
MAX_NAME = 255
MAX_CAPACITY = 1 << 50  # 1 PiB
_NAME_BAD = re.compile(r"[\x00-\x1f/\\]")


def check_capacity(capacity: int, field_name: str = "capacity") -> int:
    """A volume size every driver accepts: positive, 512-byte sectors, at most MAX_CAPACITY."""
    if capacity <= 0:
        raise InvalidArgument(f"{field_name}: must be positive, got {capacity}", field=field_name)
    if capacity > MAX_CAPACITY:
        raise OutOfRange(f"{field_name}: {capacity} exceeds the limit of {MAX_CAPACITY} bytes", field=field_name)
    if capacity % 512:
        raise InvalidArgument(f"{field_name}: must be a multiple of 512, got {capacity}", field=field_name)
    return capacity


def check_uuid(value: str, field_name: str) -> str:
    """A canonical UUID, so it is safe as a path component."""
    try:
        parsed = uuidlib.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise InvalidArgument(f"{field_name}: {value!r} is not a UUID", field=field_name) from None
    if str(parsed) != value.lower():
        raise InvalidArgument(f"{field_name}: {value!r} is not a canonical UUID", field=field_name)
    return str(parsed)


def check_name(value: str, field_name: str) -> str:
    """A display name: never used as a path, but still refused when it looks like one."""
    if not value or len(value) > MAX_NAME:
        raise InvalidArgument(f"{field_name}: must be 1-{MAX_NAME} characters", field=field_name)
    if _NAME_BAD.search(value) or value in (".", "..") or ".." in value.split("/"):
        raise InvalidArgument(
            f"{field_name}: {value!r} holds a path separator, '..' or a control character", field=field_name
        )
    if value == HEAD:
        raise InvalidArgument(f"{field_name}: {HEAD!r} is reserved for the live state", field=field_name)
    return value


@dataclass(frozen=True)
class SnapshotInfo:
    uuid: str
    name: str
    volume_uuid: str
    description: str
    created_at: float
    size: int  # bytes held by this snapshot alone
    parent: str | None  # parent snapshot uuid
    children: tuple[str, ...]  # child snapshot uuids, and "head" where the live state grows from it
    clones: tuple[str, ...]  # volume uuids of linked clones based on it
    tracking: str = "ok"  # "lost" when changes across this snapshot cannot be known exactly
    consistency: str = ""  # "application", "crash" or "offline" (no VM held it); "" before it was recorded
    vm_definition: str = ""  # the VM that held it (JSON, RunningVm.definition), "" when none did


@dataclass(frozen=True)
class SnapshotRequest:
    """One snapshot of a set (CreateSnapshotSet): a volume of any pool."""

    pool_uuid: str
    volume_uuid: str
    snapshot_uuid: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class SetInstant:
    """A set's instant that a caller holds for several drivers (a VM whose
    disks live in pools of two kinds): the VM is frozen (or not, said by
    consistency) and paused by the caller; a driver given one takes its
    snapshots on this VM's connection, without freezing or pausing."""

    vm: RunningVm  # connected
    consistency: str
    definition: str = ""


@dataclass(frozen=True)
class SnapshotSet:
    """Snapshots of a VM's disks taken at one point in time."""

    snapshots: tuple[SnapshotInfo, ...]
    consistency: str  # of every snapshot in the set
    vm: str  # the VM that held the volumes, "" when none did
    reason: str  # why the set is crash-consistent
    frozen_ms: float  # how long the guest's filesystems were frozen
    switch_ms: float  # the guest-visible switch to the new layers (the QMP transaction)
    vm_definition: str = ""  # how to start the VM again (RunningVm.definition), kept with each snapshot


@dataclass(frozen=True)
class VolumeInfo:
    uuid: str
    name: str
    pool_uuid: str
    capacity: int
    used: int  # allocated guest bytes of the live state (the seed's Used)
    snapshot_bytes: int  # bytes held by its snapshots (the seed's SnapLength)
    access_path: str
    created_at: float
    parent_volume: str | None = None  # linked clone: the volume and snapshot it is based on
    parent_snapshot: str | None = None
    children: tuple[str, ...] = ()  # linked clones of its snapshots
    format: str = "qcow2"
    tracking: str = "ok"  # change tracking of the live state


@dataclass(frozen=True)
class PoolStatus:
    pool_uuid: str
    kind: str
    status: str  # "healthy", "degraded" (it serves, with a reason in error) or "unreachable"
    total_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    error: str = ""
    owner: str = ""  # shared pools: the host holding the metadata owner lease
    hosts: tuple[str, ...] = ()  # shared pools: the hosts whose lease is renewed
    lapsed: tuple[str, ...] = ()  # shared pools: hosts whose lease stopped being renewed, unreleased


@dataclass(frozen=True)
class SnapshotTree:
    """The seed's shape, keyed by snapshot name: Parents maps each node
    (snapshots and "head") to its parent ("" for a root); Children maps each
    parent ("" for the roots) to its children; Root is the first root."""

    parents: dict[str, str] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    root: str = ""


@dataclass(frozen=True)
class ChangedExtents:
    extents: list[Extent]
    exact: bool  # False when the driver reports a superset (e.g. whole objects)
    granularity: int
    degraded: str = ""  # why they were found the slow way (an invalid RBD object map), for the record


Progress = Callable[[int, int], None]  # (done, total)


def build_tree(snapshots: list[tuple[str, str, str | None, float]], head_parent: str | None) -> SnapshotTree:
    """The seed's tree from (uuid, name, parent uuid, created_at) records."""
    names = {u: n for u, n, _, _ in snapshots}
    ordered = sorted(snapshots, key=lambda r: r[3])
    parents = {n: names.get(p, "") for _, n, p, _ in ordered}
    parents[HEAD] = names.get(head_parent, "")
    children: dict[str, list[str]] = {}
    for node, parent in parents.items():
        children.setdefault(parent, []).append(node)
    roots = [n for _, n, p, _ in ordered if not p]
    return SnapshotTree(parents=parents, children=children, root=roots[0] if roots else "")


class VolumeDriver(ABC):
    """One pool. Long operations take a progress callback and a checkpoint
    (which raises to cancel); the job engine supplies both."""

    pool_uuid: str
    kind: str  # the pool type of the config: "dir" or "rbd"
    _locks_guard = threading.Lock()

    @contextmanager
    def _locked(self, vol: str, wait: float = -1):
        """Serialise changes of one volume's metadata inside this agent (the
        job engine's resource locks keep jobs apart; this keeps RPC threads
        apart). wait: seconds at most (BUSY after), else as long as it takes."""
        with VolumeDriver._locks_guard:
            locks = self.__dict__.setdefault("_volume_locks", {})
            lock = locks.setdefault(vol, threading.RLock())
        if not lock.acquire(timeout=wait):
            raise Busy(f"volume_uuid: volume {vol} is being changed; try again", field="volume_uuid")
        try:
            yield
        finally:
            lock.release()

    @abstractmethod
    def create_volume(
        self, volume_uuid: str, name: str, capacity: int | None, backing_file: str | None = None
    ) -> VolumeInfo: ...

    @abstractmethod
    def delete_volume(self, volume_uuid: str, force: bool = False) -> None: ...

    @abstractmethod
    def volume_info(self, volume_uuid: str) -> VolumeInfo: ...

    @abstractmethod
    def list_volumes(self) -> list[VolumeInfo]: ...

    @abstractmethod
    def resize_volume(self, volume_uuid: str, capacity: int) -> VolumeInfo: ...

    @abstractmethod
    def create_snapshot(
        self, volume_uuid: str, snapshot_uuid: str, name: str, description: str = ""
    ) -> SnapshotInfo: ...

    def create_snapshot_set(
        self,
        requests: Sequence[SnapshotRequest],
        *,
        freeze: bool = True,
        freeze_timeout: float = 10.0,
        within: SetInstant | None = None,
    ) -> SnapshotSet:
        """Snapshots of a running VM's disks at one point in time (within:
        at the instant a caller holds). Drivers that cannot take one take a
        set of one volume."""
        if within is not None or len(requests) != 1 or requests[0].pool_uuid != self.pool_uuid:
            raise InvalidArgument(
                f"snapshots: pool {self.pool_uuid} ({self.kind}) takes one volume of its own per set",
                field="snapshots",
            )
        r = requests[0]
        info = self.create_snapshot(r.volume_uuid, r.snapshot_uuid, r.name, r.description)
        return SnapshotSet((info,), info.consistency, "", "", 0.0, 0.0)

    @abstractmethod
    def delete_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> None: ...

    @abstractmethod
    def rollback_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> VolumeInfo: ...

    @abstractmethod
    def list_snapshots(self, volume_uuid: str) -> list[SnapshotInfo]: ...

    @abstractmethod
    def snapshot_tree(self, volume_uuid: str) -> SnapshotTree: ...

    @abstractmethod
    def data_extents(self, volume_uuid: str, snapshot_uuid: str | None) -> list:
        """Data and zero extents of a snapshot (or the live state)."""

    @abstractmethod
    def changed_extents(self, volume_uuid: str, snapshot_uuid: str, since_snapshot_uuid: str | None) -> ChangedExtents:
        """What changed from since_snapshot to snapshot; raises
        TrackingLost when that cannot be known exactly."""

    @abstractmethod
    def snapshot_info(self, volume_uuid: str, snapshot_uuid: str) -> SnapshotInfo: ...

    @abstractmethod
    def pool_status(self) -> PoolStatus: ...

    @abstractmethod
    def volume_exists(self, volume_uuid: str) -> bool: ...

    @abstractmethod
    def image_digest(self, volume_uuid: str, snapshot_uuid: str | None, ctx=None):
        """bf-image-sha256-v1 of the live state or a snapshot (agent.volumes.digest.Digest)."""

    @abstractmethod
    def linked_clone(
        self, source: VolumeDriver, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str
    ) -> VolumeInfo:
        """A new volume in this pool that shares the snapshot's data (constant time)."""

    @abstractmethod
    def full_clone(
        self, source: VolumeDriver, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str, ctx
    ) -> tuple[VolumeInfo, int]:
        """An independent copy of a snapshot; returns it and the bytes copied.
        A cancelled or failed copy leaves no volume behind."""

    @abstractmethod
    def flatten(self, volume_uuid: str, *, on_percent=None, checkpoint=None) -> VolumeInfo:
        """Make a linked clone independent of its origin."""

    @abstractmethod
    def open_reader(self, volume_uuid: str, snapshot_uuid: str, only=None):
        """A context manager yielding a SnapshotReader of a snapshot.
        only=(size, [(start, length)]): the caller will read only these
        guest ranges of a snapshot it expects to be size bytes, and not ask
        for extents(); a driver may use it to map less (or ignore it)."""

    @abstractmethod
    def open_restore_target(self, volume_uuid: str, name: str, capacity: int, job_id: str) -> RestoreTarget:
        """A new volume to write a restore into. It does not exist as a
        volume until commit(); abort() (or a crash) leaves nothing that looks
        like one."""

    @abstractmethod
    def check_not_in_use(self, volume_uuid: str) -> None:
        """IN_USE while a client (a VM) has the volume open."""

    @abstractmethod
    def open_overwrite_target(self, volume_uuid: str) -> RestoreTarget:
        """The live volume, for a restore in place: refused (IN_USE) while a
        client (a VM) has it open. Its zero() writes zeros; commit() flushes;
        abort() only closes: the caller took a safety snapshot to roll back
        to."""


class SnapshotReader(ABC):
    """A snapshot opened for reading (one qemu-nbd, or one RBD image handle)."""

    @abstractmethod
    def size(self) -> int:
        """Virtual size of the snapshot in bytes."""

    @abstractmethod
    def extents(self) -> list:
        """Data and zero extents covering the whole snapshot (AllocExtent)."""

    @abstractmethod
    def read(self, extents, on_data, request_size: int, checkpoint=None) -> None:
        """Read extents in order, several requests in flight; on_data(offset,
        view) gets each piece (the view is valid during the call only,
        unless on_data holds it)."""

    def hold(self, view) -> Callable[[], None] | None:
        """Called inside on_data: keep the view valid after the call, without
        a copy. Returns the function that gives it back once used, or None
        when this reader cannot lend its buffers (then copy)."""
        return None


class RestoreTarget(ABC):
    """Where a restore writes: write() takes data at an offset (zero blocks
    inside it are skipped, the new volume reads as zeros there)."""

    concurrent = False  # True: write() may be called from several threads, in any order

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros (a new volume does already)."""

    @abstractmethod
    def write(self, offset: int, data) -> None: ...

    @abstractmethod
    def commit(self) -> VolumeInfo:
        """Flush, make the volume durable and visible; returns it."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written; safe to call more than once."""
