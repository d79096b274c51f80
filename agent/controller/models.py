"""The controller's inventory (SQLAlchemy 2). Schema changes go through the
Alembic migrations in agent/controller/migrations/."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BackupPoint(Base):
    """Seed 000: where backups go (btype nfs, samba, iscsi, disk, fc, local, s3)."""

    __tablename__ = "backup_points"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_backup_points_tenant_name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    tenant_name: Mapped[str] = mapped_column(String(255), default="")
    cluster_uuid: Mapped[str] = mapped_column(String(36))
    zone_uuid: Mapped[str] = mapped_column(String(36), default="")
    name: Mapped[str] = mapped_column(String(128))
    btype: Mapped[str] = mapped_column(String(16))
    ip: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[str] = mapped_column(String(8), default="")
    root_dir: Mapped[str] = mapped_column(String(1024), default="")
    sub_dir: Mapped[str] = mapped_column(String(1024), default="")
    password_sealed: Mapped[str] = mapped_column(String(512), default="")  # SecretBox, never plaintext
    env_sealed: Mapped[str] = mapped_column(Text, default="")  # the request's "env" (may hold credentials), sealed
    ref: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="unknown")  # healthy, degraded, unreachable...
    ctime: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[int] = mapped_column(BigInteger)
    gc_wanted_at: Mapped[float] = mapped_column(Float, default=0.0)  # the deletion that wants a GC (0: none)
    last_gc_at: Mapped[float] = mapped_column(Float, default=0.0)  # the last GC (done, or queued by gc_interval)


class Host(Base):
    """An agent host: registered over gRPC, alive while it sends heartbeats."""

    __tablename__ = "hosts"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    address: Mapped[str] = mapped_column(String(512), default="")  # where the controller calls the agent
    version: Mapped[str] = mapped_column(String(64), default="")
    facts_json: Mapped[str] = mapped_column(Text, default="{}")  # HostFacts as JSON
    pools_json: Mapped[str] = mapped_column(Text, default="[]")  # [PoolReport]
    backup_points_json: Mapped[str] = mapped_column(Text, default="[]")
    vms_json: Mapped[str] = mapped_column(Text, default="[]")  # the running VMs its heartbeats report
    max_jobs: Mapped[int] = mapped_column(Integer, default=4)
    running_jobs: Mapped[int] = mapped_column(Integer, default=0)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    cluster_uuid: Mapped[str] = mapped_column(String(36), default="")  # empty: any cluster
    zone_uuid: Mapped[str] = mapped_column(String(36), default="")  # empty: any zone
    zone_name: Mapped[str] = mapped_column(String(64), default="")

    def in_scope(self, cluster_uuid: str, zone_uuid: str) -> bool:
        """May serve pools of this cluster and zone."""
        return self.cluster_uuid in ("", cluster_uuid) and self.zone_uuid in ("", zone_uuid)


class Pool(Base):
    """Seed 002: a shared storage pool, served by the agents of AvailHosts
    (or by every host that supports its type, when LimitHost is false)."""

    __tablename__ = "pools"
    __table_args__ = (UniqueConstraint("cluster_uuid", "name", name="uq_pools_cluster_name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    cluster_uuid: Mapped[str] = mapped_column(String(36), index=True)
    zone_uuid: Mapped[str] = mapped_column(String(36), default="")
    zone_name: Mapped[str] = mapped_column(String(64), default="default")  # as its hosts name the zone
    name: Mapped[str] = mapped_column(String(128))
    pool_type: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # what the agents serve: dir or rbd
    ip: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[str] = mapped_column(String(8), default="")
    source: Mapped[str] = mapped_column(String(1024), default="")
    username: Mapped[str] = mapped_column(String(255), default="")
    password_sealed: Mapped[str] = mapped_column(String(512), default="")
    limit_host: Mapped[bool] = mapped_column(Boolean, default=False)
    avail_hosts_json: Mapped[str] = mapped_column(Text, default="[]")  # the hosts that serve it
    avail_tenants_json: Mapped[str] = mapped_column(Text, default="[]")  # empty: every tenant
    attr_json: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="unknown")
    capacity: Mapped[int] = mapped_column(BigInteger, default=0)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    machine_uuid: Mapped[str] = mapped_column(String(36), default="")
    ctime: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[int] = mapped_column(BigInteger, default=0)


class Volume(Base):
    """Seed 001: a shared volume, in a pool, owned by a tenant. Its data and
    snapshots live on the pool's storage; the agents are the truth about
    them, this row about ownership and placement."""

    __tablename__ = "volumes"
    # names need not be unique: the seed identifies volumes by uuid
    __table_args__ = (Index("ix_volumes_pool_name", "pool_uuid", "name"),)

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    cluster_uuid: Mapped[str] = mapped_column(String(36))
    pool_uuid: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(128))
    vtype: Mapped[str] = mapped_column(String(8))  # block, share, fs
    capacity: Mapped[int] = mapped_column(BigInteger)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    snap_cap: Mapped[int] = mapped_column(BigInteger, default=0)
    snap_length: Mapped[int] = mapped_column(BigInteger, default=0)
    host_uuid: Mapped[str] = mapped_column(String(36), default="")  # the host that made it (preferred for calls)
    access_path: Mapped[str] = mapped_column(String(1024), default="")
    parent: Mapped[str] = mapped_column(String(36), default="")
    parent_snapshot: Mapped[str] = mapped_column(String(36), default="")
    attr_json: Mapped[str] = mapped_column(Text, default="null")
    state: Mapped[str] = mapped_column(String(16), default="ready")  # creating, ready, deleting, error
    ctime: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[int] = mapped_column(BigInteger)


class Task(Base):
    """An operation log entry (shaped after seed 003's tasks): every long
    operation runs as a task, dispatched to an agent as a job."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    operation_type: Mapped[str] = mapped_column(String(32), index=True)  # clone, backup, restore, ...
    # waiting, running, success, failed, skipped, timeout
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..100
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    resource_type: Mapped[str] = mapped_column(String(16))  # volume, backup
    resource_uuid: Mapped[str] = mapped_column(String(36), index=True)
    pool_uuid: Mapped[str] = mapped_column(String(36), default="")  # placement: a host serving it
    target_pool_uuid: Mapped[str] = mapped_column(String(36), default="")  # ... and this one too
    backup_point_uuid: Mapped[str] = mapped_column(String(36), default="")
    job_kind: Mapped[str] = mapped_column(String(16))  # the agent job: clone, backup, restore
    spec_json: Mapped[str] = mapped_column(Text)  # the agent job spec (proto JSON)
    idempotent: Mapped[bool] = mapped_column(Boolean, default=True)  # may run again elsewhere after a host loss
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    host_uuid: Mapped[str] = mapped_column(String(36), default="")
    agent_job_id: Mapped[str] = mapped_column(String(80), default="")
    error_code: Mapped[str] = mapped_column(String(32), default="")
    error_message: Mapped[str] = mapped_column(Text, default="")
    result_json: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float] = mapped_column(Float, default=0.0)
    ended_at: Mapped[float] = mapped_column(Float, default=0.0)


