"""The error tree, and the one table that maps it to gRPC status codes.

Every error a caller can see is a BlockferryError with a stable `code` from
the catalogue below and an English message that names the field or resource.
`grpc_status()` is the only place that decides which gRPC status code an
error gets; the REST envelope of the controller maps the same codes.
"""
from __future__ import annotations

import grpc


class BlockferryError(Exception):
    """An unexpected agent error (details only in the agent log)."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(BlockferryError):
    """A request field is malformed; the message names it."""

    code = "INVALID_ARGUMENT"


class OutOfRange(BlockferryError):
    """A size or offset lies beyond what the resource holds, or overflows."""

    code = "OUT_OF_RANGE"


class PathNotAllowed(BlockferryError):
    """A path outside the configured roots, or one that tries to escape them."""

    code = "PATH_NOT_ALLOWED"


class NotFound(BlockferryError):
    """The named job, file, volume or snapshot does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(BlockferryError):
    """An object with that name or id exists already."""

    code = "ALREADY_EXISTS"


class JobConflict(BlockferryError):
    """A job id reused with a different kind or spec."""

    code = "JOB_ID_CONFLICT"


class Busy(BlockferryError):
    """The resource is locked by another job."""

    code = "RESOURCE_BUSY"


class FailedPrecondition(BlockferryError):
    """The request is valid but the resource is not in a state that allows it."""

    code = "FAILED_PRECONDITION"


class HasDependents(BlockferryError):
    """Other objects depend on it (clones, snapshots); the message names them."""

    code = "HAS_DEPENDENTS"


class InUse(BlockferryError):
    """Another process (a VM's qemu, a qemu-nbd) holds the image open."""

    code = "IN_USE"


class TrackingLost(BlockferryError):
    """Change tracking is missing or inconsistent; a full read is needed."""

    code = "CHANGE_TRACKING_LOST"


class Draining(BlockferryError):
    """The agent is shutting down and takes no new jobs."""

    code = "AGENT_DRAINING"


class Cancelled(BlockferryError):
    """The job was cancelled by request."""

    code = "CANCELLED"


class Interrupted(BlockferryError):
    """The agent stopped while the job was running."""

    code = "INTERRUPTED"


class StorageIOError(BlockferryError):
    """Reading or writing storage failed."""

    code = "IO_ERROR"


class ConfigError(BlockferryError):
    """The configuration file is invalid; the message names file, section and key."""

    code = "CONFIG_INVALID"


class WrongPassword(BlockferryError):
    """The backup point password does not open its repository (or is missing)."""

    code = "WRONG_PASSWORD"


class DataCorrupt(BlockferryError):
    """Stored backup data fails its checksum or authentication; the message names the chunk or backup."""

    code = "DATA_CORRUPT"


class RepositoryLocked(BlockferryError):
    """The repository is locked by another operation (a GC, or backups while GC waits)."""

    code = "REPOSITORY_LOCKED"


class TargetUnreachable(BlockferryError):
    """A backup point or pool server does not answer (connection refused, timed out or dropped)."""

    code = "TARGET_UNREACHABLE"


class AuthFailed(BlockferryError):
    """A backup point refused our credentials (SMB user/password, iSCSI CHAP)."""

    code = "AUTH_FAILED"


class NoSpace(BlockferryError):
    """The backup point or LUN is full; nothing partial was published."""

    code = "NO_SPACE"


class BindingMissing(BlockferryError):
    """A Python binding the agent needs is missing or built for another ABI."""

    code = "BINDING_MISSING"


# The single error -> gRPC status table.
_GRPC_STATUS: dict[str, grpc.StatusCode] = {
    InvalidArgument.code: grpc.StatusCode.INVALID_ARGUMENT,
    OutOfRange.code: grpc.StatusCode.OUT_OF_RANGE,
    PathNotAllowed.code: grpc.StatusCode.PERMISSION_DENIED,
    NotFound.code: grpc.StatusCode.NOT_FOUND,
    AlreadyExists.code: grpc.StatusCode.ALREADY_EXISTS,
    JobConflict.code: grpc.StatusCode.ALREADY_EXISTS,
    Busy.code: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition.code: grpc.StatusCode.FAILED_PRECONDITION,
    HasDependents.code: grpc.StatusCode.FAILED_PRECONDITION,
    InUse.code: grpc.StatusCode.FAILED_PRECONDITION,
    TrackingLost.code: grpc.StatusCode.FAILED_PRECONDITION,
    Draining.code: grpc.StatusCode.UNAVAILABLE,
    Cancelled.code: grpc.StatusCode.CANCELLED,
    Interrupted.code: grpc.StatusCode.ABORTED,
    StorageIOError.code: grpc.StatusCode.UNAVAILABLE,
    ConfigError.code: grpc.StatusCode.FAILED_PRECONDITION,
    BindingMissing.code: grpc.StatusCode.FAILED_PRECONDITION,
    TargetUnreachable.code: grpc.StatusCode.UNAVAILABLE,
    AuthFailed.code: grpc.StatusCode.UNAUTHENTICATED,
    NoSpace.code: grpc.StatusCode.RESOURCE_EXHAUSTED,
    WrongPassword.code: grpc.StatusCode.PERMISSION_DENIED,
    DataCorrupt.code: grpc.StatusCode.DATA_LOSS,
    RepositoryLocked.code: grpc.StatusCode.ABORTED,
    BlockferryError.code: grpc.StatusCode.INTERNAL,
}


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """gRPC status code and message for any exception.

    Unknown exceptions become INTERNAL with a generic message: their text may
    hold paths or secrets and is logged, not sent.
    """
    if isinstance(error, BlockferryError):
        return _GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL), f"{error.code}: {error.message}"
    return grpc.StatusCode.INTERNAL, "INTERNAL: unexpected agent error (see the agent log)"


def catalogue() -> list[tuple[str, str, str]]:
    """(code, gRPC status, meaning) for every error, for docs and tests."""
    rows, seen = [], set()
    for cls in _all_subclasses(BlockferryError):
        if cls.code in seen:  # a subclass that refines a message, not a code
            continue
        seen.add(cls.code)
        status = _GRPC_STATUS[cls.code]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append((cls.code, status.name, doc))
    return sorted(rows)


def _all_subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out
