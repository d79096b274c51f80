"""The shared block pool's volume driver: qcow2 layers in slices of one LUN.

Every layer of a volume (its head, each snapshot) is a qcow2 image in a
slice of its own; each volume's metadata (the snapshot tree, the same
VolMeta as a directory pool's) is a small JSON document in a slice of kind
META. Layers are named by the slice table:

    layer id = the volume uuid for the head, the snapshot uuid for a snapshot
    parent   = the layer id it is backed by ("" for none; a linked clone's
               bottom layer names the origin's snapshot, in any volume)

qemu opens a layer as qcow2 over the raw driver's offset/size over the LUN
(host_device, locking off: many layers share one device), and always with
its whole backing chain spelled out from the table, never from the backing
strings in the headers (those are written too, for people and tools, and
stay true: a layer that is another's backing never moves or grows).

Snapshots, rollback, deletion and clones are the directory pool's
operations (agent.volumes.qcow2.driver) with renames replaced by slice
records: a snapshot allocates the new head under a temporary layer id, saves
the metadata, then renames the old head's slice to the snapshot and the new
one to the head; a crash at any point is finished or undone at the next
change of the volume (_repair). Slices are thick for now: each layer gets
what `qemu-img measure` says a fully allocated image of its size needs.

Only the pool's metadata owner (agent.volumes.lun.leases) changes the table
and the metadata; every host reads both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import tempfile
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager

from agent import procs
from agent.errors import (
    AlreadyExists,
    BlockferryError,
    Busy,
    DataCorrupt,
    FailedPrecondition,
    InUse,
    InvalidArgument,
    NoSpace,
    NotFound,
    TargetUnreachable,
    TrackingLost,
)
from agent.extents import AllocExtent, Extent, merge_extents
from agent.hypervisor.freeze import Freeze
from agent.hypervisor.qemu import QemuVm
from agent.hypervisor.qmp import Qmp
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
from agent.volumes.lun import format as fmt
from agent.volumes.lun.fence import FenceCommand
from agent.volumes.lun.format import SliceRecord
from agent.volumes.lun.leases import live_hosts
from agent.volumes.lun.membership import Membership
from agent.volumes.lun.peers import Geometry, Peers, SliceUse
from agent.volumes.lun.table import PoolLun, SliceTable, format_pool, read_superblock
from agent.volumes.lun.thin import ThinWatcher
from agent.volumes.nbd import NbdSnapshotReader, QemuNbd
from agent.volumes.qcow2 import qemu_img
from agent.volumes.qcow2.bitmap import dirty_extents
from agent.volumes.qcow2.direct import open_mapped_ranges
from agent.volumes.qcow2.driver import BITMAP, GRANULARITY, Qcow2OverwriteTarget, Qcow2RestoreTarget, freeze_tracking
from agent.volumes.qcow2.meta import TRACKING_LOST, TRACKING_OK, SnapMeta, VolMeta
from agent.volumes.qemu_objects import with_objects

log = logging.getLogger("agent.lun")

LEFTOVER_AGE = 600  # seconds before a slice no volume names counts as abandoned
MOVE_TIMEOUT = 600  # seconds a running head's move may hold off the volume's snapshots
_META_HEAD = struct.Struct("<8sQII")  # magic, generation, length, crc32 of the JSON
_META_MAGIC = b"BFVMETA1"


class LayerFile:
    """A layer's bytes read straight from its slice (the dirty-bitmap reader's ReadFile)."""

    def __init__(self, dev, rec: SliceRecord):
        self.dev, self.rec = dev, rec

    def pread(self, n: int, offset: int) -> bytes:
        n = max(0, min(n, self.rec.size - offset))
        start = offset // fmt.BLOCK * fmt.BLOCK
        end = fmt.align_up(offset + n, fmt.BLOCK)
        data = bytes(self.dev.read(self.rec.offset + start, end - start)) if n else b""
        return data[offset - start : offset - start + n]

    def close(self) -> None:
        pass


class _Layers:
    """open_ro(layer id) for qcow2.bitmap.dirty_extents."""

    def __init__(self, pool: LunPool, recs: list[SliceRecord]):
        self.pool, self.recs = pool, recs

    def open_ro(self, layer: str) -> LayerFile:
        return LayerFile(self.pool.table.lun.dev, self.pool._rec(self.recs, layer))


class LunPool(VolumeDriver):
    kind = "lun"
    membership: Membership | None = None

    @classmethod
    def open(
        cls,
        pool_uuid: str,
        dev,
        protocol: dict,
        *,
        host_uuid: str,
        run_dir: str,
        format_lun: bool = False,
        lease_timeout: float = 60.0,
        lease_io_timeout: float = 5.0,
        thin: bool = False,
        thin_step: int = 1 << 30,
        address: str = "",
        peers: Peers | None = None,
        fence_command: Sequence[str] = (),
    ) -> LunPool:
        """The pool on an opened block device (agent.stores.blockdev: a
        local device, or an iSCSI LUN through libiscsi) that qemu reaches
        through protocol, formatted first when blank and format_lun, with
        this host's membership started. The device is closed on failure."""
        try:
            try:
                lun = PoolLun(dev, pool_uuid)
            except DataCorrupt:
                if not format_lun:
                    raise FailedPrecondition(
                        f"device: {dev.label} holds no blockferry pool; set format_lun to format it (only a blank "
                        "LUN is formatted)",
                        field="device",
                    ) from None
                format_pool(dev, pool_uuid)
                lun = PoolLun(dev, pool_uuid)
            if lease_timeout <= 3 * lease_io_timeout:
                raise InvalidArgument(
                    f"lease_timeout: {lease_timeout}s must exceed 3 x lease_io_timeout ({lease_io_timeout}s)",
                    field="lease_timeout",
                )
            member = Membership(
                lun,
                host_uuid,
                timeout=lease_timeout,
                io_timeout=lease_io_timeout,
                address=address,
                fence=FenceCommand(list(fence_command), pool_uuid) if fence_command else None,
            )
        except BaseException:
            dev.close()
            raise
        pool = cls(
            pool_uuid,
            SliceTable(lun, guard=member.guard),
            protocol,
            run_dir=run_dir,
            owner=member.owner,
            label=f"pool {pool_uuid} ({dev.label})",
            thin=thin,
            thin_step=thin_step,
        )
        member.on_lost = pool._lease_lost
        pool.peers = peers
        pool.membership = member.start()
        if thin:
            pool.watcher.start()
        return pool

    @property
    def is_owner(self) -> bool:
        return self.membership is None or self.membership.is_owner

    def owner_address(self) -> str:
        """Where the metadata owner's agent answers, for changes asked here."""
        return self.membership.owner_address() if self.membership is not None else ""

    def _lease_lost(self, why: str) -> None:
        """A lease this host held could not be renewed: the VMs writing into
        the pool here stop, so none writes a slice another owner may move."""
        self.watcher.pause_all(why)

    def close(self) -> None:
        """Leave the pool: both leases released (a successor need not wait)."""
        if "password-secret" in self.protocol:
            from agent.volumes.qemu_objects import remove

            remove(self.protocol["password-secret"])
        self.watcher.stop()
        if self.membership is not None:
            vms = self.watcher.pool_vms()
            if vms:
                log.warning(
                    "leaving the pool while VMs here still use it: the host lease is handed over, not released; "
                    "the other hosts' changes of heads wait until this agent is back",
                    extra={"pool": self.pool_uuid, "vms": len(vms)},
                )
            self.membership.stop(vms_left=bool(vms))
            self.membership = None
        self.table.lun.dev.close()

    def __init__(
        self,
        pool_uuid: str,
        table: SliceTable,
        protocol: dict,
        *,
        run_dir: str,
        owner: Callable[[], str] = lambda: "",
        label: str = "",
        thin: bool = False,
        thin_step: int = 1 << 30,
    ):
        """table: the pool's slice table (its guard: this host's owner
        lease); protocol: the qemu protocol node that reaches the LUN on this
        host ({"driver": "host_device", "filename": ...} or an iscsi node);
        owner(): who the metadata owner is, for errors on other hosts."""
        self.pool_uuid = check_uuid(pool_uuid, "pool_uuid")
        self.table = table
        if protocol.get("driver") == "host_device":
            # every layer shares the device, so no whole-device lock; O_DIRECT:
            # other hosts write the same LUN, a page cache here would go stale
            protocol = dict(protocol, locking="off", cache={"direct": True})
        self.protocol = protocol
        self.run_dir = run_dir
        self.owner = owner
        self.label = label or f"pool {pool_uuid}"
        self.thin = thin
        self.thin_step = fmt.align_up(max(thin_step, table.sb.extent_size), table.sb.extent_size)
        self._full: dict[tuple[int, int], int] = {}
        self._swept = 0.0  # when abandoned slices were last looked for
        self.leftover_age = LEFTOVER_AGE
        self._inflight: set[str] = set()  # layer ids (or volumes) being written by this host: never swept
        self.freeze_timeout = 10.0  # seconds the guest agent gets to freeze a live snapshot's filesystems
        self.watcher = ThinWatcher(self)
        self.peers: Peers | None = None  # the other hosts of the pool (agent/services/pool_peers.py)
        self._moving: dict[str, float] = {}  # volume -> when a running head's move began (owner)

    def is_own_protocol(self, node: dict) -> bool:
        """Whether a qemu protocol node (as qemu reports it) is this pool's LUN."""
        mine = self.protocol
        if node.get("driver") != mine.get("driver"):
            return False
        if mine.get("driver") == "host_device":
            return os.path.realpath(str(node.get("filename", ""))) == os.path.realpath(mine["filename"])
        return all(str(node.get(k)) == str(mine.get(k)) for k in ("portal", "target", "lun"))

    def capacity_of(self, rec: SliceRecord) -> int:
        """The virtual size of the layer in a slice."""
        return qemu_img.info(self._backing_string(rec) or "").virtual_size

    def full_size(self, rec: SliceRecord) -> int:
        """The thick size of a layer's slice (for its virtual size)."""
        key = (rec.slot, rec.generation)
        if key not in self._full:
            self._full[key] = fmt.align_up(self._slice_size(self.capacity_of(rec)), self.table.sb.extent_size)
        return self._full[key]

    def _head_size(self, capacity: int) -> int:
        """A new head's slice: thick, or thin (what an empty image needs,
        plus one grow step; never more than thick)."""
        full = self._slice_size(capacity)
        if not self.thin:
            return full
        return min(full, self._measure(capacity)[0] + capacity // (GRANULARITY * 8) + 65536 + self.thin_step)

    # ---- names ----

    def _node(self, rec: SliceRecord) -> dict:
        return {
            "driver": "qcow2",
            "file": {"driver": "raw", "offset": rec.offset, "size": rec.size, "file": self.protocol},
        }

    def _chain(self, recs: list[SliceRecord], rec: SliceRecord) -> dict:
        node = self._node(rec)
        node["backing"] = self._chain(recs, self._rec(recs, rec.parent)) if rec.parent else None
        return node

    def _name(self, recs: list[SliceRecord], layer: str) -> str:
        """What qemu opens for a layer: the qcow2 with its chain from the table."""
        return "json:" + json.dumps(self._chain(recs, self._rec(recs, layer)), separators=(",", ":"))

    def _top(self, recs: list[SliceRecord], layer: str) -> str:
        """A layer alone, no backing: what qemu-img info, bitmap and resize
        take (they open images without their chain)."""
        return self._backing_string(self._rec(recs, layer)) or ""

    def _backing_string(self, rec: SliceRecord | None) -> str | None:
        return "json:" + json.dumps(self._node(rec), separators=(",", ":")) if rec else None

    def _rec(self, recs: list[SliceRecord], layer: str, kind: int = fmt.LAYER) -> SliceRecord:
        for r in recs:
            if r.used and r.kind == kind and r.layer == layer:
                return r
        raise NotFound(f"{self.label}: no slice holds layer {layer}")

    def _records_with(self, layer: str, tries: int = 5) -> list[SliceRecord]:
        """The table, once it names layer: a snapshot or a move renames two
        slices one after the other (about a millisecond apart), and a reader
        in between would find no head."""
        for _ in range(tries - 1):
            recs = self.table.records()
            if any(r.used and r.kind == fmt.LAYER and r.layer == layer for r in recs):
                return recs
            time.sleep(0.02)
        return self.table.records()

    def check_geometry(self, rec: SliceRecord) -> SliceRecord:
        """The slot as the table has it now; FailedPrecondition when its
        geometry changed since rec was read (it must be opened again)."""
        now = self.table.records()[rec.slot]
        if now.generation != rec.generation or (now.offset, now.size) != (rec.offset, rec.size):
            raise FailedPrecondition(
                f"{self.label}: layer {rec.layer} moved or grew (slice {rec.slot} generation "
                f"{rec.generation} -> {now.generation}); open it again"
            )
        return now

    # ---- metadata slices ----

    def _meta_rec(self, recs: list[SliceRecord], vol: str) -> SliceRecord | None:
        for r in recs:
            if r.used and r.kind == fmt.META and r.volume == vol:
                return r
        return None

    def _read_meta(self, rec: SliceRecord) -> tuple[VolMeta, int] | None:
        half = rec.size // 2
        best = None
        for base in (rec.offset, rec.offset + half):
            raw = bytes(self.table.lun.dev.read(base, fmt.BLOCK))
            magic, gen, length, crc = _META_HEAD.unpack_from(raw)
            if magic != _META_MAGIC or length > half - _META_HEAD.size:
                continue
            total = fmt.align_up(_META_HEAD.size + length, fmt.BLOCK)
            if total > fmt.BLOCK:
                raw = bytes(self.table.lun.dev.read(base, total))
            body = raw[_META_HEAD.size : _META_HEAD.size + length]
            if zlib.crc32(body) & 0xFFFFFFFF != crc:
                continue
            if best is None or gen > best[1]:
                best = (body, gen)
        if best is None:
            return None
        d = json.loads(best[0])
        if d.get("uuid") != rec.volume:
            return None  # what an earlier user of this range left, not this volume's
        known = {f.name for f in dataclasses.fields(SnapMeta)}
        snaps = [SnapMeta(**{k: v for k, v in s.items() if k in known}) for s in d.pop("snapshots", [])]
        return VolMeta(snapshots=snaps, **d), best[1]

    def _write_meta(self, rec: SliceRecord, meta: VolMeta, generation: int) -> None:
        """Into the half the previous generation is not in: a torn write
        leaves the previous one readable."""
        self._must_own()
        body = json.dumps(dataclasses.asdict(meta), sort_keys=True).encode()
        half = rec.size // 2
        if _META_HEAD.size + len(body) > half:
            raise NoSpace(f"{self.label}: volume {meta.uuid}'s metadata outgrew its slice")
        data = _META_HEAD.pack(_META_MAGIC, generation, len(body), zlib.crc32(body) & 0xFFFFFFFF) + body
        data += b"\0" * (fmt.align_up(len(data), fmt.BLOCK) - len(data))
        self.table.lun.dev.write(rec.offset + (generation % 2) * half, data)
        self.table.lun.dev.flush()

    def _meta(self, vol: str, recs: list[SliceRecord] | None = None) -> VolMeta:
        vol = check_uuid(vol, "volume_uuid")
        recs = recs if recs is not None else self.table.records()
        rec = self._meta_rec(recs, vol)
        got = self._read_meta(rec) if rec else None
        if got is None:
            raise NotFound(f"volume_uuid: no volume {vol} in pool {self.pool_uuid}", field="volume_uuid")
        return got[0]

    def _save(self, meta: VolMeta) -> None:
        recs = self.table.records()
        rec = self._meta_rec(recs, meta.uuid)
        if rec is None:
            rec = self.table.allocate(fmt.MIN_EXTENT, kind=fmt.META, volume=meta.uuid, layer=meta.uuid, from_end=True)
            for base in (rec.offset, rec.offset + rec.size // 2):  # no older document of the range survives
                self.table.lun.dev.write(base, bytes(fmt.BLOCK))
            gen = 1
        else:
            got = self._read_meta(rec)
            gen = got[1] + 1 if got else 1
        self._write_meta(rec, meta, gen)

    def _snap(self, meta: VolMeta, snap: str) -> SnapMeta:
        return meta.snap(check_uuid(snap, "snapshot_uuid"))

    def settle_owner(self) -> None:
        """Wait out an election in progress: no host holds the owner lease
        yet, or this one is taking it (the pool was just attached); it
        takes 2 x io_timeout."""
        m = self.membership
        if m is not None and not m.is_owner and m.candidate and self.owner() in ("", m.host_uuid):
            m.wait_owner(4 * m.io_timeout + 1)

    def _must_own(self) -> None:
        """FailedPrecondition unless this host holds the pool's owner lease now."""
        self.settle_owner()
        try:
            if self.table.guard is None:
                raise FailedPrecondition("no owner lease")
            self.table.guard()
        except FailedPrecondition as e:
            owner = self.owner()
            raise FailedPrecondition(
                f"pool_uuid: this host is not the metadata owner of pool {self.pool_uuid}"
                + (f" (host {owner} is)" if owner else "")
                + f"; volumes are created and changed there ({e.message})",
                field="pool_uuid",
            ) from None

    # ---- the other hosts: who has a slice open, switches and moves asked of the owner ----

    @property
    def host_uuid(self) -> str:
        return self.membership.host_uuid if self.membership is not None else ""

    def _other_hosts(self) -> dict[str, str]:
        """Host uuid -> agent address, for the other hosts with a live host
        lease that this owner has not fenced (a fenced host cannot write)."""
        m = self.membership
        if m is None:
            return {}
        return {
            h: r.address
            for h, r in live_hosts(self.table.lun).items()
            if h != self.host_uuid and not m.fenced(h, r.generation)
        }

    def local_slice_users(self, offsets: list[int]) -> list[SliceUse]:
        """This host's running VMs with a node over these slices."""
        out = []
        for offset, sock, holder in self.watcher.slice_users(offsets):
            out.append(SliceUse(self.host_uuid, offset, QemuVm.name_of(holder.pid, holder.argv, sock), sock))
        return out

    def slice_users(self, offsets: list[int]) -> list[SliceUse]:
        """Every running VM with a node over these slices: this host's, and
        those of every other host with a live lease (asked through its
        agent). A live host that cannot be asked makes it unknowable:
        TARGET_UNREACHABLE, and the change waits."""
        if self.membership is not None and (lapsed := self.membership.unfenced()):
            raise TargetUnreachable(
                f"pool_uuid: host {', '.join(lapsed)} stopped renewing its lease on pool {self.pool_uuid} "
                "and is not fenced yet (fence_command failed): its VMs may still write; the change waits",
                field="pool_uuid",
            )
        if self.membership is not None and (away := self.membership.handed_over()):
            raise TargetUnreachable(
                f"pool_uuid: the agent of host {', '.join(away)} stopped while VMs there used pool "
                f"{self.pool_uuid}: they may write any head; the change waits until that agent is back "
                "(or the host is fenced)",
                field="pool_uuid",
            )
        out = self.local_slice_users(offsets)
        for host, address in sorted(self._other_hosts().items()):
            if self.peers is None or not address:
                raise TargetUnreachable(
                    f"pool_uuid: host {host} holds a live lease on pool {self.pool_uuid} but cannot be asked "
                    "whether its VMs have the volume open (its agent gave no address, or this agent has no "
                    "[grpc] tls_cert to reach it)",
                    field="pool_uuid",
                )
            try:
                out += self.peers.slice_users(address, self.pool_uuid, offsets)
            except BlockferryError as e:
                raise TargetUnreachable(
                    f"pool_uuid: host {host} holds a live lease on pool {self.pool_uuid} but did not say whether "
                    f"its VMs have the volume open: {e.message}",
                    field="pool_uuid",
                ) from None
        return out

    def slice_as_seen(self, g: Geometry, what: str) -> SliceRecord:
        """The slice another host named, refused when it changed since."""
        rec = self.table.records()[g.slot] if 0 <= g.slot < self.table.lun.sb.table_slots else None
        if rec is None or not rec.used or (rec.generation, rec.offset, rec.size) != (g.generation, g.offset, g.size):
            raise FailedPrecondition(
                f"{what}: slice {g.slot} changed since it was read (generation {g.generation}): stale geometry",
                field=what,
            )
        return rec

    def switch_here(
        self, qmp: str, switches: list[tuple[Geometry, Geometry, str]], *, freeze: bool, timeout: float
    ) -> tuple[Freeze, float]:
        """A live snapshot's switch in a VM on this host, which the owner
        prepared (the new layers are written and in the table)."""
        holder = self.watcher.vm(qmp)
        if holder is None:
            raise NotFound(f"qmp: no running VM on this host answers at {qmp}", field="qmp")
        items = [(self.slice_as_seen(h, "head"), self.slice_as_seen(o, "overlay"), b) for h, o, b in switches]
        return self._switch_frozen((qmp, holder), items, freeze, timeout)

    def _moves_began(self, vol: str) -> bool:
        began = self._moving.get(vol)
        return began is not None and time.monotonic() - began < MOVE_TIMEOUT

    def grow_running(self, rec: SliceRecord, size: int) -> SliceRecord | None:
        """A running head's slice grown in place to size (None: boxed in).
        Asked of the owner when this host is not it; the record as the table
        has it now is returned (a snapshot or move may have changed it)."""
        if not self.is_owner:
            if self._owner_peers().grow(self.owner_address(), self.pool_uuid, Geometry.of(rec), size) == "boxed":
                return None
            return self.table.records()[rec.slot]
        return self.grow_as_owner(rec, size)

    def grow_as_owner(self, rec: SliceRecord, size: int) -> SliceRecord | None:
        """The owner's part of grow_running. A volume being changed (a
        snapshot asking the VM's host to switch) is not waited for: the
        record comes back as it is, and the next pass tries again."""
        try:
            with self._locked(rec.volume, wait=1.0):
                self._must_own()
                now = self.table.records()[rec.slot]
                if not now.used or now.layer != rec.volume or now.offset != rec.offset or now.size >= size:
                    return now
                try:
                    return self.table.grow(rec.slot, size)
                except NoSpace:
                    return None
        except Busy:
            return self.table.records()[rec.slot]

    def begin_move(self, rec: SliceRecord, size: int) -> SliceRecord | None:
        """A new slice of size holding an empty layer over the running
        head's parent, for the VM's host to mirror the head into (None: no
        room anywhere). Snapshots of the volume wait until end_move."""
        if not self.is_owner:
            g = self._owner_peers().begin_move(self.owner_address(), self.pool_uuid, Geometry.of(rec), size)
            return None if g is None else self.slice_as_seen(g, "target")
        return self.begin_move_as_owner(rec, size)

    def begin_move_as_owner(self, rec: SliceRecord, size: int) -> SliceRecord | None:
        with self._locked(rec.volume):
            self._must_own()
            self.slice_as_seen(Geometry.of(rec), "head")
            try:
                new = self.table.allocate(
                    size, kind=fmt.LAYER, volume=rec.volume, layer=f"{uuidlib.uuid4()}", parent=rec.parent
                )
            except NoSpace:
                return None
            self._moving[rec.volume] = time.monotonic()
            try:
                recs = self.table.records()
                parent = next((r for r in recs if r.used and r.kind == fmt.LAYER and r.layer == rec.parent), None)
                self._new_layer(new, self.capacity_of(rec), parent)
            except BaseException:
                self._moving.pop(rec.volume, None)
                self.table.release(new.slot)
                raise
            return self.table.records()[new.slot]

    def end_move(self, rec: SliceRecord, new: SliceRecord, *, done: bool) -> SliceRecord:
        """The VM writes the new slice now (done: the old one is released and
        the new one becomes the head), or the move failed (the new one is
        released). Returns the head's record."""
        if not self.is_owner:
            self._owner_peers().end_move(
                self.owner_address(), self.pool_uuid, Geometry.of(rec), Geometry.of(new), done=done
            )
            return self.table.records()[new.slot if done else rec.slot]
        return self.end_move_as_owner(rec, new, done=done)

    def end_move_as_owner(self, rec: SliceRecord, new: SliceRecord, *, done: bool) -> SliceRecord:
        with self._locked(rec.volume):
            self._must_own()
            try:
                self.slice_as_seen(Geometry.of(rec), "head")
                self.slice_as_seen(Geometry.of(new), "target")
                if not done:
                    self.table.release(new.slot)
                    return self.table.records()[rec.slot]
                self.table.release(rec.slot)
                return self.table.update(new.slot, layer=rec.volume)
            finally:
                self._moving.pop(rec.volume, None)

    def _owner_peers(self) -> Peers:
        if self.peers is None or not self.owner_address():
            raise FailedPrecondition(
                f"pool_uuid: this host is not the metadata owner of pool {self.pool_uuid} and cannot ask the owner "
                "(no address, or no [grpc] tls_cert here)",
                field="pool_uuid",
            )
        return self.peers

    # ---- layers ----

    def _measure(self, capacity: int) -> tuple[int, int]:
        """qemu-img measure of a new qcow2 of capacity: (required when empty, fully allocated)."""
        argv = ["qemu-img", "measure", "--output=json", "-O", "qcow2", "-o", "cluster_size=65536"]
        out = procs.run(with_objects(argv + ["--size", str(capacity)]), timeout=60, what="qemu-img measure").stdout
        d = json.loads(out)
        return d["required"], d["fully-allocated"]

    def _slice_size(self, capacity: int) -> int:
        """A thick layer: what qemu-img measure says a fully allocated image
        needs, plus its dirty bitmap and one extent of headroom."""
        full = self._measure(capacity)[1]
        bitmap = capacity // (GRANULARITY * 8) + 65536
        return full + bitmap + self.table.sb.extent_size

    def _new_layer(self, rec: SliceRecord, capacity: int, backing: SliceRecord | None) -> None:
        """Write an empty qcow2 (with its enabled dirty bitmap) into a slice:
        made as a small local file, then copied in whole (zeros too, so
        nothing a slice held before shows through its metadata)."""
        os.makedirs(self.run_dir, mode=0o750, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.run_dir, prefix="lun-layer-") as tmp:
            path = os.path.join(tmp, "layer.qcow2")
            qemu_img.create(path, capacity, backing=self._backing_string(backing), unsafe=True)
            qemu_img.bitmap(path, "add", BITMAP)
            if os.path.getsize(path) > rec.size:
                raise NoSpace(f"{self.label}: a layer of {capacity} bytes does not fit its slice of {rec.size}")
            procs.run(
                with_objects(
                    ["qemu-img", "convert", "-n", "-f", "raw", path, "--target-image-opts"]
                    + [self._raw_opts(rec, os.path.getsize(path))]
                ),
                timeout=600,
                what="qemu-img convert (new layer)",
            )

    def _raw_opts(self, rec: SliceRecord, size: int) -> str:
        return _opts(
            {"driver": "raw", "offset": rec.offset, "size": fmt.align_up(size, fmt.BLOCK), "file": self.protocol}
        )

    def _make_volume(self, meta: VolMeta, head: SliceRecord, capacity: int, backing: SliceRecord | None) -> None:
        """A new volume's head layer written into its slice, then its
        metadata: from then on it exists. The slice is kept from the sweep
        meanwhile, and released if either step fails."""
        self._inflight.add(meta.uuid)
        try:
            self._new_layer(head, capacity, backing)
            self._save(meta)
        except BaseException:
            self.table.release(head.slot)
            raise
        finally:
            self._inflight.discard(meta.uuid)

    def _repair(self, meta: VolMeta) -> None:
        """Finish or undo what a crash interrupted: slices of the volume
        whose layer id is neither the head's nor a snapshot's. What a
        running VM (on any host of the pool) has open decides for live operations: a VM
        that switched to the new slice (a live snapshot, a move) rolls the
        operation forward, one that did not rolls it back, and a slice a VM
        has open is never released."""
        recs = self.table.records()
        known = {meta.uuid} | {s.uuid for s in meta.snapshots}
        mine = [r for r in recs if r.used and r.kind == fmt.LAYER and r.volume == meta.uuid]
        for t in [r for r in mine if r.layer not in known]:
            recs = self.table.records()
            head = next((r for r in recs if r.used and r.kind == fmt.LAYER and r.layer == meta.uuid), None)
            by_layer = {r.layer for r in recs if r.used and r.kind == fmt.LAYER}
            t_open = bool(self.slice_users([t.offset]))
            p = t.parent
            s = meta.snapshot(p) if p else None
            if s is not None and p not in by_layer and head is not None:
                # a snapshot whose metadata was saved; its layer is still named the head
                if not t_open and self.slice_users([head.offset]):
                    # a running VM never switched to the new layer: the snapshot is taken back
                    meta.snapshots.remove(s)
                    meta.head_parent = s.parent
                    self._save(meta)
                    self.table.release(t.slot)
                    log.warning("took back a live snapshot the VM never switched to", extra={"snapshot": p})
                    continue
                self.table.update(head.slot, layer=p)
                head = None
                log.warning("finished an interrupted snapshot", extra={"volume": meta.uuid, "snapshot": p})
            head_open = head is not None and bool(self.slice_users([head.offset]))
            if (p or None) == meta.head_parent and head_open and t_open:
                # a move whose mirror has not switched the VM yet: neither slice may go
                log.error(
                    "a running VM has both the head and a new slice open (a move in progress?): left as it is",
                    extra={"volume": meta.uuid, "slot": t.slot},
                )
                continue
            switched = head is None or (head.parent or None) != meta.head_parent or (t_open and not head_open)
            if (p or None) == meta.head_parent and switched:
                # a snapshot, rollback or move whose new head stands (a VM writes it, or the old is gone)
                if head is not None:
                    self.table.release(head.slot)
                self.table.update(t.slot, layer=meta.uuid)
                log.warning("finished an interrupted head switch", extra={"volume": meta.uuid})
            elif t_open:
                log.error(
                    "a slice no volume names is open in a running VM: left as it is",
                    extra={"volume": meta.uuid, "slot": t.slot},
                )
            else:  # an operation that never saved its metadata
                self.table.release(t.slot)
                log.warning("removed a slice an interrupted operation left", extra={"volume": meta.uuid})

    # ---- volumes ----

    def volume_uuids(self) -> list[str]:
        return sorted({r.volume for r in self.table.records() if r.used and r.kind == fmt.META})

    def volume_exists(self, volume_uuid: str) -> bool:
        vol = check_uuid(volume_uuid, "volume_uuid")
        recs = self.table.records()
        rec = self._meta_rec(recs, vol)
        return rec is not None and self._read_meta(rec) is not None

    def create_volume(
        self, volume_uuid: str, name: str, capacity: int | None, backing_file: str | None = None
    ) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        if backing_file:
            raise InvalidArgument(
                f"backing_file: pool {self.pool_uuid} is a shared LUN; a host's file cannot be the base of its "
                "volumes; import it with a full copy instead",
                field="backing_file",
            )
        if capacity is None:
            raise InvalidArgument("capacity: required", field="capacity")
        check_capacity(capacity)
        self._must_own()
        with self._locked(vol):
            if self.volume_exists(vol):
                raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
            meta = VolMeta(uuid=vol, name=name, created_at=time.time())
            head = self.table.allocate(self._head_size(capacity), kind=fmt.LAYER, volume=vol, layer=vol)
            self._make_volume(meta, head, capacity, None)
            log.info("volume created", extra={"pool": self.pool_uuid, "volume": vol, "slice": head.slot})
            return self._info(meta)

    def delete_volume(self, volume_uuid: str, force: bool = False) -> None:
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            clones = meta.clones_blocking_delete(force)
        for clone in clones:
            self.flatten(clone.split("/")[1])
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            if meta.parent_volume:
                self._forget_clone(meta)
            recs = self.table.records()
            head = next((r for r in recs if r.used and r.kind == fmt.LAYER and r.layer == meta.uuid), None)
            if head is not None:
                self._idle(meta.uuid, head, "a delete")
            meta_rec = self._meta_rec(recs, meta.uuid)
            if meta_rec is not None:
                self.table.release(meta_rec.slot)  # the volume is gone from here on
            for r in recs:
                if r.used and r.kind == fmt.LAYER and r.volume == meta.uuid:
                    self.table.release(r.slot)
            log.info("volume deleted", extra={"pool": self.pool_uuid, "volume": meta.uuid})

    def _forget_clone(self, meta: VolMeta) -> None:
        with self._locked(meta.parent_volume):
            try:
                origin = self._meta(meta.parent_volume)
            except NotFound:
                return
            snap = origin.snapshot(meta.parent_snapshot)
            key = f"{self.pool_uuid}/{meta.uuid}"
            if snap and key in snap.clones:
                snap.clones.remove(key)
                self._save(origin)

    def volume_info(self, volume_uuid: str) -> VolumeInfo:
        return self._info(self._meta(volume_uuid))

    def _info(self, meta: VolMeta) -> VolumeInfo:
        recs = self._records_with(meta.uuid)
        name = self._name(recs, meta.uuid)
        info = qemu_img.info(self._top(recs, meta.uuid))
        tracking = TRACKING_LOST
        if meta.head_tracking == TRACKING_OK:
            bm = info.bitmap(BITMAP)
            tracking = TRACKING_OK if bm is not None and bm.consistent else TRACKING_LOST
        snap_ids = {s.uuid for s in meta.snapshots}
        return VolumeInfo(
            uuid=meta.uuid,
            name=meta.name,
            pool_uuid=self.pool_uuid,
            capacity=info.virtual_size,
            used=qemu_img.allocated_data(name),
            snapshot_bytes=sum(r.size for r in recs if r.used and r.kind == fmt.LAYER and r.layer in snap_ids),
            access_path=name,
            created_at=meta.created_at,
            parent_volume=meta.parent_volume,
            parent_snapshot=meta.parent_snapshot,
            children=tuple(c.split("/")[1] for s in meta.snapshots for c in s.clones),
            format="qcow2",
            tracking=tracking,
        )

    def list_volumes(self) -> list[VolumeInfo]:
        out = []
        for vol in self.volume_uuids():
            try:
                out.append(self.volume_info(vol))
            except NotFound:
                continue
        return out

    def resize_volume(self, volume_uuid: str, capacity: int) -> VolumeInfo:
        check_capacity(capacity)
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            self._repair(meta)
            recs = self.table.records()
            current = qemu_img.info(self._top(recs, meta.uuid)).virtual_size
            if capacity < current:
                raise InvalidArgument(
                    f"capacity: shrinking from {current} to {capacity} bytes would lose data; only growing is "
                    "supported",
                    field="capacity",
                )
            if capacity > current:
                head = self._rec(recs, meta.uuid)
                self._idle(meta.uuid, head, "a resize")
                # thick: the new full size; thin: room for the larger metadata, the data grows later
                want = max(head.size, self._head_size(capacity)) if self.thin else self._slice_size(capacity)
                if want > head.size:
                    try:
                        self.table.grow(head.slot, want)
                    except NoSpace:  # the next slice is in the way: move the head
                        self._relocate(meta, head, want)
                qemu_img.resize(self._top(self.table.records(), meta.uuid), capacity)
            return self._info(meta)

    def _make_room(self, meta: VolMeta, rec: SliceRecord) -> SliceRecord:
        """A layer's slice at its thick size before data is merged into it
        (a snapshot delete, a flatten): grown in place, or for an idle head
        moved; a snapshot layer that cannot grow in place (others are backed
        by it at its place) is refused before anything changes."""
        full = self.full_size(rec)
        if rec.size >= full:
            return rec
        try:
            return self.table.grow(rec.slot, full)
        except NoSpace:
            if rec.layer != meta.uuid:
                raise NoSpace(
                    f"snapshot_uuid: layer {rec.layer} of volume {meta.uuid} needs {full} bytes to take in the "
                    f"data being merged and cannot grow where it is ({rec.size} bytes)",
                    field="snapshot_uuid",
                ) from None
            return self._relocate(meta, rec, full)

    def _relocate(self, meta: VolMeta, head: SliceRecord, size: int) -> SliceRecord:
        """Move an idle head to a new slice of size bytes: copied whole, then
        the old slice released and the new one named the head (a crash in
        between is finished or undone by _repair; no layer is backed by a
        head, so no backing string names the old place)."""
        tmp = self.table.allocate(
            size, kind=fmt.LAYER, volume=meta.uuid, layer=str(uuidlib.uuid4()), parent=head.parent
        )
        try:
            dev, step = self.table.lun.dev, 4 << 20
            for pos in range(0, head.size, step):
                n = min(step, head.size - pos)
                dev.write(tmp.offset + pos, bytes(dev.read(head.offset + pos, n)))
            dev.flush()
            self.check_geometry(head)
        except BaseException:
            self.table.release(tmp.slot)
            raise
        self.table.release(head.slot)
        moved = self.table.update(tmp.slot, layer=meta.uuid)
        log.info("head moved to a larger slice", extra={"volume": meta.uuid, "from": head.offset, "to": moved.offset})
        return moved

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
        """Snapshots of volumes of this pool at one instant. Idle heads are
        snapshotted as they are; heads a running VM on this host holds
        switch to their new layers in one QMP transaction, with the guest's
        filesystems frozen through its agent around it when it answers."""
        if within is not None or not requests or any(r.pool_uuid != self.pool_uuid for r in requests):
            return super().create_snapshot_set(requests, freeze=freeze, freeze_timeout=freeze_timeout, within=within)
        vols = [check_uuid(r.volume_uuid, "volume_uuid") for r in requests]
        if len(set(vols)) != len(vols):
            raise InvalidArgument("snapshots: a volume is named twice", field="snapshots")
        for r in requests:
            check_uuid(r.snapshot_uuid, "snapshot_uuid")
            check_name(r.name, "snapshot_name")
        self._must_own()
        with ExitStack() as stack:
            for vol in sorted(vols):
                stack.enter_context(self._locked(vol))
            items = [self._set_item(r) for r in requests]
            vms = {(it.user.host, it.user.qmp): it.user for it in items if it.user}
            if len(vms) > 1:
                raise InUse("snapshots: the volumes are open in different VMs; take one set per VM", field="snapshots")
            made: list[_Item] = []
            frozen, switch_ms = Freeze(consistency="offline"), 0.0
            remote = False  # a switch asked of another host: its outcome may be unknown on failure
            try:
                for it in items:
                    made.append(it)
                    self._prepare(it)
                for it in items:
                    self._commit_meta(it, "crash" if it.user else "offline")
                if vms:
                    user = next(iter(vms.values()))
                    live = [(it.head, it.tmp, it.bitmap) for it in items if it.user]
                    if user.host == self.host_uuid or not user.host:
                        holder = self.watcher.vm(user.qmp)
                        if holder is None:
                            raise InUse(f"volume_uuid: the VM at {user.qmp} went away", field="volume_uuid")
                        frozen, switch_ms = self._switch_frozen((user.qmp, holder), live, freeze, freeze_timeout)
                    else:
                        remote = True
                        frozen, switch_ms = self._switch_remote(user, live, freeze, freeze_timeout)
            except BaseException:
                if remote:  # the VM may have switched: what it has open decides (_repair)
                    for it in made:
                        try:
                            self._repair(it.meta)
                        except BlockferryError as e:
                            log.error(
                                "a failed live snapshot is left for repair: %s", e, extra={"volume": it.meta.uuid}
                            )
                else:
                    for it in made:
                        self._undo(it)
                raise
            for it in items:
                if it.user and frozen.consistency != it.snap.consistency:
                    it.snap.consistency = frozen.consistency  # the guest froze its filesystems for it
                    self._save(it.meta)
                self.table.update(it.head.slot, layer=it.snap.uuid)
                self.table.update(it.tmp.slot, layer=it.meta.uuid)
                log.info("snapshot created", extra={"volume": it.meta.uuid, "snapshot": it.snap.uuid})
            recs = self.table.records()
            infos = tuple(self._snap_info(it.meta, it.snap, recs) for it in items)
        consistency = frozen.consistency if vms else "offline"
        return SnapshotSet(infos, consistency, "", frozen.reason, frozen.frozen_ms, switch_ms)

    def _set_item(self, r: SnapshotRequest) -> _Item:
        """One volume of a set: the checks, its head and the VM that holds it."""
        meta = self._meta(r.volume_uuid)
        self._repair(meta)
        if meta.snapshot(r.snapshot_uuid) or any(x.used and x.layer == r.snapshot_uuid for x in self.table.records()):
            raise AlreadyExists(f"snapshot_uuid: snapshot {r.snapshot_uuid} exists", field="snapshot_uuid")
        if any(s.name == r.name for s in meta.snapshots):
            raise AlreadyExists(
                f"snapshot_name: volume {meta.uuid} has a snapshot named {r.name!r}", field="snapshot_name"
            )
        head = self._rec(self.table.records(), meta.uuid)
        self._not_moving(meta.uuid)
        users = self.slice_users([head.offset])
        if len(users) > 1:
            raise InUse(
                f"volume_uuid: volume {meta.uuid} is open in {len(users)} VMs ("
                + ", ".join(f"{u.vm} on host {u.host}" for u in users)
                + ")",
                field="volume_uuid",
            )
        return _Item(r, meta, head, users[0] if users else None)

    def _prepare(self, it: _Item) -> None:
        """The new head written into its slice; an idle head's bitmap stops."""
        head_name = self._top(self.table.records(), it.meta.uuid)
        info = qemu_img.info(head_name)
        it.tracking = TRACKING_OK if it.meta.head_tracking == TRACKING_OK else TRACKING_LOST
        if it.user:  # the VM's qemu stops the head's bitmap in the switch
            it.bitmap = BITMAP if info.bitmap(BITMAP) else ""
            if not it.bitmap:
                it.tracking = TRACKING_LOST
        else:
            it.frozen_tracking = True
            if freeze_tracking(head_name) != TRACKING_OK:
                it.tracking = TRACKING_LOST
        it.tmp = self.table.allocate(
            self._head_size(info.virtual_size),
            kind=fmt.LAYER,
            volume=it.meta.uuid,
            layer=str(uuidlib.uuid4()),
            parent=it.req.snapshot_uuid,
        )
        self._new_layer(it.tmp, info.virtual_size, it.head)

    def _commit_meta(self, it: _Item, consistency: str) -> None:
        """From here on the snapshot exists; _repair finishes the renames, or,
        for a running VM that never switched to the new layer, takes it back."""
        it.snap = SnapMeta(
            uuid=it.req.snapshot_uuid,
            name=it.req.name,
            description=it.req.description,
            created_at=time.time(),
            parent=it.meta.head_parent,
            tracking=it.tracking,
            consistency=consistency,
        )
        it.before = (it.meta.head_parent, it.meta.head_tracking)
        it.meta.snapshots.append(it.snap)
        it.meta.head_parent = it.snap.uuid
        it.meta.head_tracking = TRACKING_OK
        self._save(it.meta)

    def _undo(self, it: _Item) -> None:
        """A set that failed before its switch: every volume as it was."""
        if it.snap is not None and it.snap in it.meta.snapshots:
            it.meta.snapshots.remove(it.snap)
            it.meta.head_parent, it.meta.head_tracking = it.before
            self._save(it.meta)
        if it.tmp is not None:
            self.table.release(it.tmp.slot)
        if it.frozen_tracking and it.tracking == TRACKING_OK:
            qemu_img.bitmap(self._top(self.table.records(), it.meta.uuid), "enable", BITMAP)

    def _switch_remote(
        self, user: SliceUse, items: list[tuple[SliceRecord, SliceRecord, str]], freeze: bool, timeout: float
    ) -> tuple[Freeze, float]:
        """The switch done by the VM's host, which this owner asks."""
        address = self._other_hosts().get(user.host, "")
        if self.peers is None or not address:
            raise TargetUnreachable(
                f"volume_uuid: the VM {user.vm} runs on host {user.host}, which cannot be asked to switch it",
                field="volume_uuid",
            )
        switches = [(Geometry.of(h), Geometry.of(n), b) for h, n, b in items]
        frozen, ms = self.peers.switch(
            address, self.pool_uuid, user.qmp, switches, freeze=freeze, timeout=timeout or self.freeze_timeout
        )
        log.info("live snapshot switched on another host", extra={"host": user.host, "vm": user.vm})
        return frozen, ms

    def _switch_frozen(
        self, user: tuple, items: list[tuple[SliceRecord, SliceRecord, str]], freeze: bool, timeout: float
    ) -> tuple[Freeze, float]:
        """The VM's switch to the new layers with its guest's filesystems
        frozen through qemu-guest-agent when it answers (else crash-
        consistent, saying why), on one QMP connection (a qemu takes one
        monitor client at a time). Returns the freeze and the switch's ms."""
        sock, holder = user
        with Qmp(sock, timeout=30) as q:
            vm = QemuVm(q, holder.pid, holder.argv)
            with vm.frozen(timeout=timeout or self.freeze_timeout, wanted=freeze) as frozen:
                switch_ms = self.watcher.switch_to_overlays(q, items)
        if frozen.reason:
            log.info("live snapshot not frozen: %s", frozen.reason, extra={"vm": vm.name})
        return frozen, switch_ms

    def _snap_info(self, meta: VolMeta, s: SnapMeta, recs: list[SliceRecord] | None = None) -> SnapshotInfo:
        recs = recs if recs is not None else self.table.records()
        children = [c.uuid for c in meta.children_of(s.uuid)]
        if meta.head_parent == s.uuid:
            children.append(HEAD)
        size = next((r.size for r in recs if r.used and r.kind == fmt.LAYER and r.layer == s.uuid), 0)
        return SnapshotInfo(
            uuid=s.uuid,
            name=s.name,
            volume_uuid=meta.uuid,
            description=s.description,
            created_at=s.created_at,
            size=size,
            parent=s.parent,
            children=tuple(children),
            clones=tuple(c.split("/")[1] for c in s.clones),
            tracking=s.tracking,
            consistency=s.consistency,
            vm_definition=s.vm_definition,
        )

    def _bottom_parent(self, meta: VolMeta) -> str:
        """The layer a volume's bottom layer is backed by: the origin
        snapshot of a linked clone, else none."""
        return (meta.parent_snapshot or "") if meta.parent_volume else ""

    def delete_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> None:
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            self._repair(meta)
            s = self._snap(meta, snapshot_uuid)
            s.check_no_clones()
            recs = self.table.records()
            layer = self._rec(recs, s.uuid)
            new_parent = s.parent or self._bottom_parent(meta)
            new_backing = self._rec(recs, new_parent) if new_parent else None
            children: list[tuple[SnapMeta | None, str]] = [(c, c.uuid) for c in meta.children_of(s.uuid)]
            if meta.head_parent == s.uuid:
                self._idle(meta.uuid, self._rec(recs, meta.uuid), "deleting the snapshot under its head")
                children.append((None, meta.uuid))
            layer_name = "json:" + json.dumps(self._node(layer), separators=(",", ":"))
            for _, child_layer in children:  # room first: a thin child takes in the layer's data
                self._make_room(meta, self._rec(self.table.records(), child_layer))
            for child, child_layer in children:
                recs = self.table.records()
                name = self._top(recs, child_layer)
                # copies in what the child still needs from the layer going away
                qemu_img.rebase(self._name(recs, child_layer), self._backing_string(new_backing))
                child_ok = (child.tracking if child else meta.head_tracking) == TRACKING_OK
                if child_ok and s.tracking == TRACKING_OK:
                    qemu_img.bitmap(name, "merge", BITMAP, source_file=layer_name, source=BITMAP)
                elif child:
                    child.tracking = TRACKING_LOST
                else:
                    meta.head_tracking = TRACKING_LOST
                self.table.update(self._rec(self.table.records(), child_layer).slot, parent=new_parent)
                if child:
                    child.parent = s.parent
            if meta.head_parent == s.uuid:
                meta.head_parent = s.parent
            meta.snapshots.remove(s)
            self._save(meta)
            self.table.release(layer.slot)
            log.info("snapshot deleted", extra={"volume": meta.uuid, "snapshot": s.uuid, "rebased": len(children)})

    def rollback_snapshot(self, volume_uuid: str, snapshot_uuid: str) -> VolumeInfo:
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            self._repair(meta)
            s = self._snap(meta, snapshot_uuid)
            recs = self.table.records()
            head = self._rec(recs, meta.uuid)
            self._idle(meta.uuid, head, "a rollback")
            layer = self._rec(recs, s.uuid)
            capacity = qemu_img.info(self._top(recs, s.uuid)).virtual_size
            tmp = self.table.allocate(
                self._head_size(capacity), kind=fmt.LAYER, volume=meta.uuid, layer=str(uuidlib.uuid4()), parent=s.uuid
            )
            try:
                self._new_layer(tmp, capacity, layer)
            except BaseException:
                self.table.release(tmp.slot)
                raise
            meta.head_parent = s.uuid
            meta.head_tracking = TRACKING_OK
            self._save(meta)
            self.table.release(head.slot)
            self.table.update(tmp.slot, layer=meta.uuid)
            log.info("rolled back", extra={"volume": meta.uuid, "snapshot": s.uuid})
            return self._info(meta)

    def list_snapshots(self, volume_uuid: str) -> list[SnapshotInfo]:
        meta = self._meta(volume_uuid)
        recs = self.table.records()
        return [self._snap_info(meta, s, recs) for s in sorted(meta.snapshots, key=lambda s: s.created_at)]

    def snapshot_info(self, volume_uuid: str, snapshot_uuid: str) -> SnapshotInfo:
        meta = self._meta(volume_uuid)
        return self._snap_info(meta, self._snap(meta, snapshot_uuid))

    def snapshot_tree(self, volume_uuid: str) -> SnapshotTree:
        meta = self._meta(volume_uuid)
        return build_tree([(s.uuid, s.name, s.parent, s.created_at) for s in meta.snapshots], meta.head_parent)

    # ---- extents and reads ----

    def _layer_name(self, volume_uuid: str, snapshot_uuid: str | None) -> str:
        meta = self._meta(volume_uuid)
        if snapshot_uuid:
            self._snap(meta, snapshot_uuid)
        return self._name(self._records_with(snapshot_uuid or meta.uuid), snapshot_uuid or meta.uuid)

    def data_extents(self, volume_uuid: str, snapshot_uuid: str | None) -> list[AllocExtent]:
        with QemuNbd(self._layer_name(volume_uuid, snapshot_uuid), run_dir=self.run_dir) as srv:
            with srv.connect() as c:
                return c.allocation()

    def changed_extents(self, volume_uuid: str, snapshot_uuid: str, since_snapshot_uuid: str | None) -> ChangedExtents:
        meta = self._meta(volume_uuid)
        self._snap(meta, snapshot_uuid)
        if since_snapshot_uuid is None:
            data = [Extent(e.start, e.length) for e in self.data_extents(volume_uuid, snapshot_uuid) if not e.zero]
            return ChangedExtents(data, exact=True, granularity=GRANULARITY)
        since = self._snap(meta, since_snapshot_uuid).uuid
        layers = meta.path_to(snapshot_uuid, since)
        lost = [s for s in layers if s.tracking != TRACKING_OK]
        if lost:
            raise TrackingLost(
                "snapshot_uuid: change tracking was lost for snapshot "
                f"{', '.join(f'{s.name} ({s.uuid})' for s in lost)}",
                field="snapshot_uuid",
            )
        files = _Layers(self, self.table.records())
        dirty: list[Extent] = []
        for s in layers:
            dirty.extend(dirty_extents(s.uuid, BITMAP, f"snapshot {s.name} ({s.uuid})", fs=files))
        return ChangedExtents(merge_extents(dirty), exact=True, granularity=GRANULARITY)

    def image_digest(self, volume_uuid: str, snapshot_uuid: str | None, ctx=None):
        from agent.volumes.digest import image_digest

        return image_digest(self._layer_name(volume_uuid, snapshot_uuid or None), run_dir=self.run_dir, ctx=ctx)

    @contextmanager
    def open_reader(self, volume_uuid: str, snapshot_uuid: str, only=None):
        """A snapshot read straight from its slices at the offsets qemu-img
        map gives (one copy, as directory pools read their files), else
        through qemu-nbd (an iSCSI LUN, compressed clusters). Snapshot layers
        never change in place; the device is read with O_DIRECT, as another
        host may have written them."""
        meta = self._meta(volume_uuid)
        self._snap(meta, snapshot_uuid)
        recs = self._records_with(snapshot_uuid)
        rec = self._rec(recs, snapshot_uuid)
        mapped = self._open_mapped(recs, rec)
        if mapped is not None:
            with mapped:
                self.check_geometry(rec)  # the map and the slices agree with the table now
                yield mapped
            return
        with QemuNbd(self._name(recs, snapshot_uuid), readonly=True, run_dir=self.run_dir) as srv:
            self.check_geometry(rec)  # what qemu-nbd opened is still where the table says
            with srv.connect() as c:
                yield NbdSnapshotReader(c)

    def _open_mapped(self, recs: list[SliceRecord], rec: SliceRecord):
        if self.protocol.get("driver") != "host_device":
            return None
        chain = [rec]
        while chain[-1].parent:
            chain.append(self._rec(recs, chain[-1].parent))
        size = qemu_img.info(self._top(recs, rec.layer)).virtual_size
        if size % fmt.BLOCK:
            return None  # a last piece shorter than a 4 KiB sector cannot be read with O_DIRECT
        entries = qemu_img.map_image(self._name(recs, rec.layer))
        # O_DIRECT: other hosts write the LUN, so no page cache here may answer for it
        fd = os.open(self.protocol["filename"], os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
        try:
            reader = open_mapped_ranges(size, entries, fd, [r.offset for r in chain], direct=True)
        except BaseException:
            os.close(fd)
            raise
        if reader is None:
            os.close(fd)
        return reader

    # ---- clones ----

    def linked_clone(
        self, source: VolumeDriver, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str
    ) -> VolumeInfo:
        vol = check_uuid(volume_uuid, "clone_volume_uuid")
        check_name(name, "clone_dst_vol_name")
        if source is not self:
            raise FailedPrecondition(
                "target_pool_uuid: a linked clone lives in the pool of its origin snapshot (its backing "
                "layer is a slice of that LUN); make a full clone",
                field="target_pool_uuid",
            )
        self._must_own()
        with self._locked(source_volume):
            origin = self._meta(source_volume)
            s = self._snap(origin, snapshot_uuid)
            recs = self.table.records()
            layer = self._rec(recs, s.uuid)
            capacity = qemu_img.info(self._top(recs, s.uuid)).virtual_size
            with self._locked(vol):
                if self.volume_exists(vol):
                    raise AlreadyExists(
                        f"clone_volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="clone_volume_uuid"
                    )
                head = self.table.allocate(
                    self._head_size(capacity), kind=fmt.LAYER, volume=vol, layer=vol, parent=s.uuid
                )
                meta = VolMeta(
                    uuid=vol,
                    name=name,
                    created_at=time.time(),
                    parent_volume=origin.uuid,
                    parent_pool=self.pool_uuid,
                    parent_snapshot=s.uuid,
                    parent_file=s.uuid,
                )
                self._make_volume(meta, head, capacity, layer)
            s.clones.append(f"{self.pool_uuid}/{vol}")
            self._save(origin)
            log.info("linked clone created", extra={"volume": vol, "origin": origin.uuid, "snapshot": s.uuid})
            return self._info(meta)

    def flatten(self, volume_uuid: str, *, on_percent=None, checkpoint=None) -> VolumeInfo:
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            if not meta.parent_volume:
                raise FailedPrecondition(f"volume_uuid: volume {meta.uuid} is not a linked clone", field="volume_uuid")
            roots = meta.children_of(None)
            bottom = roots[0].uuid if roots else meta.uuid
            recs = self.table.records()
            if bottom == meta.uuid:
                self._idle(meta.uuid, self._rec(recs, bottom), "a flatten")
            self._make_room(meta, self._rec(recs, bottom))
            recs = self.table.records()
            qemu_img.rebase(self._name(recs, bottom), None, on_percent=on_percent, checkpoint=checkpoint)
            self.table.update(self._rec(recs, bottom).slot, parent="")
            self._forget_clone(meta)
            meta.parent_volume = meta.parent_pool = meta.parent_snapshot = meta.parent_file = None
            self._save(meta)
            log.info("clone flattened", extra={"volume": meta.uuid})
            return self._info(meta)

    def new_volume_for_copy(
        self, volume_uuid: str, name: str, capacity: int, job_id: str = "copy"
    ) -> tuple[str, Callable[[], VolumeInfo], Callable[[], None]]:
        """A hidden new head (a slice under a temporary layer id): returns
        (its qemu name, commit(), abort()). Until commit the volume does not exist."""
        vol = check_uuid(volume_uuid, "volume_uuid")
        check_name(name, "name")
        check_capacity(capacity)
        self._must_own()
        if self.volume_exists(vol):
            raise AlreadyExists(f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid")
        tmp = self.table.allocate(self._slice_size(capacity), kind=fmt.LAYER, volume=vol, layer=str(uuidlib.uuid4()))
        self._inflight.add(tmp.layer)  # a copy may run for hours: the sweep leaves it alone
        try:
            self._new_layer(tmp, capacity, None)
        except BaseException:
            self.table.release(tmp.slot)
            self._inflight.discard(tmp.layer)
            raise
        name_json = "json:" + json.dumps(dict(self._node(tmp), backing=None), separators=(",", ":"))

        def commit() -> VolumeInfo:
            with self._locked(vol):
                if self.volume_exists(vol):
                    raise AlreadyExists(
                        f"volume_uuid: volume {vol} exists in pool {self.pool_uuid}", field="volume_uuid"
                    )
                self.table.lun.dev.flush()
                meta = VolMeta(uuid=vol, name=name, created_at=time.time())
                self.table.update(self.check_geometry(tmp).slot, layer=vol)
                self._save(meta)
                self._inflight.discard(tmp.layer)
                return self._info(meta)

        def abort() -> None:
            """Safe twice: the slot is released only while it still holds this copy."""
            self._inflight.discard(tmp.layer)
            now = self.table.records()[tmp.slot]
            if now.used and now.volume == vol and now.layer in (tmp.layer, vol) and now.offset == tmp.offset:
                if self._meta_rec(self.table.records(), vol) is None:  # never a committed volume's head
                    self.table.release(tmp.slot)

        return name_json, commit, abort

    def full_clone(
        self, source: VolumeDriver, source_volume: str, snapshot_uuid: str, volume_uuid: str, name: str, ctx
    ) -> tuple[VolumeInfo, int]:
        """qemu-img convert from the source snapshot's chain into a new head."""
        if not isinstance(source, LunPool):
            raise FailedPrecondition("pool_uuid: full clones between kinds go through copy_snapshot", field="pool_uuid")
        src = source._layer_name(source_volume, snapshot_uuid)
        capacity = qemu_img.info(source._top(source.table.records(), snapshot_uuid)).virtual_size
        data = qemu_img.allocated_data(src)
        dst, commit, abort = self.new_volume_for_copy(volume_uuid, name, capacity, job_id=ctx.job_id)
        try:
            ctx.progress(0, data, "copying")
            procs.run_with_progress(
                with_objects(
                    ["qemu-img", "convert", "-p", "-U", "-n", "--target-is-zero", "-W", "-m", "8", "-f", "qcow2"]
                    + (["-r", str(ctx.bandwidth_limit)] if ctx.bandwidth_limit else [])
                    + [src, "--target-image-opts", _opts(json.loads(dst[5:]))]
                ),
                on_percent=lambda pct: ctx.progress(int(data * pct / 100)),
                checkpoint=ctx.checkpoint,
                timeout=7 * 24 * 3600,
                what="qemu-img convert",
            )
            ctx.checkpoint()
            ctx.progress(data, data, "committing")
            return commit(), data
        except BaseException:
            abort()
            raise

    # ---- restores ----

    def check_not_in_use(self, volume_uuid: str) -> None:
        meta = self._meta(volume_uuid)
        self._idle(meta.uuid, self._rec(self.table.records(), meta.uuid), "this")

    def _not_moving(self, vol: str) -> None:
        if self._moves_began(vol):
            raise Busy(
                f"volume_uuid: volume {vol}'s running head is being moved to a larger slice; try again when "
                "the move ends",
                field="volume_uuid",
            )

    def _idle(self, vol: str, head: SliceRecord, what: str) -> None:
        """IN_USE when a running VM on any host of the pool has the head open
        (layers are opened with locking off, so the hosts ask their qemus)."""
        self._not_moving(vol)
        users = self.slice_users([head.offset])
        if users:
            u = users[0]
            where = "this host" if u.host == self.host_uuid else f"host {u.host}"
            raise InUse(
                f"volume_uuid: volume {vol} is open in the running VM {u.vm} on {where} (QMP {u.qmp}): stop it "
                f"before {what} operation, or snapshot it live",
                field="volume_uuid",
            )

    def open_overwrite_target(self, volume_uuid: str) -> RestoreTarget:
        """The head grown to thick first: qemu-nbd writes it, with no watcher to grow it."""
        self._must_own()
        with self._locked(volume_uuid):
            meta = self._meta(volume_uuid)
            self._repair(meta)
            head = self._rec(self.table.records(), meta.uuid)
            self._idle(meta.uuid, head, "a restore in place")
            full = self.full_size(head)
            if head.size < full:
                try:
                    self.table.grow(head.slot, full)
                except NoSpace:
                    self._relocate(meta, head, full)
        name = self._layer_name(volume_uuid, None)
        return Qcow2OverwriteTarget(name, self.run_dir, lambda: self.volume_info(volume_uuid))

    def open_restore_target(self, volume_uuid: str, name: str, capacity: int, job_id: str) -> RestoreTarget:
        image, commit, abort = self.new_volume_for_copy(volume_uuid, name, capacity, job_id=job_id)
        try:
            return Qcow2RestoreTarget(image, commit, abort, self.run_dir)
        except BaseException:
            abort()
            raise

    # ---- the pool ----

    def pool_status(self) -> PoolStatus:
        try:
            try:
                self._housekeeping()
            except BlockferryError as e:  # a lease that just lapsed, a sweep that lost a race: next time
                log.warning("shared pool housekeeping: %s", e.message, extra={"pool": self.pool_uuid})
            capacity, allocated = self.table.usage()
        except (DataCorrupt, OSError) as e:
            return PoolStatus(self.pool_uuid, self.kind, "unreachable", error=f"{self.label}: {e}")
        m = self.membership
        unfenced = m.unfenced() if m is not None else []
        return PoolStatus(
            self.pool_uuid,
            self.kind,
            "degraded" if unfenced else "healthy",
            capacity,
            allocated,
            capacity - allocated,
            owner=self.owner(),
            hosts=tuple(m.live_hosts()) if m is not None else (),
            lapsed=tuple(m.lapsed_hosts()) if m is not None else (),
            error=(
                f"host {', '.join(unfenced)} stopped renewing its lease and is not fenced yet (fence_command "
                "failed): changes of volumes wait"
                if unfenced
                else ""
            ),
        )

    def _housekeeping(self) -> None:
        """At each status query (the heartbeats): a LUN that grew on the
        storage is taken in (the owner writes the superblocks, the others
        read them again), and the owner releases abandoned slices."""
        m = self.membership
        lun = self.table.lun
        if m is not None and m.is_owner:
            size = lun.dev.refresh_size() if hasattr(lun.dev, "refresh_size") else lun.dev.size
            if size > lun.sb.device_size:
                sb = lun.grow(self.table.guard or m.guard)
                log.info("the LUN grew: data area extended", extra={"pool": self.pool_uuid, "size": sb.device_size})
            if time.monotonic() - self._swept > 60:
                self._swept = time.monotonic()
                self.remove_leftovers()
        else:
            sb = read_superblock(lun.dev, self.label)
            if sb.device_size > lun.sb.device_size:
                lun.sb = sb

    def remove_leftovers(self) -> list[int]:
        """Release layer slices of volumes that have no metadata (a create or
        copy that never committed), once older than leftover_age seconds."""
        try:
            self._must_own()
        except FailedPrecondition:
            return []
        recs = self.table.records()
        volumes = {r.volume for r in recs if r.used and r.kind == fmt.META}
        gone = []
        for r in recs:
            if (
                r.used
                and r.kind == fmt.LAYER
                and r.volume not in volumes
                and r.layer not in self._inflight
                and r.volume not in self._inflight
                and time.time() - r.updated > self.leftover_age
            ):
                self.table.release(r.slot)
                gone.append(r.slot)
        return gone


class _Item:
    """One volume of a snapshot set while the set is taken."""

    def __init__(self, req: SnapshotRequest, meta: VolMeta, head: SliceRecord, user: SliceUse | None):
        self.req, self.meta, self.head, self.user = req, meta, head, user
        self.tmp: SliceRecord | None = None
        self.snap: SnapMeta | None = None
        self.bitmap = ""
        self.tracking = TRACKING_OK
        self.frozen_tracking = False  # an idle head's bitmap was disabled here
        self.before: tuple = (None, TRACKING_OK)


def _opts(node: dict, prefix: str = "") -> str:
    """A json node as the dotted options --image-opts takes."""
    out = []
    for k, v in node.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out.append(_opts(v, f"{prefix}{k}."))
        elif isinstance(v, bool):
            out.append(f"{prefix}{k}={'on' if v else 'off'}")
        else:
            out.append(f"{prefix}{k}={v}")
    return ",".join(out)
