"""The file operations of a qcow2 pool, on a local (or mounted) directory or
on an NFSv3 export reached in user space.

Qcow2Pool names every file by the string qemu opens: a local path, or an
nfs://server/export/... URL (qemu's nfs block driver, block-nfs.so). Its
own file operations (metadata, renames, listings, locks, the dirty-bitmap
reader) go through one of these classes, so the same driver serves both:

- LocalFiles: os calls; the volume lock is a POSIX record lock.
- NfsFiles: the libnfs binding (agent._native, GIL released) through a
  pooled NfsStore; the volume lock is a lock object refreshed by its holder
  (agent.stores.locks.RepoLock), as NFSv3 without NLM has no locks.

Missing files raise FileNotFoundError on both, as the driver expects; any
other NFS failure is the pool's error (TargetUnreachable, NoSpace,
StorageIOError naming the pool).
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

from agent.errors import Busy, InvalidArgument
from agent.fields import check_nfs_export, check_nfs_server

LOCK_WAIT = 600.0  # seconds a volume operation waits for another host's lock on an NFS pool


class ReadFile(ABC):
    """A file open for positioned reads (the qcow2 header/bitmap readers)."""

    @abstractmethod
    def pread(self, n: int, offset: int) -> bytes: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> ReadFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PoolFiles(ABC):
    local: bool  # paths are host paths (direct readers/writers may os.open them)

    @abstractmethod
    def exists(self, path: str) -> bool: ...

    @abstractmethod
    def isdir(self, path: str) -> bool: ...

    @abstractmethod
    def listdir(self, path: str) -> list[str]: ...

    @abstractmethod
    def makedirs(self, path: str) -> None: ...

    @abstractmethod
    def rename(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def unlink(self, path: str) -> None: ...

    @abstractmethod
    def rmdir(self, path: str) -> None: ...

    @abstractmethod
    def mtime(self, path: str) -> float: ...

    @abstractmethod
    def disk_usage(self, path: str) -> int:
        """Bytes the file takes on the storage."""

    @abstractmethod
    def fsync(self, path: str) -> None: ...

    @abstractmethod
    def statvfs(self, path: str) -> tuple[int, int, int]:
        """(total, used, available) bytes of the file system holding path."""

    @abstractmethod
    def read(self, path: str) -> bytes: ...

    @abstractmethod
    def replace(self, path: str, data: bytes) -> None:
        """Write path atomically and durably: a crash leaves the old or the new."""

    @abstractmethod
    def open_ro(self, path: str) -> ReadFile: ...

    @abstractmethod
    def lock(self, lock_dir: str, name: str, purpose: str, *, drop=None):
        """A context manager: the exclusive lock `name` in lock_dir, shared
        with every host that reaches the pool. Not reentrant. drop(): asked
        at the end while the lock is still held; true removes the lock's
        file (the volume it guards does not exist, or no longer)."""

    def walk_files(self, top: str) -> Iterator[str]:
        """Paths of the files below top (no order)."""
        try:
            names = self.listdir(top)
        except FileNotFoundError:
            return
        for n in names:
            p = posixpath.join(top, n)
            if self.isdir(p):
                yield from self.walk_files(p)
            else:
                yield p


class _LocalRead(ReadFile):
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalFiles(PoolFiles):
    local = True

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, mode=0o750, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def mtime(self, path: str) -> float:
        return os.stat(path).st_mtime

    def disk_usage(self, path: str) -> int:
        return os.stat(path).st_blocks * 512

    def fsync(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def statvfs(self, path: str) -> tuple[int, int, int]:
        st = os.statvfs(path)
        total = st.f_blocks * st.f_frsize
        return total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def replace(self, path: str, data: bytes) -> None:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # never shared by two writers
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def open_ro(self, path: str) -> ReadFile:
        return _LocalRead(path)

    @contextmanager
    def lock(self, lock_dir: str, name: str, purpose: str, *, drop=None):
        """A POSIX record lock on lock_dir/name.lock: agents sharing the
        directory over a cluster or NFS mount see it too. The file is
        removed while locked when drop() says so; a waiter that then gets
        the lock on the removed file sees its path gone (or another file
        there) and locks anew, so two holders never hold two files."""
        os.makedirs(lock_dir, mode=0o750, exist_ok=True)
        path = os.path.join(lock_dir, f"{name}.lock")
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass  # removed by the holder before us: lock the new one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            try:
                yield
            finally:
                try:
                    if drop is not None and drop():
                        os.unlink(path)  # still locked: nobody holds or takes this file meanwhile
                finally:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class _NfsRead(ReadFile):
    def __init__(self, files: NfsFiles, path: str):
        self.files = files
        self.path = path

    def pread(self, n: int, offset: int) -> bytes:
        return self.files.pread(self.path, n, offset)

    def close(self) -> None:
        pass


_PASS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


class NfsFiles(PoolFiles):
    """Files under nfs://server/export, named by their qemu URL
    (nfs://server/export/path). qemu's nfs driver asks the portmapper for the
    ports (it has no port options), so these do too."""

    local = False

    def __init__(self, server: str, export: str, *, label: str, timeout: float = 30.0):
        from agent.stores.nfs import NfsStore  # the native binding loads only for NFS pools

        self.server = check_nfs_server(server)
        self.export = check_nfs_export(export)
        self.prefix = f"nfs://{server}{self.export}"
        self.store = NfsStore(server, self.export, timeout=timeout, label=label, owner=("pool", "pool_uuid"))
        self.label = label

    def url(self, rel: str) -> str:
        """The URL of a path relative to the export."""
        return f"{self.prefix}/{rel.lstrip('/')}"

    def _rel(self, path: str) -> str:
        if path != self.prefix and not path.startswith(self.prefix + "/"):
            raise InvalidArgument(f"path: {path!r} is not on {self.prefix}", field="path")
        return path[len(self.prefix) :] or "/"

    def _run(self, what: str, path: str, fn, *, retry: bool = True):
        """fn(ctx) on the pool's NFS connections: once more on a new
        connection when the first met a dropped one (retry: for calls that
        may run twice; see NfsStore.run)."""
        return self.store.run(f"{what} {self._rel(path)}", fn, _PASS, retry=retry)

    def _stat(self, path: str):
        return self._run("cannot stat", path, lambda ctx: ctx.stat(self._rel(path)))

    def exists(self, path: str) -> bool:
        try:
            self._stat(path)
            return True
        except FileNotFoundError:
            return False

    def isdir(self, path: str) -> bool:
        try:
            return bool(self._stat(path)[2])
        except FileNotFoundError:
            return False

    def listdir(self, path: str) -> list[str]:
        return [n for n, _, _ in self._run("cannot list", path, lambda ctx: ctx.listdir(self._rel(path)))]

    def walk_files(self, top: str) -> Iterator[str]:
        """As PoolFiles.walk_files, with the kinds READDIRPLUS returns
        (no lookup per entry)."""
        try:
            entries = self._run("cannot list", top, lambda ctx: ctx.listdir(self._rel(top)))
        except FileNotFoundError:
            return
        for n, is_dir, _ in entries:  # without "." and ".."
            p = posixpath.join(top, n)
            if is_dir:
                yield from self.walk_files(p)
            else:
                yield p

    def makedirs(self, path: str) -> None:
        parts = [p for p in self._rel(path).split("/") if p]

        def mkdirs(ctx):
            cur = ""
            for p in parts:
                cur += "/" + p
                try:
                    ctx.mkdir(cur, 0o750)
                except FileExistsError:
                    pass

        self._run("cannot create directory", path, mkdirs)

    def rename(self, src: str, dst: str) -> None:
        """A RENAME sent again after a dropped connection may find its
        source gone because the first one was done: then the destination
        is there, and that is success."""
        tried = []

        def rename(ctx):
            try:
                ctx.rename(self._rel(src), self._rel(dst))
            except FileNotFoundError:
                if not tried or not self._exists_on(ctx, dst):
                    raise
            finally:
                tried.append(1)

        self._run("cannot rename", src, rename)

    def _exists_on(self, ctx, path: str) -> bool:
        try:
            ctx.stat(self._rel(path))
            return True
        except FileNotFoundError:
            return False

    def unlink(self, path: str) -> None:
        self._run("cannot remove", path, self._once(lambda ctx: ctx.unlink(self._rel(path))))

    def rmdir(self, path: str) -> None:
        self._run("cannot remove directory", path, self._once(lambda ctx: ctx.rmdir(self._rel(path))))

    @staticmethod
    def _once(remove):
        """A REMOVE/RMDIR sent again after a dropped connection that finds
        nothing: the first one did it."""
        tried = []

        def call(ctx):
            try:
                remove(ctx)
            except FileNotFoundError:
                if not tried:
                    raise
            finally:
                tried.append(1)

        return call

    def mtime(self, path: str) -> float:
        return self._stat(path)[3]

    def disk_usage(self, path: str) -> int:
        return self._stat(path)[4]

    def fsync(self, path: str) -> None:
        def commit(ctx):
            f = ctx.open(self._rel(path), os.O_RDWR)
            try:
                f.fsync()
            finally:
                f.close()

        self._run("cannot commit", path, commit)

    def statvfs(self, path: str) -> tuple[int, int, int]:
        frsize, blocks, bfree, bavail = self._run(
            "cannot read capacity of", path, lambda ctx: ctx.statvfs(self._rel(path))
        )
        return blocks * frsize, (blocks - bfree) * frsize, bavail * frsize

    def pread(self, path: str, n: int, offset: int) -> bytes:
        def read(ctx):
            f = ctx.open(self._rel(path), os.O_RDONLY)
            try:
                out = bytearray(n)
                got = f.preadinto(out, offset) if n else 0
            finally:
                f.close()
            return bytes(out[:got])

        return self._run("cannot read", path, read)

    def read(self, path: str) -> bytes:
        size = self._stat(path)[0]
        return self.pread(path, size, 0)

    def replace(self, path: str, data: bytes) -> None:
        """A hidden temporary file, written, committed (NFS COMMIT) and renamed
        over path: NFSv3 servers make a rename stable before they answer.
        The data is in hand, so a dropped connection means a new temporary
        file on a new connection."""
        rel = self._rel(path)
        tried: list[str] = []

        def write(ctx):
            for old in tried:  # the first try's, which its dead connection could not remove
                try:
                    ctx.unlink(old)
                except OSError:
                    pass
            tmp = posixpath.join(
                posixpath.dirname(rel),
                f".{posixpath.basename(rel)}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp",
            )
            tried.append(tmp)
            f = ctx.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                try:
                    if data:
                        f.pwrite(data, 0)
                    f.fsync()
                finally:
                    f.close()
                ctx.rename(tmp, rel)
            except OSError:
                try:  # no half-written temporary file stays behind
                    ctx.unlink(tmp)
                except OSError:
                    pass
                raise

        self._run("cannot write", path, write)

    def open_ro(self, path: str) -> ReadFile:
        if not self.exists(path):
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        return _NfsRead(self, path)

    @contextmanager
    def lock(self, lock_dir: str, name: str, purpose: str, *, drop=None):
        """Lock objects under lock_dir/name/, removed on release (drop:
        nothing more to remove)."""
        from agent.stores.locks import EXCLUSIVE, RepoLock

        def busy(holder):
            return Busy(
                f"volume_uuid: volume {name} is locked by {holder.describe()}; try again when it ends",
                field="volume_uuid",
            )

        prefix = f"{self._rel(lock_dir).strip('/')}/{name}"
        with RepoLock(self.store, EXCLUSIVE, purpose, timeout=LOCK_WAIT, prefix=prefix, busy=busy):
            yield
