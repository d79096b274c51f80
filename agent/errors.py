"""The error tree, and the one table that maps it to gRPC status codes and
to the controller's REST envelope.

Every error a caller can see is a BlockferryError with a stable `code` from
the catalogue below and an English message that names the field or resource.
`grpc_status()` and `rest_status()` are the only places that decide which
gRPC status, HTTP status, numeric `scode` and Chinese message an error gets.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class BlockferryError(Exception):
    """An unexpected agent error (details only in the agent log)."""

    code = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, result: object = None):
        """result: what the failed operation found, kept with the error
        (a verify's list of damaged items): a failed job returns it too."""
        super().__init__(message)
        self.field = field
        self.result = result
        self.status: grpc.StatusCode | None = None  # the gRPC status it came with, from an agent's call

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


class OperationLogNotFound(NotFound):
    """No task (seed 003's operation log) of the project has that id."""

    code = "OPERATION_LOG_NOT_FOUND"


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


class AccessDenied(BlockferryError):
    """A backup point or pool server refused an operation to our user (share, export or file permissions)."""

    code = "ACCESS_DENIED"


class NoSpace(BlockferryError):
    """The backup point or LUN is full; nothing partial was published."""

    code = "NO_SPACE"


class Unauthenticated(BlockferryError):
    """The REST caller sent no bearer token, or one the controller does not know."""

    code = "UNAUTHENTICATED"


class PermissionDenied(BlockferryError):
    """The caller's token may not do this (an operator-only endpoint, say)."""

    code = "PERMISSION_DENIED"


class VaultNotEmpty(BlockferryError):
    """The vault still holds backups (delete it in Enforcing mode, or delete them first)."""

    code = "VAULT_NOT_EMPTY"


class ResourceInVault(BlockferryError):
    """The volume is associated with a vault already (a volume belongs to one vault)."""

    code = "RESOURCE_IN_VAULT"


class ResourceNotInVault(BlockferryError):
    """The volume is not associated with this vault."""

    code = "RESOURCE_NOT_IN_VAULT"


class ShareExists(BlockferryError):
    """The backup is shared with that project already."""

    code = "SHARE_EXISTS"


class InvalidShareMember(BlockferryError):
    """A backup cannot be shared with that project (the owner's own, or not a project id)."""

    code = "INVALID_SHARE_MEMBER"


class BackupNotAvailable(BlockferryError):
    """The backup is not available (still being made, or it failed): it cannot be shared."""

    code = "BACKUP_NOT_AVAILABLE"


class VaultFull(BlockferryError):
    """The vault's used capacity has reached its size: no new backup until backups are deleted or it grows."""

    code = "VAULT_FULL"


class BackupInProgress(BlockferryError):
    """A backup of the resource is running; try again when it ends."""

    code = "BACKUP_IN_PROGRESS"


class RestoreTooSmall(BlockferryError):
    """The volume to restore into is smaller than the backup."""

    code = "RESTORE_TOO_SMALL"


class BackupLocked(BlockferryError):
    """The backup is locked (immutable) until a date: it cannot be deleted or pruned before then."""

    code = "BACKUP_LOCKED"


class HypervisorError(BlockferryError):
    """A running VM's hypervisor (its qemu's QMP, or libvirt) refused or failed an operation."""

    code = "HYPERVISOR_ERROR"


class BindingMissing(BlockferryError):
    """A Python binding the agent needs is missing or built for another ABI."""

    code = "BINDING_MISSING"


# The single table: code -> (gRPC status, HTTP status, scode, message_cn,
# error_code). scode is the numeric envelope code of seeds 000-002 (0 is
# success); error_code is what the /v3 API of seed 003 answers: the seed's
# own BackupService.xxxx where it has one for the case, otherwise
# BackupService.9xxx (a range the seed does not use; 9000 + scode - 1000).
_TABLE: dict[str, tuple[grpc.StatusCode, int, int, str, str]] = {
    InvalidArgument.code: (grpc.StatusCode.INVALID_ARGUMENT, 400, 1001, "参数错误", "BackupService.9001"),
    OutOfRange.code: (grpc.StatusCode.OUT_OF_RANGE, 400, 1002, "参数超出范围", "BackupService.9002"),
    PathNotAllowed.code: (grpc.StatusCode.PERMISSION_DENIED, 403, 1003, "路径不允许", "BackupService.9003"),
    NotFound.code: (grpc.StatusCode.NOT_FOUND, 404, 1004, "对象不存在", "BackupService.9004"),
    AlreadyExists.code: (grpc.StatusCode.ALREADY_EXISTS, 409, 1005, "对象已存在", "BackupService.9005"),
    JobConflict.code: (grpc.StatusCode.ALREADY_EXISTS, 409, 1006, "任务标识冲突", "BackupService.9006"),
    Busy.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1007, "资源正忙", "BackupService.9007"),
    FailedPrecondition.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1008, "前置条件不满足", "BackupService.9008"),
    HasDependents.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1009, "存在依赖对象", "BackupService.9009"),
    InUse.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1010, "对象正在使用", "BackupService.9010"),
    TrackingLost.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1011, "变更跟踪已丢失", "BackupService.9011"),
    Draining.code: (grpc.StatusCode.UNAVAILABLE, 503, 1012, "服务正在停止", "BackupService.9012"),
    Cancelled.code: (grpc.StatusCode.CANCELLED, 409, 1013, "任务已取消", "BackupService.9013"),
    Interrupted.code: (grpc.StatusCode.ABORTED, 409, 1014, "任务被中断", "BackupService.9014"),
    StorageIOError.code: (grpc.StatusCode.UNAVAILABLE, 502, 1015, "存储读写失败", "BackupService.9015"),
    ConfigError.code: (grpc.StatusCode.FAILED_PRECONDITION, 500, 1016, "配置错误", "BackupService.9016"),
    BindingMissing.code: (grpc.StatusCode.FAILED_PRECONDITION, 500, 1017, "缺少依赖组件", "BackupService.9017"),
    TargetUnreachable.code: (grpc.StatusCode.UNAVAILABLE, 502, 1018, "存储目标不可达", "BackupService.9018"),
    AuthFailed.code: (grpc.StatusCode.UNAUTHENTICATED, 502, 1019, "存储目标认证失败", "BackupService.9019"),
    NoSpace.code: (grpc.StatusCode.RESOURCE_EXHAUSTED, 507, 1020, "存储空间不足", "BackupService.9020"),
    AccessDenied.code: (grpc.StatusCode.PERMISSION_DENIED, 502, 1032, "存储目标拒绝访问", "BackupService.9032"),
    WrongPassword.code: (grpc.StatusCode.PERMISSION_DENIED, 403, 1021, "备份点密码错误", "BackupService.9021"),
    DataCorrupt.code: (grpc.StatusCode.DATA_LOSS, 500, 1022, "备份数据损坏", "BackupService.9022"),
    RepositoryLocked.code: (grpc.StatusCode.ABORTED, 409, 1023, "备份仓库已被锁定", "BackupService.9023"),
    Unauthenticated.code: (grpc.StatusCode.UNAUTHENTICATED, 401, 1024, "未认证", "BackupService.9024"),
    PermissionDenied.code: (grpc.StatusCode.PERMISSION_DENIED, 403, 1025, "无权操作", "BackupService.9025"),
    VaultNotEmpty.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1026, "存储库不为空", "BackupService.7301"),
    ResourceInVault.code: (grpc.StatusCode.ALREADY_EXISTS, 409, 1027, "资源已关联存储库", "BackupService.6103"),
    ResourceNotInVault.code: (grpc.StatusCode.NOT_FOUND, 404, 1028, "资源不在存储库中", "BackupService.6135"),
    VaultFull.code: (grpc.StatusCode.RESOURCE_EXHAUSTED, 409, 1029, "存储库容量已满", "BackupService.6114"),
    BackupInProgress.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1030, "备份任务进行中", "BackupService.6125"),
    RestoreTooSmall.code: (grpc.StatusCode.FAILED_PRECONDITION, 400, 1031, "目标卷小于备份", "BackupService.2001"),
    BackupLocked.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1038, "备份已锁定", "BackupService.9038"),
    HypervisorError.code: (grpc.StatusCode.UNAVAILABLE, 502, 1033, "虚拟机管理接口出错", "BackupService.9033"),
    OperationLogNotFound.code: (grpc.StatusCode.NOT_FOUND, 404, 1034, "操作日志不存在", "BackupService.6500"),
    ShareExists.code: (grpc.StatusCode.ALREADY_EXISTS, 409, 1035, "备份已共享给该成员", "BackupService.6714"),
    InvalidShareMember.code: (grpc.StatusCode.INVALID_ARGUMENT, 400, 1036, "共享成员项目无效", "BackupService.6704"),
    BackupNotAvailable.code: (grpc.StatusCode.FAILED_PRECONDITION, 409, 1037, "备份不可用", "BackupService.6702"),
    BlockferryError.code: (grpc.StatusCode.INTERNAL, 500, 1999, "内部错误", "BackupService.9999"),
}
_GRPC_STATUS: dict[str, grpc.StatusCode] = {code: row[0] for code, row in _TABLE.items()}


