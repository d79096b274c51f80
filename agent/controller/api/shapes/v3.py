"""Answers under /v3/{project_id} (seed 003): vaults, policies,
checkpoints, backups, backup members and operation logs; and the
request bodies of its create and update calls, for the OpenAPI (the
handlers read the bodies themselves, to answer in the seed's codes)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.controller.api.shapes import Shape


class CbrError(Shape):
    """An error under /v3: the seed's BackupService code and the reason."""

    error_code: str
    error_msg: str


# vaults


class VaultResourceExtra(Shape):
    exclude_volumes: list[str]


class VaultResource(Shape):
    id: str
    name: str
    type: str  # OS::Cinder::Volume or OS::Nova::Server
    size: int  # GB
    backup_count: int
    backup_size: int
    protect_status: str
    extra_info: VaultResourceExtra | None


class VaultBilling(Shape):
    status: str
    size: int  # GB
    allocated: int
    used: int  # MB, rounded up
    frozen_scene: str | None
    object_type: str
    protect_type: str
    consistent_level: str
    charging_mode: str
    cloud_type: str
    spec_code: str
    storage_unit: str | None
    order_id: str | None
    product_id: str | None


class VaultCapacity(Shape):
    totalCapacity: int
    availableCapacity: int
    usedCapacity: int
    logicalCapacity: int
    backups: int


class BackupStorageHealth(Shape):
    """What a reconnect found (PUT .../actions)."""

    uuid: str
    status: str
    host_uuid: str
    totalCapacity: int
    availableCapacity: int
    latency_ms: float
    error_code: str | None
    error: str | None


class Vault(Shape):
    id: str
    name: str
    description: str
    project_id: str
    provider_id: str
    created_at: str | None
    enterprise_project_id: str
    user_id: str
    auto_bind: bool
    bind_rules: dict[str, Any]
    auto_expand: bool
    tags: list[dict[str, str]]
    backup_point_id: str
    policy_id: str | None
    backup_name_prefix: str
    status: str
    state: str
    billing: VaultBilling
    capacity: VaultCapacity
    resources: list[VaultResource]
    backup_storage: BackupStorageHealth | None = None  # a reconnect's answer only


class VaultAnswer(Shape):
    vault: Vault


class VaultList(Shape):
    vaults: list[Vault]
    count: int


class ResourcesAdded(Shape):
    add_resource_ids: list[str]


class ResourcesRemoved(Shape):
    remove_resource_ids: list[str]


class ResourcesMigrated(Shape):
    migrated_resources: list[str]


class PolicyBinding(Shape):
    vault_id: str
    policy_id: str


class PolicyAssociated(Shape):
    associate_policy: PolicyBinding


class PolicyDissociated(Shape):
    dissociate_policy: PolicyBinding


# policies


class OperationDefinitionShape(Shape):
    max_backups: int
    retention_duration_days: int
    day_backups: int
    week_backups: int
    month_backups: int
    year_backups: int
    timezone: str | None = None
    full_backup_interval: int
    bandwidth_limit: int | None = None  # beyond the seed: bytes per second for each backup (absent: none)
    # beyond the seed: a copy of each backup to a second backup point, with its own retention (absent: none)
    copy_backup_point_id: str | None = None
    copy_max_backups: int | None = None
    copy_retention_duration_days: int | None = None


class TriggerProperties(Shape):
    pattern: list[str]  # RRULEs (RFC 5545)
    start_time: str


class Trigger(Shape):
    id: str
    name: str
    type: str
    properties: TriggerProperties


class AssociatedVault(Shape):
    vault_id: str
    destination_vault_id: str | None


class Policy(Shape):
    id: str
    name: str
    enabled: bool
    operation_type: str
    operation_definition: OperationDefinitionShape
    trigger: Trigger
    associated_vaults: list[AssociatedVault] | None


class PolicyAnswer(Shape):
    policy: Policy


class PolicyList(Shape):
    policies: list[Policy]
    count: int


# checkpoints


