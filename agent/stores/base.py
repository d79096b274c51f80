"""The object-store interface a repository lives on.

Names are relative, '/'-separated, and never escape the store's root. A store
offers only what every backup point type can do cheaply, including a raw LUN
later (fixed-size slots): write a whole object, stream one in through a
writer, read a byte range, list, delete. An object becomes visible only when
its writer commits, durably, under its final name; a crash before that leaves
at most a hidden partial object that `sweep_partial()` removes.
"""

from __future__ import annotations

import errno
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from agent.errors import (
    AccessDenied,
    AlreadyExists,
    BlockferryError,
    FailedPrecondition,
    InvalidArgument,
    NoSpace,
    NotFound,
    StorageIOError,
    TargetUnreachable,
)

Buffer = bytes | bytearray | memoryview  # what writers take and read_into fills

_NAME = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


def check_object_name(name: str) -> str:
    if not _NAME.match(name) or any(part in (".", "..") for part in name.split("/")):
        raise InvalidArgument(f"object name {name!r} is not a plain relative name", field="name")
    return name


_UNREACHABLE = {
    errno.ETIMEDOUT,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ENOTCONN,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ESHUTDOWN,
}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def storage_error(
    label: str, what: str, e: OSError, *, owner: str = "backup point", field: str = "backup_point_uuid"
) -> BlockferryError:
    """The error for an OSError of a store: names the backup point (label;
    or the pool of an NFS volume pool: owner and field) and what was being
    done, and keeps the reason (never a secret: labels and object names hold
    none)."""
    reason = e.strerror or str(e)
    message = f"{owner} {label}: {what}: {reason}"
    if e.errno == errno.ENOENT:
        return NotFound(message, field=field)
    if e.errno in _NO_SPACE:
        return NoSpace(message, field=field)
    if e.errno in _DENIED:
        return AccessDenied(message, field=field)
    if e.errno in _UNREACHABLE or isinstance(e, ConnectionError):
        return TargetUnreachable(message, field=field)
    return StorageIOError(message, field=field)


@dataclass(frozen=True)
class StoreStats:
    total_bytes: int
    used_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class StoreFacts:
    """What a health check learns of a store beyond its capacity."""

    writable: bool = True  # False: the credentials may read but not write
    object_lock: str = ""  # object stores: "off", "on", or "on, GOVERNANCE 30 days by default"


class ObjectWriter(ABC):
    """Appends to a new object; commit() makes it durable and visible."""

    @abstractmethod
    def write(self, data: Buffer) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    @property
    @abstractmethod
    def size(self) -> int: ...

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


class ObjectStore(ABC):
    # Bytes a repository puts in one pack before committing it. Stores whose
    # commits cost a fixed device flush (raw LUNs) ask for larger packs.
    pack_target: int = 64 << 20
    # True when one writer may commit (in another thread) while the next one
    # is written: the repository then commits full packs in the background.
    concurrent_writers: bool = False

    @abstractmethod
    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        """Start writing an object; it stays invisible until commit().
        durable=False: atomic but not synced (lock records, which a crash
        may lose without harm)."""

    def open_bulk_writer(self, name: str) -> ObjectWriter:
        """A durable writer for a large object written once (a pack): stores
        may bypass their cache for it."""
        return self.open_writer(name)

    def prefetch(self, name: str, offset: int, length: int) -> None:
        """A hint: this range will be read soon (stores may start reading it)."""

    def publish(self, name: str, data: bytes, *, durable: bool = True, create_only: bool = False) -> None:
        """Write an object and make it visible atomically (durably, unless
        told). create_only: AlreadyExists when the object exists (atomic on
        stores that can say so, such as S3's conditional PUT; checked just
        before on the others)."""
        if create_only:
            try:
                self.size(name)
                raise AlreadyExists(f"backup point: object {name} exists", field="name")
            except NotFound:
                pass
        with self.open_writer(name, durable=durable) as w:
            w.write(data)
            w.commit()

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes of an object (a range of it); NotFound if it does not exist."""

    def read_into(self, name: str, offset: int, buf: Buffer) -> int:
        """Read the object's bytes from offset into buf (a writable buffer);
        returns how many were read (fewer at the object's end). Stores that
        can read without an intermediate copy override it: a restore reads
        every chunk record into one of a few recycled buffers."""
        data = self.get(name, offset, len(buf))
        memoryview(buf)[: len(data)] = data
        return len(data)

    def _range_by_read_into(self, name: str, offset: int, length: int) -> bytearray:
        """get() of a range for stores that override read_into: one new
        bytearray, cut (without a copy) when the object ends first."""
        out = bytearray(length)
        got = self.read_into(name, offset, out)
        if got < length:
            del out[got:]
        return out

    @abstractmethod
    def size(self, name: str) -> int: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Committed objects directly under a prefix ("packs" -> "packs/x")."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove an object; a missing one is not an error."""

    @abstractmethod
    def sweep_partial(self, prefix: str) -> int:
        """Remove partial objects under a prefix left by writers that never
        committed (call only while no writer can be active there); returns
        how many."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    def retain(self, name: str, until: float, mode: str) -> None:
        """Keep an object from deletion until a date by the store's own
        retention (S3 object lock: mode "governance" or "compliance");
        never shortens one. Stores without retention refuse."""
        raise FailedPrecondition(
            f"lock_mode {mode}: this backup point type has no object lock (only s3 has); use lock_mode agent",
            field="lock_mode",
        )

    def purge(self, prefix: str) -> int:
        """Remove what a delete left behind under a prefix and still uses
        space (an S3 bucket's older versions and delete markers whose
        retention ended); returns how many. Most stores leave nothing."""
        return 0

    def facts(self, repository: bool) -> StoreFacts:
        """Write permission and object lock, where the store can tell
        without writing anything (repository: a repository is there)."""
        return StoreFacts()

    def close(self) -> None:
        """Drop connections or sessions (the store may connect again later)."""