class Backup(Base):
    """Seed 001: a backup of a volume's snapshot on a backup point."""

    __tablename__ = "backups"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    cluster_uuid: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(String(1024), default="")
    backup_point_uuid: Mapped[str] = mapped_column(String(36), index=True)
    volume_uuid: Mapped[str] = mapped_column(String(36), index=True)
    volume_capacity: Mapped[int] = mapped_column(BigInteger, default=0)
    volume_type: Mapped[str] = mapped_column(String(8), default="block")
    pool_uuid: Mapped[str] = mapped_column(String(36), default="")
    snapshot_uuid: Mapped[str] = mapped_column(String(36))
    snapshot_name: Mapped[str] = mapped_column(String(128), default="")
    status: Mapped[str] = mapped_column(String(24))  # BackupStarted, BackupSucceeded, BackupFailed
    mode: Mapped[str] = mapped_column(String(16), default="")
    mode_reason: Mapped[str] = mapped_column(Text, default="")  # why every chunk was read, or tracking degraded
    consistency: Mapped[str] = mapped_column(String(16), default="")  # of its snapshot: application, crash, offline
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    image_digest: Mapped[str] = mapped_column(String(80), default="")
    task_id: Mapped[str] = mapped_column(String(36), default="")
    vault_id: Mapped[str] = mapped_column(String(36), default="", index=True)  # made by a vault's checkpoint
    checkpoint_id: Mapped[str] = mapped_column(String(36), default="")
    copy_of: Mapped[str] = mapped_column(String(36), default="")  # a copy (copy job): the backup it copies
    ctime: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[int] = mapped_column(BigInteger)