class CheckpointResource(Shape):
    id: str
    name: str
    type: str
    resource_size: str
    protect_status: str
    extra_info: dict[str, Any] | None  # a server's disk: server_id, consistency, snapshot_id
    backup_id: str
    task_id: str
    backup_mode: str


class CheckpointVault(Shape):
    id: str
    name: str
    resources: list[CheckpointResource]
    skipped_resources: list[dict[str, Any]]


class CheckpointExtra(Shape):
    retention_duration: int
    name: str
    description: str


class Checkpoint(Shape):
    id: str
    project_id: str
    status: str
    created_at: str | None
    due_at: str
    manual: bool
    vault: CheckpointVault
    extra_info: CheckpointExtra


class CheckpointAnswer(Shape):
    checkpoint: Checkpoint


class CheckpointList(Shape):
    checkpoints: list[Checkpoint]
    count: int


# backups


class BackupExtendInfo(Shape):
    auto_trigger: bool
    incremental: bool
    snapshot_id: str
    supported_restore_mode: str
    contain_system_disk: bool
    encrypted: bool | None
    bootable: bool | None
    support_llid: bool | None
    os_images_data: list[dict[str, Any]] | None
    size_bytes: int
    stored_bytes: int
    image_digest: str | None
    mode: str | None
    mode_reason: str | None
    consistency: str | None


class Backup(Shape):
    id: str
    name: str
    description: str | None
    project_id: str
    enterprise_project_id: str
    checkpoint_id: str | None
    vault_id: str | None
    parent_id: str | None
    children: list[dict[str, Any]]
    image_type: str
    status: str
    resource_id: str
    resource_name: str
    resource_type: str
    resource_size: int  # GB
    resource_az: str | None
    created_at: str | None
    updated_at: str | None
    expired_at: str | None
    protected_at: str | None
    provider_id: str
    extend_info: BackupExtendInfo


class BackupAnswer(Shape):
    backup: Backup


class BackupList(Shape):
    backups: list[Backup]
    count: int
    offset: int
    limit: int


class Member(Shape):
    id: str
    backup_id: str
    dest_project_id: str
    status: str  # pending, accepted, rejected
    vault_id: str | None
    image_id: str | None
    created_at: str | None
    updated_at: str | None


class MemberAnswer(Shape):
    member: Member


class Members(Shape):
    members: list[Member]


class MemberList(Members):
    count: int


# operation logs


class OperationLogError(Shape):
    code: str
    message: str


class OperationLog(Shape):
    """One task; extra_info holds common (progress, task_id) and, by
    operation, backup, resource, restore, delete, vault_delete or
    remove_resources."""

    id: str
    operation_type: str
    status: str
    project_id: str
    provider_id: str
    checkpoint_id: str | None
    policy_id: str | None
    vault_id: str | None
    vault_name: str | None
    created_at: str | None
    started_at: str | None
    ended_at: str | None
    updated_at: str | None
    error_info: OperationLogError
    extra_info: dict[str, Any]


class OperationLogAnswer(Shape):
    operation_log: OperationLog


class OperationLogList(Shape):
    operation_logs: list[OperationLog]
    count: int
    limit: int
    offset: int


# request bodies: documented for clients and the fuzzer; the handlers
# check each field themselves, to answer in the seed's codes


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")


Uuid = Annotated[str, Field(description="a uuid")]


class VaultBillingBody(Body):
    object_type: Literal["disk", "server"]  # volumes, or running VMs with all their disks
    protect_type: Literal["backup"]
    consistent_level: Literal["crash_consistent"] = "crash_consistent"
    size: int = Field(ge=10, le=10485760, description="GB")


class VaultResourceBody(Body):
    id: Uuid
    type: Literal["OS::Cinder::Volume", "OS::Nova::Server"]
    extra_info: dict[str, list[Uuid]] | None = Field(None, description='a server\'s {"exclude_volumes": [...]}')


class VaultBody(Body):
    name: str = Field(min_length=1, max_length=64)
    billing: VaultBillingBody
    resources: list[VaultResourceBody] = Field(max_length=255, description="[] for none")
    backup_point_id: Uuid | None = Field(None, description="default: [controller] default_backup_point")
    backup_policy_id: Uuid | None = None
    description: str = Field("", max_length=64)
    backup_name_prefix: str | None = Field(None, max_length=32)


