"""The on-LUN format of a shared block pool: the bytes, nothing else.

A shared pool is one raw LUN (a disk by WWN, an FC LUN, an iSCSI LUN) that
several hosts reach at once. Its layout, every offset in bytes, every
structure 4 KiB aligned (the largest logical sector size, so O_DIRECT works
on 512-byte and 4 KiB devices alike):

    0           superblock copy A            4 KiB
    4 KiB       superblock copy B            4 KiB
    1 MiB       lease area                   256 blocks of 4 KiB
                  block 0: the metadata (owner) lease
                  block h: host id h's lease (1..255)
    2 MiB       slice table copy A           slots x 128 bytes
    2 MiB + T   slice table copy B           slots x 128 bytes
    D           data area: slices, each a whole number of extents,
                D itself aligned to the extent size

Every structure carries a CRC-32 of its bytes, so a torn write is seen as
torn instead of being trusted. The superblock and each slice record are
written twice, to copy A and then (after a flush) to copy B: a crash tears
at most one of them. docs/shared-pools.md is the prose version of this
module; tests/test_lun_format.py pins the bytes (golden digests).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass

from agent.errors import DataCorrupt

BLOCK = 4096
MAGIC = b"BFSHPOOL"
VERSION = 1
SUPER_OFFSETS = (0, BLOCK)
LEASE_OFFSET = 1 << 20
LEASE_BLOCKS = 256
OWNER_LEASE = 0  # the lease block of the pool's metadata owner
MAX_HOSTS = LEASE_BLOCKS - 1  # host ids 1..255
TABLE_OFFSET = 2 << 20
RECORD = 128
DEFAULT_SLOTS = 4096
DEFAULT_EXTENT = 1 << 20
MIN_EXTENT = 1 << 20

NIL = b"\0" * 16

# magic version flags pool extent sector max_hosts slots pad
# lease_off table_a table_b data_off device_size created
_SUPER = struct.Struct("<8sII16sQIIII QQQQQQ")
_CRC = struct.Struct("<I")


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def align_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def table_bytes(slots: int) -> int:
    """Bytes one copy of a table of `slots` records takes, block aligned."""
    return align_up(slots * RECORD, BLOCK)


@dataclass(frozen=True)
class Superblock:
    pool_uuid: str
    extent_size: int
    sector_size: int  # the device's logical sector size when it was formatted
    table_slots: int
    device_size: int  # the size the data area reaches to (grows when the LUN does)
    created: int  # unix seconds
    version: int = VERSION
    flags: int = 0
    max_hosts: int = MAX_HOSTS

    @property
    def lease_offset(self) -> int:
        return LEASE_OFFSET

    @property
    def table_a(self) -> int:
        return TABLE_OFFSET

    @property
    def table_b(self) -> int:
        return TABLE_OFFSET + table_bytes(self.table_slots)

    @property
    def data_offset(self) -> int:
        return align_up(self.table_b + table_bytes(self.table_slots), self.extent_size)

    @property
    def data_end(self) -> int:
        """Where the data area ends: the device size, whole extents only."""
        return self.device_size // self.extent_size * self.extent_size

    def pack(self) -> bytes:
        body = _SUPER.pack(
            MAGIC,
            self.version,
            self.flags,
            uuid.UUID(self.pool_uuid).bytes,
            self.extent_size,
            self.sector_size,
            self.max_hosts,
            self.table_slots,
            0,
            self.lease_offset,
            self.table_a,
            self.table_b,
            self.data_offset,
            self.device_size,
            self.created,
        )
        body += _CRC.pack(_crc(body))
        return body + b"\0" * (BLOCK - len(body))

    @classmethod
    def unpack(cls, block: bytes, where: str = "superblock") -> Superblock:
        """The superblock in block; DataCorrupt when torn or not ours."""
        n = _SUPER.size
        if block[:8] != MAGIC:
            raise DataCorrupt(f"{where}: no blockferry shared-pool superblock (magic {bytes(block[:8])!r})")
        (crc,) = _CRC.unpack_from(block, n)
        if crc != _crc(bytes(block[:n])):
            raise DataCorrupt(f"{where}: checksum mismatch (torn write?)")
        (_, version, flags, pool, extent, sector, max_hosts, slots, _, lease, ta, tb, data, devsize, created) = (
            _SUPER.unpack_from(block)
        )
        if version != VERSION:
            raise DataCorrupt(f"{where}: format version {version}; this agent reads version {VERSION}")
        sb = cls(
            pool_uuid=str(uuid.UUID(bytes=pool)),
            extent_size=extent,
            sector_size=sector,
            table_slots=slots,
            device_size=devsize,
            created=created,
            version=version,
            flags=flags,
            max_hosts=max_hosts,
        )
        if (lease, ta, tb, data) != (sb.lease_offset, sb.table_a, sb.table_b, sb.data_offset):
            raise DataCorrupt(f"{where}: layout offsets do not match format version {VERSION}")
        return sb


# magic slot state kind pad generation offset size volume layer parent updated owner_gen
_REC = struct.Struct("<4sIBBHQQQ16s16s16sQQ")
_REC_PAD = RECORD - _REC.size - _CRC.size

FREE, USED = 0, 1
LAYER, META = 1, 2  # a qcow2 layer of a volume; a volume's metadata
REC_MAGIC = b"BFSL"


@dataclass(frozen=True)
class SliceRecord:
    """One slot of the slice table: a byte range of the data area that holds
    one qcow2 layer (kind LAYER) or one volume's metadata (kind META).
    generation grows on every change of the slot, so an opener can tell that
    the geometry it holds is stale."""

    slot: int
    state: int = FREE
    kind: int = 0
    generation: int = 0
    offset: int = 0
    size: int = 0
    volume: str = ""  # uuid
    layer: str = ""  # uuid of the layer (the snapshot uuid, or the head's own)
    parent: str = ""  # uuid of the layer it is backed by, "" for none
    updated: int = 0  # unix seconds
    owner_gen: int = 0  # the owner lease's generation that wrote it

    @property
    def used(self) -> bool:
        return self.state == USED

    @property
    def end(self) -> int:
        return self.offset + self.size

    def pack(self) -> bytes:
        body = _REC.pack(
            REC_MAGIC,
            self.slot,
            self.state,
            self.kind,
            0,
            self.generation,
            self.offset,
            self.size,
            _uuid_bytes(self.volume),
            _uuid_bytes(self.layer),
            _uuid_bytes(self.parent),
            self.updated,
            self.owner_gen,
        )
        body += b"\0" * _REC_PAD
        return body + _CRC.pack(_crc(body))

    @classmethod
    def unpack(cls, raw: bytes, slot: int) -> SliceRecord | None:
        """The record in raw, an empty record for a never-written slot, None
        when torn (bad magic or checksum)."""
        if not any(raw):
            return cls(slot=slot)
        if raw[:4] != REC_MAGIC or _CRC.unpack_from(raw, RECORD - 4)[0] != _crc(bytes(raw[: RECORD - 4])):
            return None
        (_, s, state, kind, _, gen, off, size, vol, layer, parent, updated, owner_gen) = _REC.unpack_from(raw)
        if s != slot:
            return None  # a record written into the wrong place is not this slot's
        return cls(
            slot=slot,
            state=state,
            kind=kind,
            generation=gen,
            offset=off,
            size=size,
            volume=_uuid_str(vol),
            layer=_uuid_str(layer),
            parent=_uuid_str(parent),
            updated=updated,
            owner_gen=owner_gen,
        )


def resolve(slot: int, a: SliceRecord | None, b: SliceRecord | None) -> tuple[SliceRecord, bool]:
    """The record of a slot from its two copies, and whether they disagree
    (a write that did not reach copy B). A is written first, so a valid A
    is the newer; B stands in for a torn A."""
    if a is None and b is None:
        raise DataCorrupt(f"slice table: slot {slot} is torn in both copies")
    if a is None:
        return b, True  # type: ignore[return-value]
    if b is None:
        return a, True
    if a == b:
        return a, False
    return (a if a.generation >= b.generation else b), True


# magic host_id flags owner generation counter timestamp_ms timeout_ms address
_LEASE = struct.Struct("<8sII16sQQQI64s")
ADDRESS_MAX = 64
LEASE_MAGIC = b"BFLEASE1"
RELEASED = 1
# a host lease its agent left, unreleased, on a clean stop while VMs on its host still had the
# pool's slices open: its own agent takes it back at once; for every other host it stays held
# (and lapses, to be fenced, if the agent does not come back)
HANDED_OVER = 2


@dataclass(frozen=True)
class LeaseRecord:
    """A delta lease: its holder renews it by rewriting it with counter+1;
    others judge it alive when the bytes change within timeout_ms of their
    own clock (hosts' clocks are never compared)."""

    host_id: int = 0
    owner: str = ""  # the holder's host uuid
    generation: int = 0  # grows on every acquisition
    counter: int = 0  # grows on every renewal
    timestamp_ms: int = 0  # the holder's wall clock, for people only
    timeout_ms: int = 0
    flags: int = 0
    address: str = ""  # where the holder's agent answers (host:port), for hosts that ask it

    @property
    def free(self) -> bool:
        return not self.owner or bool(self.flags & RELEASED)

    def pack(self) -> bytes:
        body = _LEASE.pack(
            LEASE_MAGIC,
            self.host_id,
            self.flags,
            _uuid_bytes(self.owner),
            self.generation,
            self.counter,
            self.timestamp_ms,
            self.timeout_ms,
            self.address.encode()[:ADDRESS_MAX],
        )
        body += _CRC.pack(_crc(body))
        return body + b"\0" * (BLOCK - len(body))

    @classmethod
    def unpack(cls, block: bytes) -> LeaseRecord | None:
        """The lease in block, a free lease for a never-written block, None when torn."""
        n = _LEASE.size
        if not any(block[: n + 4]):
            return cls()
        if block[:8] != LEASE_MAGIC or _CRC.unpack_from(block, n)[0] != _crc(bytes(block[:n])):
            return None
        (_, host_id, flags, owner, gen, counter, ts, timeout, address) = _LEASE.unpack_from(block)
        return cls(
            host_id=host_id,
            owner=_uuid_str(owner),
            generation=gen,
            counter=counter,
            timestamp_ms=ts,
            timeout_ms=timeout,
            flags=flags,
            address=address.rstrip(b"\0").decode(errors="replace"),
        )


def lease_offset(index: int) -> int:
    """Where lease block `index` is: OWNER_LEASE, or a host id 1..MAX_HOSTS."""
    if not 0 <= index < LEASE_BLOCKS:
        raise ValueError(f"lease index {index} out of range")
    return LEASE_OFFSET + index * BLOCK


def _uuid_bytes(value: str) -> bytes:
    return uuid.UUID(value).bytes if value else NIL


def _uuid_str(raw: bytes) -> str:
    return "" if raw == NIL else str(uuid.UUID(bytes=raw))