class BackupMember(Base):
    """Seed 003's backup sharing: a backup shared with another project,
    pending until that project accepts (into one of its vaults) or
    rejects it. An accepted member may restore the backup into its own
    volumes; the data stays in the owner's repository."""

    __tablename__ = "backup_members"
    __table_args__ = (UniqueConstraint("backup_id", "dest_project_id", name="uq_backup_members_backup_dest"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    backup_id: Mapped[str] = mapped_column(String(36), index=True)
    tenant: Mapped[str] = mapped_column(String(36))  # the backup's owner
    dest_project_id: Mapped[str] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, accepted, rejected
    vault_id: Mapped[str] = mapped_column(String(36), default="")  # the receiver's vault, once accepted
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class Policy(Base):
    """Seed 003: a backup policy (schedule patterns in UTC, retention)."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_policies_tenant_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(64))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    operation_type: Mapped[str] = mapped_column(String(16), default="backup")
    definition_json: Mapped[str] = mapped_column(Text)  # operation_definition, as checked
    patterns_json: Mapped[str] = mapped_column(Text)  # trigger.properties.pattern
    start_time: Mapped[float] = mapped_column(Float)  # INTERVAL counts from here
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Vault(Base):
    """Seed 003: a named repository on a backup point, with a size, the
    volumes it protects and at most one policy."""

    __tablename__ = "vaults"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_vaults_tenant_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(String(64), default="")
    backup_point_uuid: Mapped[str] = mapped_column(String(36), index=True)
    size_gb: Mapped[int] = mapped_column(BigInteger)
    object_type: Mapped[str] = mapped_column(String(16), default="disk")
    consistent_level: Mapped[str] = mapped_column(String(32), default="crash_consistent")
    policy_id: Mapped[str] = mapped_column(String(36), default="", index=True)
    policy_since: Mapped[float] = mapped_column(Float, default=0.0)  # scheduled runs due from then on
    backup_name_prefix: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(16), default="available")  # available, deleting, error
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class VaultResource(Base):
    """A volume protected by a vault (a volume belongs to one vault)."""

    __tablename__ = "vault_resources"

    volume_uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    vault_id: Mapped[str] = mapped_column(String(36), index=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)  # backups so far (full_backup_interval)
    base_snapshot: Mapped[str] = mapped_column(String(36), default="")  # ours, the next incremental's base
    added_at: Mapped[float] = mapped_column(Float)
    server_uuid: Mapped[str] = mapped_column(String(36), default="", index=True)  # a disk of this VaultServer


class VaultServer(Base):
    """A VM protected by a vault (seed 003's OS::Nova::Server): each of its
    disks that is a volume, less exclude_volumes, is a VaultResource with
    this server_uuid, and a checkpoint snapshots them as one set."""

    __tablename__ = "vault_servers"

    server_uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    vault_id: Mapped[str] = mapped_column(String(36), index=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    exclude_json: Mapped[str] = mapped_column(Text, default="[]")  # volume uuids not backed up
    added_at: Mapped[float] = mapped_column(Float)


class Checkpoint(Base):
    """Seed 003: one run of a vault's policy (or a manual one) over its
    resources. (vault_id, due_at) is unique: a due run is never made twice."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("vault_id", "due_at", name="uq_checkpoints_vault_due"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    vault_id: Mapped[str] = mapped_column(String(36), index=True)
    tenant: Mapped[str] = mapped_column(String(36), index=True)
    policy_id: Mapped[str] = mapped_column(String(36), default="")
    due_at: Mapped[float] = mapped_column(Float)  # the schedule's time; manual: creation time
    status: Mapped[str] = mapped_column(String(16), default="protecting")  # protecting, available, error
    manual: Mapped[bool] = mapped_column(Boolean, default=False)
    resources_json: Mapped[str] = mapped_column(Text, default="[]")  # [{id, backup_id, task_id}]
    skipped_json: Mapped[str] = mapped_column(Text, default="[]")  # [{id, code, reason}]
    created_at: Mapped[float] = mapped_column(Float)


class Notification(Base):
    """One delivery of one event to one channel (a webhook or e-mail):
    pending until delivered, retried with backoff, failed after the
    configured attempts. The record is what GET /v1/notifications shows."""

    __tablename__ = "notifications"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    event: Mapped[str] = mapped_column(String(32), index=True)
    subject: Mapped[str] = mapped_column(String(256))
    payload_json: Mapped[str] = mapped_column(Text)  # the JSON body sent (no secrets)
    channel: Mapped[str] = mapped_column(String(64))  # webhook:<key> or email
    target: Mapped[str] = mapped_column(String(256))  # how to show it: a URL's host, or the addresses
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float] = mapped_column(Float, default=0.0)


class WatchState(Base):
    """The last state the notifier saw of a watched object (host:<uuid>,
    backup_point:<uuid>, backup:<volume uuid>), so each change is told
    once, across restarts too."""

    __tablename__ = "watch_states"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # up, down, fresh, stale
    since: Mapped[float] = mapped_column(Float)
