"""A shared pool's LUN opened: its superblock, and its slice table read by
any host and changed only by the pool's metadata owner.

Every change of the table is one slot's record, written into copy A, then
flushed, then into copy B and flushed: the 4 KiB block that holds the record
is rebuilt from the whole table as just read (both copies resolved), so a
torn neighbour in one copy is never carried into the other. Before each of
the two writes the guard is asked (the owner lease still valid); an owner
that lost its lease writes nothing more.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

from agent.errors import DataCorrupt, FailedPrecondition, InvalidArgument, NoSpace, NotFound
from agent.stores.blockdev import BlockDevice
from agent.volumes.lun import format as fmt
from agent.volumes.lun.format import BLOCK, MAX_HOSTS, RECORD, LeaseRecord, SliceRecord, Superblock, lease_offset

BLANK_CHECK = 1 << 20
PER_BLOCK = BLOCK // RECORD


def _read(dev: BlockDevice, offset: int, length: int) -> bytes:
    return bytes(dev.read(offset, length))


def _write(dev: BlockDevice, offset: int, data: bytes) -> None:
    dev.write(offset, data)
    dev.flush()


def format_pool(
    dev: BlockDevice,
    pool_uuid: str,
    *,
    extent_size: int = fmt.DEFAULT_EXTENT,
    slots: int = fmt.DEFAULT_SLOTS,
    label: str = "",
    now: int | None = None,
) -> Superblock:
    """Write a new, empty pool on a blank LUN. A LUN with anything in its
    first or last MiB (a partition table, a file system, a backup
    repository, another pool) is refused and left untouched."""
    label = label or dev.label
    if extent_size < fmt.MIN_EXTENT or extent_size & (extent_size - 1):
        raise InvalidArgument(
            f"extent_size: must be a power of two of at least {fmt.MIN_EXTENT}, not {extent_size}",
            field="extent_size",
        )
    if not 1 <= slots <= 1 << 20:
        raise InvalidArgument(f"slots: must be 1 to {1 << 20}, not {slots}", field="slots")
    size = dev.size
    for off in (0, max(0, size - BLANK_CHECK) // BLOCK * BLOCK):
        head = _read(dev, off, min(BLANK_CHECK, size - off))
        if any(head):
            what = "a blockferry shared pool" if head[:8] == fmt.MAGIC else "other data"
            raise FailedPrecondition(
                f"device: {label} holds {what} (its first or last MiB is not blank); it is never touched",
                field="device",
            )
    sb = Superblock(
        pool_uuid=pool_uuid,
        extent_size=extent_size,
        sector_size=dev.sector_size,
        table_slots=slots,
        device_size=size,
        created=int(now if now is not None else time.time()),
    )
    if sb.data_end - sb.data_offset < 4 * extent_size:
        raise FailedPrecondition(f"device: {label} is too small for a pool ({size} bytes)", field="device")
    # leases and tables start zeroed (a zero record is an empty slot)
    zero = b"\0" * (1 << 20)
    for off in range(fmt.LEASE_OFFSET, sb.data_offset, len(zero)):
        dev.write(off, zero[: min(len(zero), sb.data_offset - off)])
    dev.flush()
    for off in fmt.SUPER_OFFSETS:
        _write(dev, off, sb.pack())
    return sb


def read_superblock(dev: BlockDevice, label: str = "") -> Superblock:
    """The pool's superblock: copy A, else copy B; when both hold and differ
    (a resize that reached only A), the one that knows the larger device."""
    label = label or dev.label
    found, errors = [], []
    for name, off in zip("AB", fmt.SUPER_OFFSETS, strict=True):
        try:
            found.append(Superblock.unpack(_read(dev, off, BLOCK), f"{label}: superblock {name}"))
        except DataCorrupt as e:
            errors.append(str(e))
    if not found:
        raise DataCorrupt("; ".join(errors))
    return max(found, key=lambda sb: sb.device_size)


class PoolLun:
    """One pool on its LUN, as this host sees it."""

    def __init__(self, dev: BlockDevice, pool_uuid: str = "", *, label: str = ""):
        self.dev = dev
        self.label = label or dev.label
        self.sb = read_superblock(dev, self.label)
        if pool_uuid and self.sb.pool_uuid != pool_uuid:
            raise FailedPrecondition(
                f"device: {self.label} holds pool {self.sb.pool_uuid}, not {pool_uuid}", field="device"
            )
        if dev.sector_size > BLOCK or BLOCK % dev.sector_size:
            raise FailedPrecondition(f"device: {self.label} has {dev.sector_size}-byte sectors", field="device")

    def read_block(self, offset: int) -> bytes:
        return _read(self.dev, offset, BLOCK)

    def read_host_leases(self) -> dict[int, LeaseRecord]:
        """Host id -> its lease, for every host id block that holds one (the
        lease area in one read)."""
        area = _read(self.dev, lease_offset(1), MAX_HOSTS * BLOCK)
        out = {}
        for i in range(1, MAX_HOSTS + 1):
            r = LeaseRecord.unpack(area[(i - 1) * BLOCK : i * BLOCK])
            if r is not None:
                out[i] = r
        return out

    def write_block(self, offset: int, data: bytes) -> None:
        _write(self.dev, offset, data)

    def grow(self, guard: Callable[[], int]) -> Superblock:
        """Take in the LUN's new size (it was resized on the storage): the
        data area reaches further; both superblocks rewritten, A first."""
        size = self.dev.refresh_size() if hasattr(self.dev, "refresh_size") else self.dev.size
        if size < self.sb.device_size:
            raise FailedPrecondition(
                f"device: {self.label} shrank from {self.sb.device_size} to {size} bytes; "
                "slices may lie past its end, so nothing is written",
                field="device",
            )
        if size == self.sb.device_size:
            return self.sb
        sb = dataclasses.replace(self.sb, device_size=size)
        for off in fmt.SUPER_OFFSETS:
            guard()
            _write(self.dev, off, sb.pack())
        self.sb = sb
        return sb


class SliceTable:
    """The slice table of a pool. guard() raises unless this host may write
    the table right now (it holds the owner lease) and returns the lease's
    generation, stamped into each record; readers need no guard."""

    def __init__(self, lun: PoolLun, guard: Callable[[], int] | None = None):
        self.lun = lun
        self.guard = guard
        self._lock = threading.Lock()  # this host's changes one at a time
        self.disagreed: list[int] = []  # slots whose copies differed at the last read

    @property
    def sb(self) -> Superblock:
        return self.lun.sb

    # --- reading ---
    def records(self) -> list[SliceRecord]:
        """Every slot, both copies read and resolved."""
        sb = self.sb
        n = fmt.table_bytes(sb.table_slots)
        a = _read(self.lun.dev, sb.table_a, n)
        b = _read(self.lun.dev, sb.table_b, n)
        out, disagreed = [], []
        for slot in range(sb.table_slots):
            at = slot * RECORD
            rec, differ = fmt.resolve(
                slot,
                SliceRecord.unpack(a[at : at + RECORD], slot),
                SliceRecord.unpack(b[at : at + RECORD], slot),
            )
            out.append(rec)
            if differ:
                disagreed.append(slot)
        self.disagreed = disagreed
        check(out, sb)
        return out

    def used(self) -> list[SliceRecord]:
        return sorted((r for r in self.records() if r.used), key=lambda r: r.offset)

    def find(self, volume: str, layer: str, kind: int = fmt.LAYER) -> SliceRecord:
        for r in self.records():
            if r.used and r.kind == kind and r.volume == volume and r.layer == layer:
                return r
        raise NotFound(f"volume {volume}: no slice for layer {layer} in pool {self.sb.pool_uuid}")

    def of_volume(self, volume: str) -> list[SliceRecord]:
        return [r for r in self.used() if r.volume == volume]

    def usage(self) -> tuple[int, int]:
        """(capacity of the data area, bytes allocated to slices)."""
        sb = self.sb
        return sb.data_end - sb.data_offset, sum(r.size for r in self.used())

    # --- changing (the metadata owner only) ---
    def allocate(
        self, size: int, *, kind: int, volume: str, layer: str, parent: str = "", from_end: bool = False
    ) -> SliceRecord:
        """A new slice of at least size bytes (whole extents): first fit, or
        last fit from the end of the LUN (small slices that never grow keep
        out of the way of those that do)."""
        with self._lock:
            recs = self.records()
            size = self._extents(size)
            offset = (_last_fit if from_end else _first_fit)(recs, self.sb, size)
            if offset is None:
                cap, allocated = self.sb.data_end - self.sb.data_offset, sum(r.size for r in recs if r.used)
                raise NoSpace(
                    f"pool {self.sb.pool_uuid}: no free range of {size} bytes ({allocated} of {cap} bytes allocated)"
                )
            for r in recs:
                if r.used and r.kind == kind and r.volume == volume and r.layer == layer:
                    raise FailedPrecondition(f"volume {volume}: layer {layer} has a slice already")
            free = next((r for r in recs if not r.used), None)
            if free is None:
                raise NoSpace(f"pool {self.sb.pool_uuid}: all {self.sb.table_slots} slice table slots are used")
            rec = SliceRecord(
                slot=free.slot,
                state=fmt.USED,
                kind=kind,
                generation=free.generation + 1,
                offset=offset,
                size=size,
                volume=volume,
                layer=layer,
                parent=parent,
            )
            return self._put(recs, rec)

    def grow(self, slot: int, size: int) -> SliceRecord:
        """The slice made size bytes long where it is; NoSpace when the next
        slice (or the end of the LUN) is in the way (the caller moves the
        layer to a larger slice instead)."""
        with self._lock:
            recs = self.records()
            rec = self._used_slot(recs, slot)
            size = self._extents(size)
            if size <= rec.size:
                return rec
            limit = min((r.offset for r in recs if r.used and r.offset >= rec.end), default=self.sb.data_end)
            if rec.offset + size > limit:
                raise NoSpace(
                    f"pool {self.sb.pool_uuid}: slice {slot} cannot grow to {size} bytes in place "
                    f"({limit - rec.offset} bytes before the next slice or the end)"
                )
            return self._put(recs, dataclasses.replace(rec, size=size, generation=rec.generation + 1))

    def update(self, slot: int, *, parent: str | None = None, layer: str | None = None) -> SliceRecord:
        """Change a used slot's parent (a rebase) or layer (a rename)."""
        with self._lock:
            recs = self.records()
            rec = self._used_slot(recs, slot)
            rec = dataclasses.replace(
                rec,
                generation=rec.generation + 1,
                parent=rec.parent if parent is None else parent,
                layer=rec.layer if layer is None else layer,
            )
            return self._put(recs, rec)

    def release(self, slot: int) -> None:
        """The slot freed; its range is free once this returns."""
        with self._lock:
            recs = self.records()
            rec = self._used_slot(recs, slot)
            self._put(recs, SliceRecord(slot=slot, generation=rec.generation + 1))

    def repair(self) -> list[int]:
        """Rewrite the slots whose two copies disagree (after a crash between
        the two writes); returns them."""
        with self._lock:
            recs = self.records()
            slots = list(self.disagreed)
            for slot in slots:
                self._put(recs, recs[slot], bump=False)
            return slots

    # --- inside ---
    def _extents(self, size: int) -> int:
        if size <= 0:
            raise InvalidArgument(f"size: must be positive, not {size}", field="size")
        return fmt.align_up(size, self.sb.extent_size)

    def _used_slot(self, recs: list[SliceRecord], slot: int) -> SliceRecord:
        if not 0 <= slot < len(recs) or not recs[slot].used:
            raise NotFound(f"pool {self.sb.pool_uuid}: slice table slot {slot} is not in use")
        return recs[slot]

    def _put(self, recs: list[SliceRecord], rec: SliceRecord, *, bump: bool = True) -> SliceRecord:
        if self.guard is None:
            raise FailedPrecondition(f"pool {self.sb.pool_uuid}: this host is not the pool's metadata owner")
        owner_gen = self.guard()
        if bump:
            rec = dataclasses.replace(rec, updated=int(time.time()), owner_gen=owner_gen)
        recs = list(recs)
        recs[rec.slot] = rec
        check(recs, self.sb)  # never write a table that overlaps
        first = rec.slot // PER_BLOCK * PER_BLOCK
        block = b"".join(r.pack() for r in recs[first : first + PER_BLOCK])
        block += b"\0" * (BLOCK - len(block))
        at = first * RECORD
        self.lun.write_block(self.sb.table_a + at, block)
        self.guard()
        self.lun.write_block(self.sb.table_b + at, block)
        return rec


