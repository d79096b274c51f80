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
