"""Answers under /v1 and the probes: seeds 000 (backup points), 001
(volumes, snapshots, clones, backups), 002 (pools), and beyond the seeds
in their spelling: hosts, zones, VMs and tasks."""

from __future__ import annotations

from typing import Any

from agent.controller.api.shapes import Empty, Shape, TaskStarted, enveloped


class Health(Shape):
    status: str


class Readiness(Shape):
    """Each part "ok", or why it is not."""

    status: str
    database: str
    dispatcher: str
    registry: str


class HostHealth(Shape):
    host_uuid: str
    hostname: str
    status: str  # what the host said; unknown once it is silent
    reason: str
    seen_at: float


class HealthShape(Shape):
    """What the hosts' heartbeats say now: state healthy, degraded,
    unreachable, auth_failed or unknown, and why (docs/controller.md)."""

    state: str
    reason: str
    total_bytes: int
    available_bytes: int
    seen_at: float | None
    hosts: list[HostHealth]


# seed 000: backup points


class BackupPointIdentity(Shape):
    IP: str
    PORT: str
    RootDir: str
    SubDir: str
    Dest: str
    Env: dict[str, Any] | None
    Pwd: str  # "******" when a password is set, never the password


class BackupPointRecord(Shape):
    tenant: str
    tenant_name: str
    Name: str
    UUID: str
    BType: str
    NsUUID: str
    Ref: int
    indentify: BackupPointIdentity  # the seed's spelling
    Ctime: int
    Mtime: int
    Bpstate: str  # Health.state
    Health: HealthShape


class BackupPointAdded(Shape):
    uuid: str
    name: str


class BackupPointList(Shape):
    total_count: int
    list: list[BackupPointRecord]


# seed 002: pools


class PoolRecord(Shape):
    UUID: str
    Name: str
    Type: int
    NamespaceUUID: str
    ZoneUUID: str
    ZoneName: str
    MachineUUID: str
    IP: str
    Port: str
    Source: str
    Username: str
    Password: str  # "******" when a password is set
    Ctime: int
    Mtime: int
    VolumeTotalCount: int
    AvailHosts: list[str] | None
    Volumes: None
    Capacity: int
    ShareNsUUIDs: None
    Used: int
    Attr: dict[str, str]
    ShareNsNames: None
    Status: str
    AllocatedCapacity: int
    LimitHost: bool
    Health: HealthShape


class PoolAnswer(Shape):
    pool: PoolRecord | None
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    tenant: str
    tenant_name: str
    PoolTypes: list[str] | None


class PoolDeleted(Shape):
    pool: Empty


class PoolInfo(Shape):
    tenant: str
    tenant_name: str
    pool: PoolRecord
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str


RangeResult = enveloped("RangeResult", str, 'This cluster\'s part of the list succeeded (data "").')


class RangeState(Shape):
    """One cluster's part of a paged list."""

    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    namespace_uuid: str
    result: RangeResult
    total_count: int


class PoolList(Shape):
    infos: list[PoolInfo]
    each_range_list_state: list[RangeState]
    TotalCount: int


class FcPath(Shape):
    host_uuid: str
    host_name: str
    disk_path: str


class FcDevices(Shape):
    """Each device (a /dev/disk/by-id name) with the hosts that see it."""

    list: dict[str, list[FcPath]]


# seed 001: volumes and snapshots


class VolumeRecord(Shape):
    UUID: str
    Name: str
    NamespaceUUID: str
    Type: str
    PoolUUID: str
    Capacity: int
    Used: int
    Attr: dict[str, Any] | None
    PoolName: str
    ZoneUUID: str
    ZoneName: str
    SnapLength: int
    SnapCap: int
    Ctime: int
    Mtime: int
    AccessPath: dict[str, str] | None  # host uuid -> the volume's path or URI on that host
    EventState: int
    ShareNsUUIDs: None
    Parent: str
    ParentSnapshot: str
    Children: None


class VolumeStarted(Shape):
    """A volume a clone or restore is creating."""

    UUID: str
    Name: str
    PoolUUID: str
    Status: str


class VolumeAnswer(Shape):
    volume: VolumeRecord | None
    clone_progress: int | float
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    tenant: str
    tenant_name: str


class TaskError(Shape):
    code: str
    message: str


class CloneProgress(VolumeAnswer):
    error_info: TaskError | None = None  # a clone that failed: why