def _first_fit(recs: list[SliceRecord], sb: Superblock, size: int) -> int | None:
    at = sb.data_offset
    for r in sorted((r for r in recs if r.used), key=lambda r: r.offset):
        if r.offset - at >= size:
            return at
        at = max(at, r.end)
    return at if sb.data_end - at >= size else None


def _last_fit(recs: list[SliceRecord], sb: Superblock, size: int) -> int | None:
    end = sb.data_end
    for r in sorted((r for r in recs if r.used), key=lambda r: r.offset, reverse=True):
        if end - r.end >= size:
            return end - size
        end = min(end, r.offset)
    return end - size if end - sb.data_offset >= size else None


def check(recs: list[SliceRecord], sb: Superblock) -> None:
    """DataCorrupt unless every used slice lies in the data area, on extent
    boundaries, and no two overlap."""
    used = sorted((r for r in recs if r.used), key=lambda r: r.offset)
    prev = None
    for r in used:
        if r.offset < sb.data_offset or r.end > sb.device_size or r.offset % sb.extent_size or r.size <= 0:
            raise DataCorrupt(
                f"pool {sb.pool_uuid}: slice {r.slot} [{r.offset}, {r.end}) lies outside the data area "
                f"[{sb.data_offset}, {sb.device_size}) or off an extent boundary"
            )
        if prev is not None and r.offset < prev.end:
            raise DataCorrupt(
                f"pool {sb.pool_uuid}: slices {prev.slot} [{prev.offset}, {prev.end}) and "
                f"{r.slot} [{r.offset}, {r.end}) overlap"
            )
        prev = r
