"""Extent types shared by drivers, the native core and the backup engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range [start, start + length)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class AllocExtent:
    """An extent of an image's allocation: data, or zero (hole or zero cluster)."""

    start: int
    length: int
    zero: bool
    hole: bool

    @property
    def end(self) -> int:
        return self.start + self.length


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Sort extents and merge the overlapping and adjacent ones."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda e: e.start):
        if out and e.start <= out[-1].end:
            end = max(out[-1].end, e.end)
            out[-1] = Extent(out[-1].start, end - out[-1].start)
        else:
            out.append(e)
    return out


def file_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Yield (offset, length, is_data) covering [start, end) of an open file,
    using SEEK_DATA/SEEK_HOLE so holes are never read. Where the file system
    or device cannot tell (block devices), everything is data."""
    import errno
    import os

    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole after pos
                yield pos, end - pos, False
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end - pos, True
                return
            raise
        if data > pos:
            hole_end = min(data, end)
            yield pos, hole_end - pos, False
            pos = hole_end
            if pos >= end:
                return
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole - pos, True
        pos = hole