class CloneStarted(Shape):
    volume: VolumeStarted
    clone_progress: int | float
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    tenant: str
    tenant_name: str
    task_id: str


class VolumeInfo(Shape):
    tenant: str
    tenant_name: str
    volume: VolumeRecord
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str


class VolumeList(Shape):
    list: list[VolumeInfo]
    each_range_list_state: list[RangeState]
    TotalCount: int


class SnapshotRecord(Shape):
    Name: str
    UUID: str
    Volume: str
    Desc: str
    Status: int
    Ctime: int
    Attr: dict[str, str] | None
    Size: int
    Children: list[str]
    Parent: str
    Ref: int


class TreeChildren(Shape):
    Children: list[str]


class SnapshotTree(Shape):
    """Parents: each snapshot's parent; Children: each snapshot's children
    (the key "" holds the roots)."""

    UUID: str
    Parents: dict[str, str]
    Children: dict[str, TreeChildren]
    Root: str


class SnapshotAnswer(Shape):
    snapshot: SnapshotRecord | None
    tree: SnapshotTree | None
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    tenant: str
    tenant_name: str


class SnapshotList(Shape):
    list: list[SnapshotRecord]


# seed 001: backups


class BackupRecord(Shape):
    tenant: str
    tenant_name: str
    UUID: str
    Name: str
    BpUUID: str
    NsUUID: str
    VolumeUUID: str
    VolumeCapacity: int
    Snapshot: str
    Ctime: int
    Desc: str
    Attr: None
    VolumeType: str
    Mtime: int
    BpName: str
    ExpiredTime: int
    VolumeEventStatus: int
    SnapshotUUID: str
    Status: str
    cluster_uuid: str
    cluster_name: str
    cluster_mode: str
    Mode: str | None  # full, incremental or fallback (when it ended)
    ModeReason: str | None
    Consistency: str | None  # application, crash or offline


class BackupStarted(Shape):
    backup: BackupRecord
    task_id: str


class RestoreStarted(Shape):
    backup: None
    volume: VolumeStarted
    task_id: str


class ExportRecord(Shape):
    host_uuid: str
    hostname: str
    export_id: str
    uri: str  # nbd+unix:///?socket=... on that host
    socket: str
    size: int
    expires_at: float


class ExportStarted(Shape):
    task_id: str
    export: ExportRecord


class BackupRecordList(Shape):
    backup: None
    total_count: int
    list: list[BackupRecord]


# tasks


class TaskFailure(Shape):
    code: str  # our error code (docs/errors.md)
    error_code: str  # seed 003's BackupService code
    message: str


class TaskResource(Shape):
    type: str
    uuid: str


class TaskRecord(Shape):
    """A long operation. `result` is the job's result once it succeeded
    (docs/api.md lists it per operation), or what a failed verify found."""

    id: str
    operation_type: str
    status: str  # waiting, running, success, failed, timeout, cancelled
    progress: float
    created_at: float
    started_at: float | None
    ended_at: float | None
    error_info: TaskFailure | None
    resource: TaskResource
    tenant: str
    host_uuid: str
    attempts: int
    result: dict[str, Any] | None


class TaskList(Shape):
    total_count: int
    tasks: list[TaskRecord]


# hosts, zones, VMs


class HostPoolReport(Shape):
    """The host's last probe of a pool."""

    pool_uuid: str = ""
    type: str = ""
    status: str = ""
    reason: str = ""
    total_bytes: int = 0
    available_bytes: int = 0
    metadata_owner: str = ""  # a shared LUN pool: the host holding its metadata owner lease
    live_hosts: list[str] = []  # a shared LUN pool: the hosts holding a live host id lease
    lapsed_hosts: list[str] = []  # a shared LUN pool: hosts whose lease stopped being renewed (agent died)


class HostBackupPointReport(Shape):
    """The host's last probe of a backup point."""

    backup_point_uuid: str = ""
    type: str = ""
    status: str = ""
    reason: str = ""
    error_code: str = ""
    total_bytes: int = 0
    available_bytes: int = 0
    attached: bool = False


class HostRecord(Shape):
    UUID: str
    Hostname: str
    Address: str
    Version: str
    State: str  # online, draining, offline
    LastSeen: float
    RegisteredAt: float
    RunningJobs: int
    MaxJobs: int
    Facts: dict[str, Any]  # what the agent reported (docs/operations.md)
    Pools: list[HostPoolReport]
    BackupPoints: list[HostBackupPointReport]
    ClusterUUID: str
    ZoneUUID: str
    ZoneName: str