class VaultCreate(Body):
    vault: VaultBody


class VaultBillingUpdate(Body):
    size: int = Field(ge=10, le=10485760, description="GB")


class VaultUpdateBody(Body):
    name: str = Field(None, min_length=1, max_length=64)
    description: str = Field(None, max_length=64)
    backup_name_prefix: str = Field(None, max_length=32)
    billing: VaultBillingUpdate | None = None


class VaultUpdate(Body):
    vault: VaultUpdateBody


class ResourcesAdd(Body):
    resources: list[VaultResourceBody] = Field(min_length=1, max_length=255)


class ResourcesRemove(Body):
    resource_ids: list[Uuid] = Field(min_length=1)


class ResourcesMigrate(Body):
    resource_ids: list[Uuid] = Field(min_length=1, max_length=255)
    destination_vault_id: Uuid


class PolicyRef(Body):
    policy_id: Uuid


class ReconnectAction(Body):
    reconnectBackupStorage: dict[str, Any]


class PolicyDefinitionBody(Body):
    model_config = ConfigDict(extra="forbid")
    max_backups: int = Field(-1, description="-1, or 1 to 99999")
    retention_duration_days: int = Field(-1, description="-1, or 1 to 99999")
    day_backups: int = Field(0, ge=0, le=100)
    week_backups: int = Field(0, ge=0, le=100)
    month_backups: int = Field(0, ge=0, le=100)
    year_backups: int = Field(0, ge=0, le=100)
    timezone: str | None = Field(None, description="UTC+08:00 or an IANA name; required with day/week/month/year")
    full_backup_interval: int = Field(-1, ge=-1, le=100)
    bandwidth_limit: int = Field(0, ge=0, le=1 << 40, description="beyond the seed: bytes per second per backup")
    copy_backup_point_id: str = Field("", description="beyond the seed: copy every backup to this backup point")
    copy_max_backups: int = Field(-1, description="the copies' retention: -1, or 1 to 99999")
    copy_retention_duration_days: int = Field(-1, description="the copies' retention: -1, or 1 to 99999")


class TriggerPropertiesBody(Body):
    pattern: list[str] = Field(min_length=1, description="RRULEs (RFC 5545), at most 24 a day")


class TriggerBody(Body):
    properties: TriggerPropertiesBody


class PolicyBody(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    operation_type: Literal["backup"]
    enabled: bool = True
    operation_definition: PolicyDefinitionBody
    trigger: TriggerBody


class PolicyCreate(Body):
    policy: PolicyBody


class PolicyUpdateBody(Body):
    name: str = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    enabled: bool = None  # type: ignore[assignment]
    operation_definition: PolicyDefinitionBody = None  # type: ignore[assignment]
    trigger: TriggerBody = None  # type: ignore[assignment]


class PolicyUpdate(Body):
    policy: PolicyUpdateBody


class CheckpointParameters(Body):
    name: str = Field("", pattern=r"^[A-Za-z0-9_-]{0,64}$")
    description: str = Field("", max_length=255)
    incremental: bool = True
    resources: list[Uuid] | None = Field(None, min_length=1, description="volumes of the vault; default all")


class CheckpointBody(Body):
    vault_id: Uuid
    parameters: CheckpointParameters | None = None


class CheckpointCreate(Body):
    checkpoint: CheckpointBody


class RestoreMapping(Body):
    backup_id: Uuid
    volume_id: Uuid


class RestoreBody(Body):
    volume_id: Uuid | None = Field(None, description="the volume to restore into (or one mapping)")
    mappings: list[RestoreMapping] | None = Field(None, min_length=1, max_length=1)


class RestoreRequest(Body):
    restore: RestoreBody


class MembersAdd(Body):
    members: list[str] = Field(min_length=1, max_length=10, description="project ids")


class MemberUpdate(Body):
    status: Literal["pending", "accepted", "rejected"]
    vault_id: Uuid | None = Field(None, description="required to accept: the vault it is accepted into")
