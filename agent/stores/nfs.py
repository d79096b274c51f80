"""An NFS backup point: objects are files under root_dir/sub_dir of an
NFSv3 export, reached in user space through libnfs (agent._native), so the
host needs no kernel NFS client.

Like the directory store, a writer fills a hidden `.part-*` file, commits it
(NFS COMMIT) and renames it into place; NFSv3 servers make namespace
operations stable before they reply, so a renamed object is durable. libnfs
contexts are not thread-safe: each one is a connection, used by one caller at
a time, and kept in a small pool. A call that fails with anything but a
definite answer of the server (a file error, no space, no permission) may
have met a connection the server dropped (a restart, a network cut): the
pool's idle connections are dropped with it and the call runs once more on
a new connection. Writes of an object in progress are not retried (their
data was in flight on the old connection): the writer fails, cleanly.
"""

from __future__ import annotations

import errno
import os
import posixpath
import threading
import uuid

from agent import _native
from agent.errors import InvalidArgument, NotFound, StorageIOError, TargetUnreachable
from agent.fields import check_sub_dir
from agent.stores.base import ObjectStore, ObjectWriter, StoreStats, check_object_name, storage_error

PART = ".part-"
_FILE_ERRORS = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
# what the server answered for sure: retrying on a new connection changes nothing
_DEFINITE = _FILE_ERRORS | {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EINVAL,
}
_SMALL = 256 << 10  # writes below this are gathered into one NFS WRITE
_GATHER = 1 << 20


class _NfsWriter(ObjectWriter):
    def __init__(self, store: NfsStore, name: str, durable: bool):
        self.store = store
        self.name = name
        self.durable = durable
        self.final = store._path(name)
        self.tmp = posixpath.join(posixpath.dirname(self.final), f"{PART}{uuid.uuid4().hex}")
        self._size = 0
        self._pending = bytearray()
        self._ctx = None
        self._file = None

        def create(ctx):
            self.tmp = posixpath.join(posixpath.dirname(self.final), f"{PART}{uuid.uuid4().hex}")  # new on a retry
            store._makedirs(ctx, posixpath.dirname(self.final))
            return ctx.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

        # the writer keeps the connection its file is open on
        self._ctx, self._file = store.run(f"cannot create {name}", create, keep=True)

    @property
    def size(self) -> int:
        return self._size + len(self._pending)

    def _release(self, error: OSError | None = None) -> None:
        if self._ctx is not None:
            self.store._checkin(self._ctx, error)
            self._ctx = None

    def _put(self, data) -> None:
        self._file.pwrite(data, self._size)
        self._size += len(data)

    def _flush(self) -> None:
        if self._pending:
            self._put(self._pending)
            self._pending = bytearray()

    def write(self, data) -> None:
        if self._file is None:
            raise storage_error(self.store.label, f"cannot write {self.name}", OSError(errno.EBADF, "closed"))
        view = memoryview(data).cast("B")
        try:
            if len(view) < _SMALL:
                self._pending += view
                if len(self._pending) >= _GATHER:
                    self._flush()
            else:
                self._flush()
                self._put(view)  # large pieces go out as they are: no copy
        except OSError as e:
            e = self.store.diagnose_write(e, len(view) + len(self._pending))
            self.abort(e)
            raise self.store.error(f"cannot write {self.name}", e) from None

    def commit(self) -> None:
        try:
            self._flush()
            if self.durable:
                self._file.fsync()
            self._file.close()
            self._file = None
            self._ctx.rename(self.tmp, self.final)
        except OSError as e:
            e = self.store.diagnose_write(e, len(self._pending))
            self.abort(e)
            raise self.store.error(f"cannot commit {self.name}", e) from None
        self._release()

    def abort(self, error: OSError | None = None) -> None:
        if self._ctx is None:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            self._ctx.unlink(self.tmp)
        except OSError:
            pass  # a dead connection: sweep_partial() removes it later
        self._release(error)


