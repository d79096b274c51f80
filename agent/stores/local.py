"""A directory backup point: objects are files under a root directory.

Writers fill a hidden temporary file beside the final name, fsync it, rename
it into place and fsync the directory, so a committed object is durable and a
crashed writer leaves only a `.part-*` file that sweep_partial() removes.

Packs go through the page cache (O_DIRECT with staging buffers measured
slower on this disk: bench/backup_bench.py), and their pages are dropped
from it once fsynced, so a backup does not evict the page cache of the VMs
on the host.
"""

from __future__ import annotations

import os
import uuid

from agent.errors import NotFound, StorageIOError
from agent.stores.base import ObjectStore, ObjectWriter, StoreStats, check_object_name, storage_error

PART = ".part-"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter(ObjectWriter):
    def __init__(self, path: str, durable: bool = True, drop_cache: bool = False):
        self.path = path
        self.durable = durable
        self.drop_cache = drop_cache
        self.tmp = os.path.join(os.path.dirname(path), f"{PART}{uuid.uuid4().hex}")
        self._size = 0
        try:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise storage_error(os.path.dirname(path), f"cannot create {os.path.basename(path)}", e) from None

    @property
    def size(self) -> int:
        return self._size

    def write(self, data) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
                self._size += n
        except OSError as e:
            self.abort()
            raise storage_error(os.path.dirname(self.path), f"cannot write {os.path.basename(self.path)}", e) from None

    def commit(self) -> None:
        try:
            if self.durable:
                os.fsync(self.fd)
                if self.drop_cache:  # clean now: dropping is cheap, and leaves the cache to the VMs
                    os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
            if self.durable:
                _fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            self.abort()
            raise storage_error(os.path.dirname(self.path), f"cannot commit {os.path.basename(self.path)}", e) from None

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class LocalStore(ObjectStore):
    concurrent_writers = True  # independent files: one fsyncs while the next fills

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        try:
            os.makedirs(self.root, mode=0o750, exist_ok=True)
        except OSError as e:
            raise StorageIOError(f"backup point: cannot create {self.root}: {e.strerror}") from None

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_object_name(name))

    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        return _FileWriter(self._path(name), durable)

    def open_bulk_writer(self, name: str) -> ObjectWriter:
        return _FileWriter(self._path(name), drop_cache=True)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes (a bytearray for a range read, to spare a copy)."""
        if length is not None:
            return self._range_by_read_into(name, offset, length)
        try:
            with open(self._path(name), "rb", buffering=0) as f:
                if offset:
                    f.seek(offset)
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"backup point: object {name} is missing", field="name") from None
        except OSError as e:
            raise StorageIOError(f"backup point: cannot read {name}: {e.strerror}") from None

    def read_into(self, name: str, offset: int, buf) -> int:
        """pread straight into the caller's buffer (a restore's recycled
        ones: no fresh allocation to zero and page in per chunk, measured in
        bench/backup_bench.py)."""
        view, got = memoryview(buf).cast("B"), 0
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"backup point: object {name} is missing", field="name") from None
        except OSError as e:
            raise StorageIOError(f"backup point: cannot read {name}: {e.strerror}") from None
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
        except OSError as e:
            raise StorageIOError(f"backup point: cannot read {name}: {e.strerror}") from None
        finally:
            os.close(fd)
        return got

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """Start the kernel's readahead of the range (a restore asks a few
        chunks ahead, so a cold pack streams from disk while workers decode)."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # the read itself will say what is wrong
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise NotFound(f"backup point: object {name} is missing", field="name") from None

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/")
        d = self._path(prefix) if prefix else self.root
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        return sorted(
            f"{prefix}/{f}" if prefix else f
            for f in names
            if not f.startswith(PART) and os.path.isfile(os.path.join(d, f))
        )

    def delete(self, name: str) -> None:
        try:
            os.unlink(self._path(name))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageIOError(f"backup point: cannot delete {name}: {e.strerror}") from None

    def sweep_partial(self, prefix: str) -> int:
        d = self._path(prefix.rstrip("/"))
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return 0
        n = 0
        for f in names:
            if f.startswith(PART):
                os.unlink(os.path.join(d, f))
                n += 1
        return n

    def stats(self) -> StoreStats:
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        return StoreStats(total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize)

    def is_empty(self) -> bool:
        return not os.listdir(self.root)