# The trailing metadata an agent's failed call carries: the error's code and
# field, so callers rebuild the error without parsing its message (the
# details keep "CODE: message" for people and generic gRPC tools).
GRPC_CODE_KEY = "bf-error-code"
GRPC_FIELD_KEY = "bf-error-field"


def grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """gRPC status code, message and trailing metadata for any exception.

    Unknown exceptions become INTERNAL with a generic message: their text may
    hold paths or secrets and is logged, not sent.
    """
    if isinstance(error, BlockferryError):
        trailers = ((GRPC_CODE_KEY, error.code),) + (((GRPC_FIELD_KEY, error.field),) if error.field else ())
        return (_GRPC_STATUS.get(error.code, grpc.StatusCode.INTERNAL), f"{error.code}: {error.message}", trailers)
    return (
        grpc.StatusCode.INTERNAL,
        "INTERNAL: unexpected agent error (see the agent log)",
        ((GRPC_CODE_KEY, BlockferryError.code),),
    )


def from_grpc(
    status: grpc.StatusCode, details: str, trailers: Iterable[tuple[str, str]] | None, *, where: str = ""
) -> BlockferryError:
    """The error an agent's failed call stands for: its class from the
    code in the trailing metadata, its message from the details (without
    the code), prefixed by `where` (e.g. "host h1"). A call that never
    reached an agent (no code: the channel failed) is TARGET_UNREACHABLE
    when the transport says so. The gRPC status stays in `.status`."""
    meta = dict(trailers or ())
    code = meta.get(GRPC_CODE_KEY, "")
    prefix = f"{where}: " if where else ""
    if code:
        message = details.removeprefix(f"{code}: ")
        error = from_code(code, prefix + message, meta.get(GRPC_FIELD_KEY) or None)
    elif status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        error = TargetUnreachable(f"{prefix}the agent does not answer ({status.name}: {details})", field="host_uuid")
    else:
        error = BlockferryError(f"{prefix}{status.name}: {details}")
    error.status = status
    return error


