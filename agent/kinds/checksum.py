"""The `checksum` job: the image digest of a file or block device range, or
of a volume or snapshot in a pool.

Files: holes are skipped without reading (SEEK_DATA/SEEK_HOLE), data is read
in 4 MiB pieces into one reused buffer and hashed by the native core with the
GIL released. Volumes: read through qemu-nbd, zero extents never read.
Progress counts holes too, so it reaches 100 %.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from agent import native
from agent.errors import InvalidArgument, NotFound, OutOfRange, StorageIOError
from agent.extents import file_extents
from agent.jobs.kinds import Claim, JobKind, NullContext
from agent.jobs.locks import LockMode
from agent.paths import resolve_under_roots

READ_SIZE = 4 << 20
MAX_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class ChecksumSpec:
    path: str = ""
    offset: int = 0
    length: int = 0  # 0: to the end
    pool_uuid: str = ""  # instead of path: a volume (its live state) or one of its snapshots
    volume_uuid: str = ""
    snapshot_uuid: str = ""


@dataclass(frozen=True)
class ChecksumResult:
    image_digest: str
    format: str
    length: int
    data_bytes: int
    hole_bytes: int


def _open_checked(path: str, roots: list[str]) -> tuple[str, int]:
    real = resolve_under_roots(path, roots, "path")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"path: {path!r} does not exist", field="path") from None
    except OSError as e:
        raise StorageIOError(f"path: cannot open {path!r}: {e.strerror}", field="path") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise InvalidArgument(f"path: {path!r} is not a regular file or block device", field="path")
    return real, fd


def _range(spec: ChecksumSpec, size: int) -> tuple[int, int]:
    if spec.offset < 0:
        raise InvalidArgument(f"offset: must not be negative, got {spec.offset}", field="offset")
    if spec.length < 0:
        raise InvalidArgument(f"length: must not be negative, got {spec.length}", field="length")
    if spec.offset + spec.length > MAX_SIZE:
        raise OutOfRange("offset+length: overflows a 63-bit size", field="length")
    if spec.offset > size:
        raise OutOfRange(f"offset: {spec.offset} is beyond the end of the file ({size} bytes)", field="offset")
    end = spec.offset + spec.length if spec.length else size
    if end > size:
        raise OutOfRange(f"length: offset+length = {end} is beyond the end of the file ({size} bytes)", field="length")
    return spec.offset, end


class ChecksumKind(JobKind):
    name = "checksum"
    spec_type = ChecksumSpec
    result_type = ChecksumResult

    def __init__(self, roots: list[str], pools=None):
        self.roots = roots
        self.pools = pools

    def _check_volume(self, spec: ChecksumSpec):
        if spec.path or spec.offset or spec.length:
            raise InvalidArgument("path: give either a path (with offset/length) or a volume, not both", field="path")
        pool = self.pools.get(spec.pool_uuid)
        if spec.snapshot_uuid:
            pool.snapshot_info(spec.volume_uuid, spec.snapshot_uuid)
        else:
            pool.volume_info(spec.volume_uuid)
        return pool

    def prepare(self, spec: ChecksumSpec) -> Claim:
        if spec.pool_uuid or spec.volume_uuid:
            self._check_volume(spec)
            from agent.kinds.volumes import volume_resource

            return Claim(volume_resource(spec.pool_uuid, spec.volume_uuid), LockMode.SHARED)
        real, fd = _open_checked(spec.path, self.roots)
        try:
            _range(spec, os.lseek(fd, 0, os.SEEK_END))
        finally:
            os.close(fd)
        return Claim(f"file:{real}", LockMode.SHARED)

    def run(self, spec: ChecksumSpec, ctx) -> ChecksumResult:
        if spec.pool_uuid or spec.volume_uuid:
            d = self._check_volume(spec).image_digest(spec.volume_uuid, spec.snapshot_uuid or None, ctx)
            return ChecksumResult(
                image_digest=d.image_digest,
                format=native.IMAGE_DIGEST_FORMAT,
                length=d.length,
                data_bytes=d.data_bytes,
                hole_bytes=d.zero_bytes,
            )
        real, fd = _open_checked(spec.path, self.roots)
        try:
            start, end = _range(spec, os.lseek(fd, 0, os.SEEK_END))
            ctx.progress(0, end - start, "reading")
            return digest_range(fd, start, end, ctx, name=spec.path)
        finally:
            os.close(fd)


def digest_range(fd: int, start: int, end: int, ctx=None, name: str = "file") -> ChecksumResult:
    """Image digest of [start, end) of an open file or block device."""
    ctx = ctx or NullContext()
    h = native.ImageHash()
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    data_bytes = hole_bytes = 0
    try:
        for off, length, is_data in file_extents(fd, start, end):
            if not is_data:
                h.zero(length)
                hole_bytes += length
                ctx.progress(off + length - start)
                continue
            pos = off
            while pos < off + length:
                ctx.checkpoint()
                n = min(READ_SIZE, off + length - pos)
                got = os.preadv(fd, [view[:n]], pos)
                if got != n:
                    raise StorageIOError(
                        f"path: short read at offset {pos} of {name!r} (file shrank while reading?)", field="path"
                    )
                ctx.throttle(n)
                h.update(view[:n])
                pos += n
                data_bytes += n
                ctx.progress(pos - start)
    except OSError as e:
        raise StorageIOError(
            f"path: read error on {name!r}: {os.strerror(e.errno or errno.EIO)}", field="path"
        ) from None
    return ChecksumResult(
        image_digest=h.digest().hex(),
        format=native.IMAGE_DIGEST_FORMAT,
        length=end - start,
        data_bytes=data_bytes,
        hole_bytes=hole_bytes,
    )
