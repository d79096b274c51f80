"""Where the data of a few guest ranges of a qcow2 chain lives, from the
layers' own L1/L2 tables (docs/interop/qcow2.txt), without a qemu process.

An incremental backup reads a handful of changed chunks; `qemu-img map`
walks the whole image through every layer for them, a cost that grows
with the image and the chain. Here only the L2 tables that cover the wanted
ranges are read, layer by layer down the backing chain:

    header -> backing file, cluster size, L1 table
    L1 entry -> L2 table; L2 entry -> host cluster, zero flag, or nothing
    nothing -> the backing layer; a raw base: the same offset in the file

The result is qemu_img.MapEntry records for exactly the asked ranges, which
direct.py reads with pread. Anything unusual makes map_ranges() return
None and the caller uses `qemu-img map`: encryption, an external data file,
extended L2 entries, a corrupt flag, a compressed cluster in the ranges, a
backing format other than qcow2 or raw, a chain deeper than 64 layers, or a
virtual size other than the caller expects. Layers are opened read-only and
the descriptors stay with the reader (a snapshot's layers are never
rewritten in place: see direct.py). tests/test_qcow2.py checks the data
read through this map against `qemu-img convert` of the same chain.
"""

from __future__ import annotations

import os
import struct

from agent.volumes.qcow2.header import INCOMPAT_CORRUPT, MAGIC, extensions, pread_exact
from agent.volumes.qcow2.qemu_img import MapEntry

INCOMPAT_EXTERNAL_DATA = 1 << 2
INCOMPAT_EXTENDED_L2 = 1 << 4
EXT_BACKING_FORMAT = 0xE2792ACA
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_COMPRESSED = 1 << 62
L2_ZERO = 1 << 0
MAX_DEPTH = 64


class Unsupported(Exception):
    """Leave this image to qemu-img map."""


class _Layer:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.backing: str | None = None
        self.backing_format: str | None = None
        self._l2: dict[int, tuple[int, ...]] = {}

    def close(self) -> None:
        os.close(self.fd)

    def _pread(self, n: int, off: int) -> bytes:
        return pread_exact(self.fd, n, off)


class _Raw(_Layer):
    def __init__(self, path: str):
        super().__init__(path)
        self.size = os.fstat(self.fd).st_size

    def run(self, pos: int, end: int):
        """(kind, host offset, length) of the run at pos: data up to the
        file's end, zeros past it."""
        if pos >= self.size:
            return "zero", 0, end - pos
        return "data", pos, min(end, self.size) - pos


class _Qcow2(_Layer):
    def __init__(self, path: str):
        super().__init__(path)
        hdr = self._pread(104, 0) if os.fstat(self.fd).st_size >= 104 else self._pread(72, 0)
        magic, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off = struct.unpack_from(
            ">4sIQIIQIIQ", hdr, 0
        )
        if magic != MAGIC or version not in (2, 3) or crypt:
            raise Unsupported(f"{path}: not a plain qcow2 v2/v3 image")
        header_length = 72
        if version == 3:
            (incompatible,) = struct.unpack_from(">Q", hdr, 72)
            (header_length,) = struct.unpack_from(">I", hdr, 100)
            if incompatible & (INCOMPAT_CORRUPT | INCOMPAT_EXTERNAL_DATA | INCOMPAT_EXTENDED_L2):
                raise Unsupported(f"{path}: incompatible features {incompatible:#x}")
        self.cluster = 1 << cluster_bits
        self.size = size
        self.l2_entries = self.cluster // 8
        self.l1 = struct.unpack(f">{l1_size}Q", self._pread(8 * l1_size, l1_off)) if l1_size else ()
        if backing_off:
            self.backing = self._pread(backing_len, backing_off).decode()
            if version == 3:  # the backing format, from the header extensions
                area = self._pread(max(0, min(self.cluster, backing_off) - header_length), header_length)
                for kind, data in extensions(area):
                    if kind == EXT_BACKING_FORMAT:
                        self.backing_format = data.decode()

    def _l2_table(self, offset: int) -> tuple[int, ...]:
        table = self._l2.get(offset)
        if table is None:
            table = self._l2[offset] = struct.unpack(f">{self.l2_entries}Q", self._pread(self.cluster, offset))
        return table

    def run(self, pos: int, end: int):
        """(kind, host offset, length) for [pos, end) up to the end of the
        cluster at pos: kind is data, zero or below (ask the backing layer)."""
        if pos >= self.size:
            return "zero", 0, end - pos
        cluster = pos // self.cluster
        within = pos % self.cluster
        n = min(end, (cluster + 1) * self.cluster, self.size) - pos
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_offset = self.l1[l1_index] & L1_OFFSET_MASK if l1_index < len(self.l1) else 0
        if not l2_offset:
            return "below", 0, n
        entry = self._l2_table(l2_offset)[l2_index]
        if entry & L2_COMPRESSED:
            raise Unsupported(f"{self.path}: compressed cluster at guest offset {cluster * self.cluster}")
        if entry & L2_ZERO:
            return "zero", 0, n
        host = entry & L2_OFFSET_MASK
        if not host:
            return "below", 0, n
        return "data", host + within, n