def from_code(code: str, message: str, field: str | None = None) -> BlockferryError:
    """The error of a code (the controller passes agents' errors on with
    their own code)."""
    for cls in _all_subclasses(BlockferryError):
        if cls.code == code:
            return cls(message, field=field)
    return BlockferryError(message, field=field)


def rest_status(error: BaseException) -> tuple[int, int, str, str]:
    """(HTTP status, scode, message, message_cn) for the REST envelope.
    Unknown exceptions: 500 with a generic message, never a stack trace."""
    if isinstance(error, BlockferryError):
        _, http, scode, cn, _ = _TABLE.get(error.code, _TABLE[BlockferryError.code])
        field = f" ({error.field})" if error.field else ""
        return http, scode, f"{error.code}: {error.message}", f"{cn}{field}: {error.message}"
    _, http, scode, cn, _ = _TABLE[BlockferryError.code]
    return http, scode, "INTERNAL: unexpected controller error (see its log)", f"{cn}：请查看控制器日志"


def cbr_code(code: str) -> str:
    """Seed 003's error_code for one of our codes (a checkpoint's skipped_resources)."""
    return _TABLE.get(code, _TABLE[BlockferryError.code])[4]


_CBR_HTTP = {"BackupService.6500": 404}  # the seed's operation-log lookup says 404


def cbr_status(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, error_code, error_msg) for seed 003's /v3 error body."""
    if isinstance(error, BlockferryError):
        _, http, _, _, code = _TABLE.get(error.code, _TABLE[BlockferryError.code])
        if not code.startswith("BackupService.9"):
            http = _CBR_HTTP.get(code, 400)  # the seed's table answers its own codes with 400
        return http, code, f"{error.code}: {error.message}"
    _, http, _, _, code = _TABLE[BlockferryError.code]
    return http, code, "INTERNAL: unexpected controller error (see its log)"


