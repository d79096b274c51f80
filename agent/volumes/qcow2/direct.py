"""Read and write qcow2 data straight at its clusters' host offsets.

Reading a snapshot:
A snapshot of a directory pool is an immutable chain of qcow2 files (and
maybe a raw base). `qemu-img map` tells, for every guest range, which layer
holds it (depth) and at which host offset, when the cluster is stored as it
is. Reading those ranges with pread() gives the guest data with one copy
(page cache -> our buffer), instead of three through qemu-nbd (page cache ->
qemu-nbd -> socket -> us), and leaves the CPU to hashing: measured in
bench/backup_bench.py.

Safe because the layers below a volume's head are never rewritten in place:
deleting a snapshot rebases its children (new clusters only) and unlinks the
layer, and an unlinked file stays readable through the descriptors opened
here, under the volume's lock, together with the map. Images whose data
clusters have no host offset (compressed or encrypted clusters) are not
mapped: `open_mapped()` returns None and the caller reads through qemu-nbd.

Restoring into a new image: created with preallocation=metadata, every guest
cluster already has a host offset in a sparse file, so the data is written
with pwrite at the offsets qemu-img map gives, without a qemu process in
between; clusters never written stay holes and read as zeros. Nothing else
opens the image until the restore commits it into the pool.
"""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from agent import native
from agent.errors import StorageIOError
from agent.extents import AllocExtent
from agent.volumes.base import RestoreTarget, SnapshotReader, VolumeInfo
from agent.volumes.qcow2 import qemu_img

READERS = 2  # preads in parallel (they release the GIL); helps when the data is not cached
IN_FLIGHT = 4
# a restore starts a background fdatasync after this many bytes: dirty pages
# piling up stall the writers, so larger steps or one flush at the end are
# slower (bench/backup_bench.py)
SYNC_EVERY = 32 << 20
_ZEROS = bytes(4 << 20)


@dataclass(frozen=True, slots=True)
class _Piece:
    start: int  # guest offset
    length: int
    fd: int  # -1: reads as zeros
    offset: int  # host offset in fd

    @property
    def end(self) -> int:
        return self.start + self.length


def open_mapped(path: str, only: tuple[int, list[tuple[int, int]]] | None = None) -> MappedSnapshotReader | None:
    """A reader of the image at path (its whole backing chain), or None when
    some data cannot be read raw. Call under the volume's lock.

    only=(size, ranges): the caller reads just these guest ranges (an
    incremental backup's changed chunks) of an image it expects to be size
    bytes: they are mapped from the layers' L2 tables (map.py) instead of
    a whole `qemu-img map`, and the reader serves only them. When that does
    not apply (another size, compressed clusters...) the whole image is
    mapped as usual."""
    if only is not None:
        from agent.volumes.qcow2.map import map_ranges

        partial = map_ranges(path, *only)
        if partial is not None:
            entries, _paths, fds = partial
            pieces = [
                _Piece(e.start, e.length, fds[e.depth], e.offset) if e.data else _Piece(e.start, e.length, -1, 0)
                for e in entries
            ]
            return MappedSnapshotReader(only[0], entries, pieces, list(fds.values()), partial=True)
    with ThreadPoolExecutor(1, thread_name_prefix="bf-map") as pool:  # two qemu-img runs at once
        chain_f = pool.submit(qemu_img.chain_info, path)
        entries = qemu_img.map_image(path)
        chain = chain_f.result()
    if any(e.data and (e.offset is None or e.compressed) for e in entries):
        return None
    if any(e.data and e.depth >= len(chain) for e in entries):
        return None
    fds: dict[int, int] = {}
    try:
        pieces = []
        for e in entries:
            if e.data:
                if e.depth not in fds:
                    fds[e.depth] = os.open(chain[e.depth].path, os.O_RDONLY | os.O_CLOEXEC)
                pieces.append(_Piece(e.start, e.length, fds[e.depth], e.offset))
            else:
                pieces.append(_Piece(e.start, e.length, -1, 0))
        size = chain[0].virtual_size
    except OSError as exc:
        for fd in fds.values():
            os.close(fd)
        raise StorageIOError(f"cannot open a layer of {path}: {exc.strerror}") from None
    return MappedSnapshotReader(size, entries, pieces, list(fds.values()))


def open_mapped_ranges(
    size: int, entries: list, fd: int, bases: list[int], *, direct: bool = False
) -> MappedSnapshotReader | None:
    """A reader of a chain whose layers all live in one file or device at
    byte offsets bases[depth] (a shared LUN's slices), from `qemu-img map`
    entries of the chain; None when some data cannot be read raw. direct:
    fd is open with O_DIRECT (page-aligned buffers; clusters and slices are
    sector-aligned). The reader owns fd from then on (closed with it)."""
    if any(e.data and (e.offset is None or e.compressed or e.depth >= len(bases)) for e in entries):
        return None
    pieces = [
        _Piece(e.start, e.length, fd, bases[e.depth] + e.offset) if e.data else _Piece(e.start, e.length, -1, 0)
        for e in entries
    ]
    return MappedSnapshotReader(size, entries, pieces, [fd], aligned=direct)