def _open_chain(path: str) -> list[_Layer]:
    layers: list[_Layer] = []
    try:
        layer: _Layer = _Qcow2(path)
        layers.append(layer)
        while layer.backing:
            if len(layers) >= MAX_DEPTH:
                raise Unsupported(f"{path}: a backing chain deeper than {MAX_DEPTH}")
            backing = (
                layer.backing
                if os.path.isabs(layer.backing)
                else os.path.join(os.path.dirname(layer.path), layer.backing)
            )
            fmt = layer.backing_format
            if fmt == "raw":
                layer = _Raw(backing)
            elif fmt in ("qcow2", None):
                layer = _Qcow2(backing)  # an unnamed format that is not qcow2 is refused by its magic
            else:
                raise Unsupported(f"{backing}: backing format {fmt}")
            layers.append(layer)
    except BaseException:
        for x in layers:
            x.close()
        raise
    return layers


def _resolve(layers: list[_Layer], depth: int, pos: int, end: int, out: list[MapEntry]) -> None:
    while pos < end:
        if depth >= len(layers):  # below the bottom layer: zeros
            _add(out, MapEntry(pos, end - pos, depth, False, True, False, None, False))
            return
        kind, host, n = layers[depth].run(pos, end)
        if kind == "below":
            _resolve(layers, depth + 1, pos, pos + n, out)
        elif kind == "zero":
            _add(out, MapEntry(pos, n, depth, True, True, False, None, False))
        else:
            _add(out, MapEntry(pos, n, depth, True, False, True, host, False))
        pos += n


def _add(out: list[MapEntry], e: MapEntry) -> None:
    """Append, merging with the previous entry when it continues it."""
    if out:
        p = out[-1]
        if (
            p.start + p.length == e.start
            and p.depth == e.depth
            and p.data == e.data
            and p.zero == e.zero
            and p.present == e.present
            and (not e.data or p.offset + p.length == e.offset)
        ):
            out[-1] = MapEntry(p.start, p.length + e.length, p.depth, p.present, p.zero, p.data, p.offset, False)
            return
    out.append(e)


def map_ranges(path: str, size: int, ranges: list[tuple[int, int]]):
    """(entries, layer paths top first, fds by depth) for the guest ranges
    [(start, length)] of the image at path, or None to use qemu-img map
    (also when its virtual size is not size). The caller owns the fds."""
    try:
        layers = _open_chain(path)
    except (Unsupported, OSError, struct.error, UnicodeDecodeError):
        return None
    try:
        if layers[0].size != size:
            raise Unsupported("size")
        out: list[MapEntry] = []
        for start, length in sorted(ranges):
            if out and start < out[-1].start + out[-1].length:
                raise Unsupported("overlapping ranges")
            _resolve(layers, 0, start, min(start + length, size), out)
    except (Unsupported, OSError, struct.error):
        for x in layers:
            x.close()
        return None
    return out, [x.path for x in layers], {d: x.fd for d, x in enumerate(layers)}