class NfsStore(ObjectStore):
    """Objects under nfs://server/root_dir/sub_dir (NFSv3)."""

    def __init__(
        self,
        server: str,
        root_dir: str,
        sub_dir: str = "",
        *,
        nfs_port: int = 0,
        mount_port: int = 0,
        timeout: float = 30.0,
        label: str = "",
        pool_size: int = 4,
        owner: tuple[str, str] = ("backup point", "backup_point_uuid"),
    ):
        """owner: what the errors name, and their field (an NFS volume pool
        passes ("pool", "pool_uuid"))."""
        if not root_dir.startswith("/"):
            raise InvalidArgument(f"root_dir: {root_dir!r} must be an absolute export path", field="root_dir")
        self.server = server
        self.export = posixpath.normpath(root_dir)
        self.base = "/" + check_sub_dir(sub_dir)
        self.nfs_port = nfs_port
        self.mount_port = mount_port
        self.timeout_ms = max(1, int(timeout * 1000))
        self.label = label or f"nfs://{server}{self.export}{self.base.rstrip('/')}"
        self.owner, self.field = owner
        self._idle: list = []
        self._lock = threading.Lock()
        self._pool_size = pool_size
        self._dirs: set[str] = set()
        self.run("cannot create the repository directory", lambda ctx: self._makedirs(ctx, self.base))

    # --- connections ---
    def _connect(self):
        try:
            return _native.NfsContext(
                self.server, self.export, nfs_port=self.nfs_port, mount_port=self.mount_port, timeout_ms=self.timeout_ms
            )
        except ConnectionError as e:
            raise TargetUnreachable(f"{self.owner} {self.label}: {e}", field=self.field) from None

    def _checkout(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, ctx, error: OSError | None = None) -> None:
        if error is not None and error.errno not in _FILE_ERRORS:
            ctx.close()  # the connection may be broken: the next call reconnects
            return
        with self._lock:
            if len(self._idle) < self._pool_size:
                self._idle.append(ctx)
                return
        ctx.close()

    def _drop_idle(self) -> None:
        """Close the idle connections: one failed, and the others went to
        the same server (a restart drops them all)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for ctx in idle:
            ctx.close()

    def diagnose_write(self, e: OSError, needed: int) -> OSError:
        """libnfs 4 reports every failed WRITE as EFAULT with no message;
        when the export has no room for what we tried to write, say so."""
        if e.errno != errno.EFAULT:
            return e
        try:
            frsize, _, _, bavail = self.run("cannot read capacity", lambda ctx: ctx.statvfs(self.base))
        except Exception:
            return e
        if bavail * frsize <= needed + (1 << 20):
            return OSError(errno.ENOSPC, f"No space left on the export ({bavail * frsize} bytes free)")
        return e

    def error(self, what: str, e: OSError):
        """The error for a failed call. libnfs reports a dropped connection as
        a generic failure, so anything but a definite answer is checked
        with a fresh connection: if the server does not answer it, the
        backup point is unreachable; if it does, the failure is an I/O
        error (never a verdict on the data)."""
        if e.errno in _DEFINITE:
            return storage_error(self.label, what, e, owner=self.owner, field=self.field)
        try:
            probe = self._connect()
        except TargetUnreachable as down:
            return TargetUnreachable(
                f"{self.owner} {self.label}: {what}: the server does not answer ({down.message.rsplit(': ', 1)[-1]})",
                field=self.field,
            )
        self._checkin(probe)
        return storage_error(self.label, what, e, owner=self.owner, field=self.field)

    def run(
        self, what: str, fn, passthrough: tuple[type[OSError], ...] = (), *, retry: bool = True, keep: bool = False
    ):
        """fn(ctx) on a pooled libnfs context. An OSError becomes the
        store's error (naming `what`), except the `passthrough` kinds,
        raised as they are (FileNotFoundError, for callers that expect
        plain file semantics). An error that is not a definite answer of
        the server drops the idle connections and, with retry (calls that
        may run twice: reads, lookups, a new file's creation), runs fn once
        more on a new connection. keep: the caller keeps the context
        (returns (ctx, result) and checks it in itself)."""
        for attempt in (0, 1):
            ctx = self._checkout()
            try:
                result = fn(ctx)
            except passthrough as e:
                self._checkin(ctx, e)
                raise
            except OSError as e:
                self._checkin(ctx, e)
                if e.errno in _DEFINITE:
                    raise self.error(what, e) from None
                self._drop_idle()
                if not retry or attempt:
                    raise self.error(what, e) from None
                continue  # once more, on a new connection
            except BaseException:
                ctx.close()
                raise
            if keep:
                return ctx, result
            self._checkin(ctx)
            return result
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for ctx in idle:
            ctx.close()

    # --- paths ---
    def _path(self, name: str) -> str:
        return posixpath.join(self.base, check_object_name(name))

    def _makedirs(self, ctx, path: str) -> None:
        if path in self._dirs or path == "/":
            return
        parent = posixpath.dirname(path)
        if parent not in self._dirs and parent != "/":
            self._makedirs(ctx, parent)
        try:
            ctx.mkdir(path, 0o750)
        except FileExistsError:
            pass
        self._dirs.add(path)

    # --- the ObjectStore interface ---
    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        return _NfsWriter(self, name, durable)

    def _read(self, name: str, offset: int, buf=None):
        """(buffer, bytes read): nfs_pread into buf, GIL released (native
        binding), or into a new buffer for the rest of the object (its size
        from a stat on the same connection)."""
        path = self._path(name)

        def read(ctx):
            f = ctx.open(path, os.O_RDONLY)
            try:
                out = bytearray(max(0, ctx.stat(path)[0] - offset)) if buf is None else buf
                return out, (f.preadinto(out, offset) if len(out) else 0)
            finally:
                f.close()

        try:
            return self.run(f"cannot read {name}", read)
        except NotFound:
            raise NotFound(f"backup point {self.label}: object {name} is missing", field="name") from None

    def get(self, name: str, offset: int = 0, length: int | None = None):
        out, n = self._read(name, offset, None if length is None else bytearray(length))
        return out if n == len(out) else out[:n]

    def read_into(self, name: str, offset: int, buf) -> int:
        return self._read(name, offset, buf)[1]

    def size(self, name: str) -> int:
        try:
            return self.run(f"cannot stat {name}", lambda ctx: ctx.stat(self._path(name))[0])
        except NotFound:
            raise NotFound(f"backup point {self.label}: object {name} is missing", field="name") from None

    def _listdir(self, prefix: str) -> list[tuple[str, bool, int]]:
        d = self._path(prefix) if prefix else self.base
        try:
            return self.run(f"cannot list {prefix or '/'}", lambda ctx: ctx.listdir(d))
        except NotFound:
            return []

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/")
        return sorted(
            f"{prefix}/{n}" if prefix else n
            for n, is_dir, _ in self._listdir(prefix)
            if not is_dir and not n.startswith(PART)
        )

    def delete(self, name: str) -> None:
        try:  # a retried REMOVE that finds nothing: the first one did it
            self.run(f"cannot delete {name}", lambda ctx: ctx.unlink(self._path(name)))
        except NotFound:
            pass

    def publish(self, name: str, data: bytes, *, durable: bool = True, create_only: bool = False) -> None:
        """A whole object in hand: once more when the first try met a
        dropped connection (a new temporary file, renamed over the name)."""
        try:
            super().publish(name, data, durable=durable, create_only=create_only)
        except (TargetUnreachable, StorageIOError):
            super().publish(name, data, durable=durable, create_only=create_only)

    def sweep_partial(self, prefix: str) -> int:
        prefix = prefix.rstrip("/")
        n = 0
        for name, is_dir, _ in self._listdir(prefix):
            if name.startswith(PART) and not is_dir:
                self.delete(f"{prefix}/{name}" if prefix else name)
                n += 1
        return n

    def stats(self) -> StoreStats:
        frsize, blocks, bfree, bavail = self.run("cannot read capacity", lambda ctx: ctx.statvfs(self.base))
        return StoreStats(blocks * frsize, (blocks - bfree) * frsize, bavail * frsize)

    def is_empty(self) -> bool:
        return not self._listdir("")