class MappedSnapshotReader(SnapshotReader):
    def __init__(
        self, size: int, entries: list, pieces: list[_Piece], fds: list[int], *, partial: bool = False, aligned=False
    ):
        self._aligned = aligned  # buffers in page-aligned memory (O_DIRECT reads)
        self._size = size
        self._partial = partial  # maps only the ranges the caller asked for
        self._entries = entries
        self._pieces = pieces
        self._starts = [p.start for p in pieces]
        self._fds = fds
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> MappedSnapshotReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def size(self) -> int:
        return self._size

    def extents(self) -> list[AllocExtent]:
        if self._partial:
            raise StorageIOError("this snapshot reader maps only the ranges it was opened for")
        out: list[AllocExtent] = []
        for e in self._entries:
            zero, hole = e.zero or not e.data, not e.present  # preallocated clusters may read as zeros
            if out and out[-1].end == e.start and out[-1].zero == zero and out[-1].hole == hole:
                out[-1] = AllocExtent(out[-1].start, out[-1].length + e.length, zero, hole)
            else:
                out.append(AllocExtent(e.start, e.length, zero, hole))
        return out

    # ---- data ----

    def _buffer(self, n: int):
        with self._lock:
            for i, b in enumerate(self._free):
                if len(b) == n:
                    return self._free.pop(i)
        return mmap.mmap(-1, n) if self._aligned else bytearray(n)

    def _give_back(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < IN_FLIGHT * 4:
                self._free.append(buf)

    def _fill(self, start: int, length: int) -> bytearray:
        """The guest range [start, start+length) in a buffer."""
        buf = self._buffer(length)
        view = memoryview(buf)
        pos, end = start, start + length
        k = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if k < 0 or k >= len(self._pieces) or self._pieces[k].end <= pos:
                raise StorageIOError(f"snapshot map has no entry at {pos}")
            p = self._pieces[k]
            n = min(p.end, end) - pos
            dst = view[pos - start : pos - start + n]
            if p.fd < 0:
                for z in range(0, n, len(_ZEROS)):
                    m = min(len(_ZEROS), n - z)
                    dst[z : z + m] = _ZEROS[:m]
            else:
                host, got = p.offset + (pos - p.start), 0
                while got < n:
                    r = os.preadv(p.fd, [dst[got:]], host + got)
                    if r == 0:  # past the end of a raw base file: zeros
                        dst[got:] = _ZEROS[: n - got] if n - got <= len(_ZEROS) else bytes(n - got)
                        break
                    got += r
            pos += n
            k += 1
        return buf

    def read(self, extents, on_data, request_size: int, checkpoint=None) -> None:
        requests = (
            (off, min(request_size, e.end - off)) for e in extents for off in range(e.start, e.end, request_size)
        )
        pending: deque[tuple[int, Future]] = deque()
        with ThreadPoolExecutor(READERS, thread_name_prefix="bf-pread") as pool:
            try:
                for off, n in requests:
                    pending.append((off, pool.submit(self._fill, off, n)))
                    while len(pending) >= IN_FLIGHT:
                        self._deliver(pending, on_data, checkpoint)
                while pending:
                    self._deliver(pending, on_data, checkpoint)
            except OSError as e:
                raise StorageIOError(f"cannot read the snapshot: {e.strerror}") from None
            finally:
                for _, f in pending:
                    f.cancel()

    def _deliver(self, pending, on_data, checkpoint) -> None:
        off, f = pending.popleft()
        buf = f.result()
        self._held = None
        try:
            if checkpoint:
                checkpoint()
            on_data(off, memoryview(buf))
        finally:
            if self._held is not buf:
                self._give_back(buf)
            self._held = None

    def hold(self, view) -> Callable[[], None]:
        buf = view.obj
        self._held = buf
        return lambda: self._give_back(buf)


class DirectRestoreTarget(RestoreTarget):
    """A restore into a new image with preallocated metadata (see above).
    A background fdatasync every SYNC_EVERY bytes keeps the disk writing
    during the restore instead of only at the end. Writes are positional:
    several threads may write at once, in any order."""

    concurrent = True

    def __init__(
        self, tmp: str, commit: Callable[[], VolumeInfo], abort: Callable[[], None], *, zero_run: int = 64 << 10
    ):
        self._commit, self._abort = commit, abort
        self.zero_run = zero_run
        entries = qemu_img.map_image(tmp)
        if any(e.depth != 0 or e.offset is None for e in entries):
            raise StorageIOError(f"{tmp}: metadata is not preallocated for every cluster")
        self._pieces = [_Piece(e.start, e.length, -1, e.offset) for e in entries]
        self._starts = [p.start for p in self._pieces]
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="bf-sync")
        self._sync: Future | None = None
        self._unsynced = 0
        self._lock = threading.Lock()

    def write(self, offset: int, data) -> None:
        view = memoryview(data)
        try:
            for a, b in native.nonzero_runs(view, self.zero_run):
                self._pwrite(view[a:b], offset + a)
        except OSError as e:
            raise StorageIOError(f"cannot write the restored volume: {e.strerror}") from None
        with self._lock:
            self._unsynced += len(view)
            if self._unsynced >= SYNC_EVERY and (self._sync is None or self._sync.done()):
                self._unsynced = 0
                if self._sync is not None:
                    self._sync.result()
                self._sync = self._io.submit(os.fdatasync, self.fd)

    def _pwrite(self, view: memoryview, pos: int) -> None:
        k = bisect.bisect_right(self._starts, pos) - 1
        while view:
            p = self._pieces[k]
            if not p.start <= pos < p.end:
                raise StorageIOError(f"restore: offset {pos} is outside the volume")
            n = min(len(view), p.end - pos)
            done = 0
            while done < n:
                done += os.pwrite(self.fd, view[done:n], p.offset + pos - p.start + done)
            view, pos, k = view[n:], pos + n, k + 1

    def _close(self) -> None:
        self._io.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def commit(self) -> VolumeInfo:
        try:
            if self._sync is not None:
                self._sync.result()
            os.fdatasync(self.fd)
            self._close()
            return self._commit()
        except OSError as e:
            self.abort()
            raise StorageIOError(f"cannot commit the restored volume: {e.strerror}") from None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self._abort()
