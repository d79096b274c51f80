"""A Samba (SMB2/3) backup point: objects are files under share/sub_dir,
reached in user space through smbprotocol, so the host needs no CIFS module.

Sessions are always signed (the client refuses unsigned ones) and can be
encrypted (smb_encrypt). The password lives only in memory: never in argv,
logs or error messages. A writer fills a hidden `.part-*` file, asks the
server to flush it (SMB2 FLUSH) and renames it into place, replacing an
older object of the same name atomically (lock records, `config` on init).
Each store has its own connection cache and logs in with its own
credentials. A call that meets a dropped connection (a server restart, a
network cut) logs in again and runs once more; an object being written is
not (its WRITEs were in flight on the old connection): the writer fails,
cleanly. A share or file the user may not touch is ACCESS_DENIED, naming the
share and the user.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
import uuid

import smbclient
from smbprotocol.exceptions import (
    DiskFull,
    LogonFailure,
    SMBAuthenticationError,
    SMBConnectionClosed,
    SMBException,
    SMBOSError,
    SMBResponseException,
)
from smbprotocol.header import NtStatus

from agent.errors import AccessDenied, AuthFailed, InvalidArgument, NotFound, TargetUnreachable
from agent.fields import check_sub_dir
from agent.stores import smb_write
from agent.stores.base import ObjectStore, ObjectWriter, StoreStats, check_object_name, storage_error

PART = ".part-"
_DEPTH = 8  # WRITE requests in flight per writer
_SMALL = 256 << 10
_GATHER = 1 << 20
_RESERVE = 16  # credits WRITEs leave to the session's other requests (creates, flushes, renames, tree connects)
_PAYLOAD = 65536  # bytes per credit
_NO_CREDITS = "credits are available"  # smbprotocol's refusal: "Request requires N credits but only M ..."
_DENIED = {
    NtStatus.STATUS_ACCESS_DENIED: "STATUS_ACCESS_DENIED",
    NtStatus.STATUS_PRIVILEGE_NOT_HELD: "STATUS_PRIVILEGE_NOT_HELD",
}
# the server forgot our session (it restarted): log in again
_SESSION_GONE = {
    NtStatus.STATUS_USER_SESSION_DELETED,
    NtStatus.STATUS_NETWORK_NAME_DELETED,
    0xC000035C,
}  # STATUS_NETWORK_SESSION_EXPIRED (not in smbprotocol's table)
_STATUS_QUOTA_EXCEEDED = 0xC0000044  # not in smbprotocol's table either
# smbprotocol logs packet details at DEBUG; they are not for the agent's log
for _name in ("smbprotocol", "smbclient", "spnego"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class _SmbWriter(ObjectWriter):
    def __init__(self, store: SmbStore, name: str, durable: bool):
        self.store = store
        self.name = name
        self.durable = durable
        self.final = store._path(name)
        parent = self.final.rsplit("\\", 1)[0]
        self._size = 0
        self._pending = bytearray()
        self._inflight: collections.deque = collections.deque()
        self._file = None

        def create():
            self.tmp = f"{parent}\\{PART}{uuid.uuid4().hex}"  # a new one on a retry
            store._makedirs(parent)
            return store._credited(
                smbclient.open_file, self.tmp, mode="xb", buffering=0, share_access="rwd", **store._kw
            )

        self._file = store._run(f"cannot create {name}", create)
        self._fast = store.zero_copy and smb_write.usable(self._file.fd)

    @property
    def size(self) -> int:
        return self._size + len(self._pending)

    def _put(self, data) -> None:
        """Send WRITE requests without waiting for each answer: up to _DEPTH
        in flight on the session (as many as the server's credits allow)."""
        from smbclient._io import _chunk_size

        fd = self._file.fd
        conn = fd.connection
        view = memoryview(data)
        starved = 0.0
        while view:
            spare = conn.sequence_window["high"] - conn.sequence_window["low"] - _RESERVE
            if spare <= 0:  # the last credits are left to the session's other requests
                if self._inflight or starved < 1.0:
                    starved += 0 if self._inflight else 0.001
                    self._wait_credits()
                    continue
                spare += _RESERVE  # nothing of ours in flight for a second: take what there is
            chunk, credits = _chunk_size(conn, len(view), "write")
            chunk = min(chunk, spare * _PAYLOAD)
            if chunk <= 0:  # out of credits: an answer brings more
                self._wait_credits()
                continue
            if self._fast:
                try:
                    req = smb_write.send_write(fd, view[:chunk], self._size, credits)
                except smb_write.NoCredits:  # another writer of this session took them meanwhile
                    self._wait_credits()
                    continue
                recv = fd._write_response
            else:
                msg, recv = fd.write(bytes(view[:chunk]), offset=self._size, send=False)
                req = conn.send(
                    msg,
                    sid=fd.tree_connect.session.session_id,
                    tid=fd.tree_connect.tree_connect_id,
                    credit_request=credits,
                )
            self._inflight.append((req, recv, chunk))
            self._size += chunk
            view = view[chunk:]
            if len(self._inflight) >= _DEPTH:
                self._wait_one()

    def _wait_credits(self) -> None:
        """Our own answer brings credits back; with none in flight, another
        writer's will."""
        if self._inflight:
            self._wait_one()
        else:
            time.sleep(0.001)

    def _wait_one(self) -> None:
        req, recv, n = self._inflight.popleft()
        if recv(req) != n:
            raise OSError(errno.EIO, "short write")

    def _drain(self) -> None:
        while self._inflight:
            self._wait_one()

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            with self.store._call(f"cannot write {self.name}"):
                if len(view) < _SMALL:
                    self._pending += view
                    if len(self._pending) >= _GATHER:
                        self._put(self._pending)
                        self._pending = bytearray()
                else:
                    if self._pending:
                        self._put(self._pending)
                        self._pending = bytearray()
                    self._put(view)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        try:
            with self.store._call(f"cannot commit {self.name}"):
                if self._pending:
                    self._put(self._pending)
                    self._pending = bytearray()
                self._drain()
                if self.durable:
                    # SMB2 FLUSH: the server writes its cache to disk
                    self.store._credited(self._file.fd.flush, serial=False)
                self.store._credited(self._file.close, serial=False)
                self._file = None
                self.store._credited(smbclient.replace, self.tmp, self.final, **self.store._kw)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._drain()
        except Exception:
            self._inflight.clear()
        try:
            if self._file is not None:
                self._file.close()
        except Exception:
            pass
        self._file = None
        try:
            self.store._credited(smbclient.remove, self.tmp, **self.store._kw)
        except Exception:
            pass  # gone already, or the server is away: sweep_partial() removes it later


class SmbStore(ObjectStore):
    """Objects under \\\\server\\share\\sub_dir (SMB2/3, signed)."""

    zero_copy = True  # WRITEs through agent/stores/smb_write.py (False: smbprotocol's own path)
    # Packs of 256 MiB: each commit is a FLUSH the server answers after an
    # fsync, and a close and rename, so smaller packs pay that more often;
    # with larger ones the last pack's commit waits for a large flush alone.
    pack_target = 256 << 20

    @property
    def concurrent_writers(self) -> bool:
        """A full pack commits (its WRITEs answered, FLUSH, close, rename)
        in the background while the next one is written on the same
        session: on the zero-copy path, whose writers wait for the credits
        another writer holds (FLUSH and close of the committing pack's file
        stay concurrent with the next pack's WRITEs; only smbclient's path
        calls are serialized; bench/targets_bench.py compares both)."""
        return self.zero_copy and not self._encrypt

    def __init__(
        self,
        server: str,
        share: str,
        sub_dir: str = "",
        *,
        username: str,
        password: str,
        port: int = 0,
        encrypt: bool = False,
        timeout: float = 30.0,
        label: str = "",
    ):
        share = share.strip("/\\")
        if not share or "/" in share or "\\" in share:
            raise InvalidArgument(f"root_dir: {share!r} must name one share", field="root_dir")
        self.server = server
        self.port = port or 445
        self.share = share
        sub = check_sub_dir(sub_dir)
        self.base = f"\\\\{server}\\{share}" + ("\\" + sub.replace("/", "\\") if sub else "")
        self.label = label or f"smb://{server}/{share}/{sub}".rstrip("/")
        self._username = username
        self._password = password
        self._encrypt = encrypt
        self._timeout = timeout
        self._cache: dict = {}
        self._kw = {"port": self.port, "connection_cache": self._cache}
        self._lock = threading.Lock()
        # smbclient's path calls (open, rename, remove, stat, list) one at a
        # time: three writers of one session in three threads, with WRITEs
        # holding every credit, lost the session now and then (a request of
        # smbclient's found no credit, then it tried to log in without
        # credentials). WRITEs now leave _RESERVE credits, and FLUSH and
        # close of a writer's own file stay concurrent.
        self._ops = threading.RLock()
        self._session = False
        self._dirs: set[str] = set()
        self._run("cannot create the repository directory", lambda: self._makedirs(self.base))

    # --- session ---
    def _login(self) -> None:
        with self._lock:
            if self._session:
                return
            try:
                smbclient.register_session(
                    self.server,
                    username=self._username,
                    password=self._password,
                    port=self.port,
                    encrypt=self._encrypt or None,
                    connection_timeout=max(1, int(self._timeout)),
                    connection_cache=self._cache,
                    require_signing=True,
                )
            except (LogonFailure, SMBAuthenticationError):
                raise AuthFailed(
                    f"backup point {self.label}: the server refused user {self._username!r} (wrong username or secret)",
                    field="secret",
                ) from None
            except (ValueError, OSError, SMBConnectionClosed) as e:
                reason = str(e).replace(self._password, "***") if self._password else str(e)
                raise TargetUnreachable(
                    f"backup point {self.label}: cannot connect: {reason}", field="backup_point_uuid"
                ) from None
            self._session = True

    def _drop(self) -> None:
        with self._lock:
            self._session = False

    def _credited(self, fn, *args, serial: bool = True, **kw):
        """Run an smbprotocol call, waiting while the session has no credit
        for it: this session's writers may hold every credit in WRITEs in
        flight, and their answers bring credits back. smbprotocol refuses
        such a request before sending anything, so it is simply tried
        again (for at most the store's timeout). serial: an smbclient path
        call, made under the store's call lock."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                if not serial:
                    return fn(*args, **kw)
                with self._ops:
                    return fn(*args, **kw)
            except SMBException as e:
                if _NO_CREDITS not in str(e) or time.monotonic() > deadline:
                    raise
            time.sleep(0.002)
            try:
                smbclient.reset_connection_cache(fail_on_error=False, connection_cache=self._cache)
            except Exception:
                pass

    def close(self) -> None:
        self._drop()

    def _call(self, what: str):
        return _Call(self, what)

    def _error(self, what: str, e: BaseException):
        status = getattr(e, "ntstatus", None) if isinstance(e, SMBOSError) else getattr(e, "status", None)
        if status in _DENIED:
            return AccessDenied(
                f"backup point {self.label}: {what}: the server denied user {self._username!r} "
                f"access on share {self.share!r} ({_DENIED[status]})",
                field="backup_point_uuid",
            )
        if isinstance(e, DiskFull) or status in (NtStatus.STATUS_DISK_FULL, _STATUS_QUOTA_EXCEEDED):
            # smbclient's SMBOSError carries no errno for a full share
            return storage_error(self.label, what, OSError(errno.ENOSPC, "No space left on the share"))
        if isinstance(e, SMBOSError) and status not in _SESSION_GONE:
            if e.errno == errno.ENOENT:
                return NotFound(f"backup point {self.label}: {what}: not found", field="name")
            return storage_error(self.label, what, OSError(e.errno or errno.EIO, e.strerror or str(e)))
        if isinstance(e, SMBResponseException) and status not in _SESSION_GONE:
            return storage_error(self.label, what, OSError(errno.EIO, e.message))
        self._drop()
        return TargetUnreachable(
            f"backup point {self.label}: {what}: the server does not answer ({e})", field="backup_point_uuid"
        )

    def _run(self, what: str, fn):
        """fn() logged in, its errors ours. A dropped connection (the
        server restarted, the network was cut) means one more try after a
        new login: callers pass calls that may run twice (reads, listings,
        removals, a new file's creation)."""
        try:
            with self._call(what):
                return fn()
        except TargetUnreachable:
            pass
        with self._call(what):
            return fn()

    # --- paths ---
    def _path(self, name: str) -> str:
        return self.base + "\\" + check_object_name(name).replace("/", "\\")

    def _makedirs(self, path: str) -> None:
        if path.count("\\") <= 3:  # \\server\share itself
            return
        if path not in self._dirs:
            self._credited(smbclient.makedirs, path, exist_ok=True, **self._kw)
            self._dirs.add(path)

    # --- the ObjectStore interface ---
    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        return _SmbWriter(self, name, durable)

    def get(self, name: str, offset: int = 0, length: int | None = None):
        if length is not None:
            return self._range_by_read_into(name, offset, length)

        def read():
            with self._credited(
                smbclient.open_file, self._path(name), mode="rb", buffering=0, share_access="rwd", **self._kw
            ) as f:
                if offset:
                    f.seek(offset)
                return bytearray(f.readall())

        return self._run(f"cannot read {name}", read)

    def read_into(self, name: str, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")

        def read():
            got = 0
            with self._credited(
                smbclient.open_file, self._path(name), mode="rb", buffering=0, share_access="rwd", **self._kw
            ) as f:
                if offset:
                    f.seek(offset)
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
            return got

        return self._run(f"cannot read {name}", read)

    def size(self, name: str) -> int:
        return self._run(
            f"cannot stat {name}", lambda: self._credited(smbclient.stat, self._path(name), **self._kw).st_size
        )

    def _scan(self, prefix: str) -> list[tuple[str, bool]]:
        d = self._path(prefix) if prefix else self.base
        try:
            return self._run(
                f"cannot list {prefix or '/'}",
                lambda: self._credited(lambda: [(e.name, e.is_dir()) for e in smbclient.scandir(d, **self._kw)]),
            )
        except NotFound:
            return []

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/")
        return sorted(
            f"{prefix}/{n}" if prefix else n
            for n, is_dir in self._scan(prefix)
            if not is_dir and not n.startswith(PART)
        )

    def delete(self, name: str) -> None:
        try:  # a retried removal that finds nothing: the first one did it
            self._run(f"cannot delete {name}", lambda: self._credited(smbclient.remove, self._path(name), **self._kw))
        except NotFound:
            pass

    def publish(self, name: str, data: bytes, *, durable: bool = True, create_only: bool = False) -> None:
        """A whole object in hand: once more when the first try met a
        dropped connection (a new temporary file, renamed over the name)."""
        try:
            super().publish(name, data, durable=durable, create_only=create_only)
        except TargetUnreachable:
            super().publish(name, data, durable=durable, create_only=create_only)

    def sweep_partial(self, prefix: str) -> int:
        prefix = prefix.rstrip("/")
        n = 0
        for name, is_dir in self._scan(prefix):
            if name.startswith(PART) and not is_dir:
                self.delete(f"{prefix}/{name}" if prefix else name)
                n += 1
        return n

    def stats(self) -> StoreStats:
        v = self._run("cannot read capacity", lambda: self._credited(smbclient.stat_volume, self.base, **self._kw))
        return StoreStats(v.total_size, v.total_size - v.actual_available_size, v.caller_available_size)

    def is_empty(self) -> bool:
        return not self._scan("")


class _Call:
    """Log in when needed; turn smbprotocol's errors into ours."""

    def __init__(self, store: SmbStore, what: str):
        self.store = store
        self.what = what

    def __enter__(self):
        self.store._login()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (SMBException, OSError, ValueError)):
            return False
        raise self.store._error(self.what, exc) from None