class HostList(Shape):
    total_count: int
    list: list[HostRecord]


class HostForgotten(Shape):
    uuid: str


class VmDisk(Shape):
    Device: str
    File: str
    PoolUUID: str
    VolumeUUID: str


class VmRecord(Shape):
    UUID: str
    Name: str
    State: str
    GuestAgent: bool
    Manager: str
    Disks: list[VmDisk]
    HostUUID: str
    HostState: str


class VmList(Shape):
    total_count: int
    list: list[VmRecord]


class ZoneRecord(Shape):
    ClusterUUID: str
    UUID: str
    Name: str
    Hosts: list[str]
    PoolCount: int


class ZoneList(Shape):
    total_count: int
    list: list[ZoneRecord]


# notifications


class NotificationRecord(Shape):
    """One delivery of an event to a webhook or e-mail."""

    id: str
    event: str
    subject: str
    channel: str  # webhook or email
    target: str  # the webhook's scheme and host, or the addresses
    status: str  # pending, delivered, failed
    attempts: int
    next_attempt_at: float | None
    last_error: str
    created_at: float
    delivered_at: float | None
    payload: dict[str, Any]  # the body sent (docs/notifications.md)


class NotificationList(Shape):
    total_count: int
    list: list[NotificationRecord]


class CopyQueued(Shape):
    backup_uuid: str  # the source backup
    copy_uuid: str  # its copy's backup uuid at the target (a backup like any other)
    task_id: str  # follow it at GET /v1/tasks/{task_id}


class CopiesQueued(Shape):
    """Copy tasks queued, one per backup the target lacks."""

    total_count: int
    list: list[CopyQueued]


# the envelopes the routes declare
EmptyAnswer = enveloped("EmptyAnswer", Empty)
CopiesQueuedAnswer = enveloped("CopiesQueuedAnswer", CopiesQueued)
TaskStartedAnswer = enveloped("TaskStartedAnswer", TaskStarted)
BackupPointAddedAnswer = enveloped("BackupPointAddedAnswer", BackupPointAdded)
BackupPointListAnswer = enveloped("BackupPointListAnswer", BackupPointList)
PoolEnvelope = enveloped("PoolEnvelope", PoolAnswer)
PoolDeletedAnswer = enveloped("PoolDeletedAnswer", PoolDeleted)
PoolListAnswer = enveloped("PoolListAnswer", PoolList)
FcDevicesAnswer = enveloped("FcDevicesAnswer", FcDevices)
VolumeEnvelope = enveloped("VolumeEnvelope", VolumeAnswer)
CloneProgressAnswer = enveloped("CloneProgressAnswer", CloneProgress)
CloneStartedAnswer = enveloped("CloneStartedAnswer", CloneStarted)
VolumeListAnswer = enveloped("VolumeListAnswer", VolumeList)
SnapshotEnvelope = enveloped("SnapshotEnvelope", SnapshotAnswer)
SnapshotListAnswer = enveloped("SnapshotListAnswer", SnapshotList)
BackupStartedAnswer = enveloped("BackupStartedAnswer", BackupStarted)
RestoreStartedAnswer = enveloped("RestoreStartedAnswer", RestoreStarted)
ExportStartedAnswer = enveloped("ExportStartedAnswer", ExportStarted)
BackupListAnswer = enveloped("BackupListAnswer", BackupRecordList)
TaskAnswer = enveloped("TaskAnswer", TaskRecord)
TaskListAnswer = enveloped("TaskListAnswer", TaskList)
HostAnswer = enveloped("HostAnswer", HostRecord)
HostListAnswer = enveloped("HostListAnswer", HostList)
HostForgottenAnswer = enveloped("HostForgottenAnswer", HostForgotten)
VmListAnswer = enveloped("VmListAnswer", VmList)
ZoneListAnswer = enveloped("ZoneListAnswer", ZoneList)
NotificationListAnswer = enveloped("NotificationListAnswer", NotificationList)
ErrorAnswer = enveloped(
    "ErrorAnswer",
    None,
    "An error (seeds 000-002): scode the error's number, desc the field at fault, message and "
    "message_cn (messageCn) the reason; data null (docs/errors.md)",
)