# Seed 004 (ZStack's /zstack/v1 API): the error code its envelope carries,
# from ZStack's own catalogues: SYS.xxxx (SysErrors), BS.xxxx
# (BackupStorageErrors), ID.xxxx (IdentityErrors). Every code not named
# here is SYS.1006, an operation that could not be done.
_ZSTACK: dict[str, str] = {
    InvalidArgument.code: "SYS.1007",
    OutOfRange.code: "SYS.1007",
    PathNotAllowed.code: "SYS.1007",
    NotFound.code: "SYS.1003",
    OperationLogNotFound.code: "SYS.1003",
    AlreadyExists.code: "SYS.1002",
    ShareExists.code: "SYS.1002",
    InvalidShareMember.code: "SYS.1007",
    HasDependents.code: "SYS.1004",
    InUse.code: "SYS.1004",
    VaultNotEmpty.code: "SYS.1004",
    Draining.code: "SYS.1012",
    Cancelled.code: "SYS.1017",
    StorageIOError.code: "SYS.1016",
    TargetUnreachable.code: "BS.1001",
    AuthFailed.code: "BS.1001",
    AccessDenied.code: "BS.1001",
    NoSpace.code: "BS.1003",
    Unauthenticated.code: "ID.1001",
    PermissionDenied.code: "ID.1002",
    BlockferryError.code: "SYS.1000",
}


def zstack_code(code: str) -> str:
    return _ZSTACK.get(code, "SYS.1006")


def zstack_status(error: BaseException) -> tuple[int, str, str]:
    """(HTTP status, code, description) for seed 004's error envelope."""
    if isinstance(error, BlockferryError):
        _, http, _, _, _ = _TABLE.get(error.code, _TABLE[BlockferryError.code])
        return http, zstack_code(error.code), f"{error.code}: {error.message}"
    return 500, _ZSTACK[BlockferryError.code], "INTERNAL: unexpected controller error (see its log)"


# The CLIs' exit statuses, by class of error (docs/errors.md): 0 success,
# 1 a job ran and failed, 2 usage or a bad value, 3 not found, 4 conflict
# (exists, busy, in use, a precondition), 5 unavailable (the agent, the
# controller or the storage cannot be reached, or no space), 6 not allowed
# (authentication, permissions, a wrong password), 7 any other error.
EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNAVAILABLE, EXIT_DENIED, EXIT_OTHER = 2, 3, 4, 5, 6, 7
_EXIT_BY_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.CANCELLED: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
}


def exit_status(error: BaseException) -> int:
    """A CLI's exit status for an error (any exception: 7)."""
    if isinstance(error, BlockferryError):
        status = _TABLE.get(error.code, _TABLE[BlockferryError.code])[0]
        return _EXIT_BY_STATUS.get(status, EXIT_OTHER)
    return EXIT_OTHER


def catalogue() -> list[tuple[str, str, int, int, str, str, str, int, str]]:
    """(code, gRPC status, HTTP status, scode, message_cn, error_code,
    ZStack code, CLI exit status, meaning) for every error, for docs and tests."""
    rows, seen = [], set()
    for cls in _all_subclasses(BlockferryError):
        if cls.code in seen:  # a subclass that refines a message, not a code
            continue
        seen.add(cls.code)
        status, http, scode, cn, cbr = _TABLE[cls.code]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append(
            (cls.code, status.name, http, scode, cn, cbr, zstack_code(cls.code), _EXIT_BY_STATUS.get(status, 7), doc)
        )
    return sorted(rows)


def markdown_table() -> str:
    """The catalogue as docs/errors.md shows it (a test keeps them equal)."""
    rows = [
        "| code | gRPC status | HTTP | scode | message_cn | error_code (/v3) | code (/zstack) | exit | meaning |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{code}` | {status} | {http} | {scode} | {cn} | {cbr} | {zs} | {ex} | {meaning} |"
        for code, status, http, scode, cn, cbr, zs, ex, meaning in catalogue()
    ]
    return "\n".join(rows) + "\n"


def _all_subclasses(cls: type[BlockferryError]) -> list[type[BlockferryError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out
