"""Read a persistent dirty bitmap straight from a qcow2 file.

An incremental backup of a qcow2 snapshot needs the dirty bitmaps of the
frozen layers between two snapshots. Asking qemu for them costs two
processes per query (`qemu-img info` to check the bitmaps, a qemu-nbd to
export one), which dominated small incrementals. The layers are immutable once a snapshot froze them, so the agent
reads the bitmap itself, as docs/interop/qcow2.txt lays it out:

    header (v3) -> autoclear bit 0 (the bitmaps extension is consistent)
    header extension 0x23852875 -> bitmap directory
    directory entry (name, flags, granularity) -> bitmap table
    table entry -> a cluster of bitmap data, or all zeros / all ones

Bit n (least significant first in each byte) covers guest bytes
[n * granularity, (n + 1) * granularity).

Anything that makes the bitmap untrustworthy is TrackingLost, never a guess:
no such bitmap, the `in_use` flag (qemu did not save it), the autoclear bit
cleared (a program that does not know bitmaps wrote the image), a corrupt
image, a bitmap of another type, or unknown extra data. tests/test_qcow2.py
compares this reader with qemu-nbd's export of the same bitmaps.
"""

from __future__ import annotations

import os
import re
import struct

from agent.errors import TrackingLost
from agent.extents import Extent
from agent.volumes.qcow2.header import INCOMPAT_CORRUPT, MAGIC, extensions, pread_exact
from agent.volumes.qcow2.poolfs import LocalFiles

EXT_BITMAPS = 0x23852875
AUTOCLEAR_BITMAPS = 1 << 0
IN_USE, AUTO, EXTRA_DATA_COMPATIBLE = 1 << 0, 1 << 1, 1 << 2
TYPE_DIRTY_TRACKING = 1
_OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of a bitmap table entry
_NONZERO = re.compile(rb"[^\x00]+")


def _lost(label: str, name: str, why: str) -> TrackingLost:
    return TrackingLost(f"snapshot_uuid: the dirty bitmap {name} of {label} {why}", field="snapshot_uuid")


def dirty_extents(path: str, name: str, label: str = "", fs=None) -> list[Extent]:
    """The guest ranges bitmap `name` of the qcow2 file at path marks dirty,
    sorted and merged (granularity-aligned, the last one cut at the disk's
    size). label names the layer in errors (default: the file's name); fs
    (agent.volumes.qcow2.poolfs.PoolFiles) reaches the file (default: local)."""
    label = label or os.path.basename(path)
    try:
        f = (fs or LocalFiles()).open_ro(path)
    except OSError as e:
        raise _lost(label, name, f"cannot be read ({e.strerror})") from None
    try:
        return _read(f, label, name)
    except (OSError, struct.error) as e:
        raise _lost(label, name, f"cannot be read ({e})") from None
    finally:
        f.close()


def _read(fd, path: str, name: str) -> list[Extent]:
    hdr = pread_exact(fd, 104, 0)
    magic, version = struct.unpack_from(">4sI", hdr, 0)
    if magic != MAGIC or version < 3:
        raise _lost(path, name, "is missing (not a qcow2 v3 image)")
    (cluster_bits,) = struct.unpack_from(">I", hdr, 20)
    (disk_size,) = struct.unpack_from(">Q", hdr, 24)
    incompatible, _compatible, autoclear = struct.unpack_from(">QQQ", hdr, 72)
    (header_length,) = struct.unpack_from(">I", hdr, 100)
    cluster = 1 << cluster_bits
    if incompatible & INCOMPAT_CORRUPT:
        raise _lost(path, name, "is in an image marked corrupt")
    # header extensions, up to the end of the first cluster
    area = pread_exact(fd, cluster - header_length, header_length) if header_length < cluster else b""
    directory = None
    for kind, data in extensions(area):
        if kind == EXT_BITMAPS:
            _nb, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", data, 0)
            directory = (dir_offset, dir_size)
    if directory is None:
        raise _lost(path, name, "is missing (the image holds no bitmaps)")
    if not autoclear & AUTOCLEAR_BITMAPS:
        raise _lost(path, name, "is inconsistent (the image was written by a program that does not keep bitmaps)")
    entries = pread_exact(fd, directory[1], directory[0]) if directory[1] else b""
    pos = 0
    while pos + 24 <= len(entries):
        table_offset, table_size, flags, btype, gran_bits, name_size, extra_size = struct.unpack_from(
            ">QIIBBHI", entries, pos
        )
        start = pos + 24 + extra_size
        entry_name = entries[start : start + name_size].decode("utf-8", "replace")
        pos += (24 + extra_size + name_size + 7) // 8 * 8  # entries are padded to 8 bytes
        if entry_name != name:
            continue
        if flags & IN_USE:
            raise _lost(path, name, "is inconsistent (in use: qemu did not save it)")
        if btype != TYPE_DIRTY_TRACKING or (extra_size and not flags & EXTRA_DATA_COMPATIBLE):
            raise _lost(path, name, "is of a kind this agent does not read")
        return _extents(fd, path, name, table_offset, table_size, cluster, 1 << gran_bits, disk_size)
    raise _lost(path, name, "is missing")


def _extents(fd, path, name, table_offset, table_size, cluster, granularity, disk_size) -> list[Extent]:
    bits = (disk_size + granularity - 1) // granularity
    nbytes = (bits + 7) // 8
    if table_size != (nbytes + cluster - 1) // cluster:
        raise _lost(path, name, f"has a table of {table_size} entries for {nbytes} bytes of bitmap")
    table = struct.unpack(f">{table_size}Q", pread_exact(fd, 8 * table_size, table_offset)) if table_size else ()
    out: list[Extent] = []

    def add(first_bit: int, nbits: int) -> None:
        start = first_bit * granularity
        end = min(disk_size, (first_bit + nbits) * granularity)
        if out and out[-1].end == start:
            out[-1] = Extent(out[-1].start, end - out[-1].start)
        else:
            out.append(Extent(start, end - start))

    for i, entry in enumerate(table):
        base_bit = i * cluster * 8
        want = min(cluster, nbytes - i * cluster)
        offset = entry & _OFFSET_MASK
        if offset == 0:
            if entry & 1:  # a cluster of all ones
                add(base_bit, min(want * 8, bits - base_bit))
            continue
        data = pread_exact(fd, want, offset)
        for m in _NONZERO.finditer(data):
            run_start, run_end = m.start(), m.end()
            j = run_start
            while j < run_end:
                b = data[j]
                if b == 0xFF:  # whole bytes at a time
                    k = j
                    while k < run_end and data[k] == 0xFF:
                        k += 1
                    add(base_bit + j * 8, (k - j) * 8)
                    j = k
                    continue
                bit = 0
                while bit < 8:
                    if b >> bit & 1:
                        first = bit
                        while bit < 8 and b >> bit & 1:
                            bit += 1
                        add(base_bit + j * 8 + first, bit - first)
                    else:
                        bit += 1
                j += 1
    return [e for e in out if e.length > 0]
