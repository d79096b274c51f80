"""The pieces of the qcow2 on-disk header (docs/interop/qcow2.txt) that the
agent reads itself, shared by map.py (L1/L2 tables) and bitmap.py
(dirty bitmaps): exact reads and the walk over the header extensions."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

MAGIC = b"QFI\xfb"
INCOMPAT_CORRUPT = 1 << 1


def pread_exact(f, n: int, off: int) -> bytes:
    """n bytes at off of f (a file descriptor, or a PoolFiles ReadFile), or
    OSError when the file ends before them."""
    data = os.pread(f, n, off) if isinstance(f, int) else f.pread(n, off)
    if len(data) != n:
        raise OSError(f"short read of {n} bytes at {off}")
    return data


def extensions(area: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, data) of each header extension in area (the bytes right after
    the header), up to the end marker; each is padded to 8 bytes."""
    pos = 0
    while pos + 8 <= len(area):
        kind, length = struct.unpack_from(">II", area, pos)
        if kind == 0:
            return
        yield kind, area[pos + 8 : pos + 8 + length]
        pos += 8 + (length + 7) // 8 * 8
