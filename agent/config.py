"""Typed agent configuration: one TOML file plus a conf.d directory.

Files under conf.d (`*.toml`) are merged over the main file in name order,
key by key within each section. Every option is declared once below, with its
type, default and help text; the commented default file
(etc/blockferry/agent.toml) is rendered from these declarations and a test
keeps the two equal. Unknown sections or keys, wrong types and bad values are
refused with a ConfigError that names the file, the section and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, InvalidArgument

DEFAULT_CONFIG = "/etc/blockferry/agent.toml"
MASK = "********"


def option(default: Any, help: str, *, secret: bool = False, factory: bool = False):
    meta = {"help": help, "secret": secret}
    if factory:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AgentSection:
    """Where the agent keeps state and which paths jobs may touch."""

    state_dir: str = option("/var/lib/blockferry", "Directory of the job journal (jobs.sqlite3).")
    roots: list[str] = option(
        ["/var/lib/blockferry/pools"],
        "Absolute paths that jobs may read or write; anything else is refused.",
        factory=True,
    )
    run_dir: str = option("/run/blockferry", "Runtime directory for qemu-nbd sockets (keep the path short).")
    log_level: str = option("info", "One of debug, info, warning, error.")
    log_format: str = option("auto", "auto (journal when started by systemd, else text), journal, text or json.")
    sys_root: str = option(
        "/sys", "Where sysfs is, for FC HBA and device discovery (change only for tests or containers)."
    )
    dev_root: str = option("/dev", "Where /dev is, for /dev/disk/by-id (change only for tests or containers).")
    fence_command: list[str] = option(
        [],
        "The fence command of the shared LUN pools (type lun) whose own fence_command is empty, "
        "including pools the controller attaches: see the pool option.",
        factory=True,
    )
    iscsi_initiator: str = option(
        "",
        "This host's iSCSI initiator name (iqn.YYYY-MM.domain:name), for its own sessions and its VMs' "
        "on shared LUN pools; empty: iqn.2026-11.io.blockferry:<hostname>.",
    )


@dataclass
class GrpcSection:
    """How the agent serves gRPC."""

    unix_socket: str = option(
        "/run/blockferry/agent.sock", "Unix socket path; its permissions (0660) decide who may call."
    )
    tcp_listen: str = option("", "host:port for gRPC over TCP with TLS; empty disables TCP.")
    tls_cert: str = option("", "PEM server certificate (required with tcp_listen).")
    tls_key: str = option("", "PEM private key of tls_cert (keep it 0600).")
    tls_client_ca: str = option(
        "", "PEM CA bundle; when set, TCP clients must present a certificate it signed (mutual TLS)."
    )
    auth_token: str = option(
        "", "Optional bearer token TCP callers must send as 'authorization: Bearer <token>'.", secret=True
    )
    max_workers: int = option(64, "Threads serving RPCs (each WatchJob stream holds one).")


@dataclass
class JobsSection:
    """The job engine."""

    max_concurrent: int = option(4, "Jobs running at once on this host; more wait their turn.")
    bandwidth_limit: int = option(
        0, "Bytes per second shared by all jobs; 0 means unlimited. A reload (SIGHUP) changes it."
    )
    on_busy: str = option("wait", "When a job's resource is locked by another job: wait, or refuse at submit.")
    drain_timeout: float = option(
        30.0, "Seconds SIGTERM waits for running jobs before interrupting them at a safe point."
    )
    keep_finished: int = option(10000, "Finished jobs kept in the journal; older ones are pruned at start.")


@dataclass
class SystemdSection:
    """systemd integration."""

    watchdog: bool = option(True, "Send watchdog pings when systemd sets WATCHDOG_USEC.")


@dataclass
class MetricsSection:
    """Prometheus metrics (jobs, bytes, durations, backup point health)."""

    listen: str = option(
        "",
        "Loopback host:port of the metrics endpoint, such as 127.0.0.1:9464 (no "
        "authentication: loopback only); empty turns it off.",
    )


@dataclass
class VmsSection:
    """Running VMs whose volumes the agent snapshots live (docs/live.md)."""

    qmp_sockets: list[str] = option(
        [],
        "Globs of QMP sockets to ask too, for qemus whose monitor is not on their command line "
        "(such as /run/qemu-server/*.qmp).",
        factory=True,
    )
    qmp_timeout: float = option(10.0, "Seconds a qemu may take to answer one QMP command.")
    report_interval: float = option(
        30.0, "Seconds between two scans of the running VMs reported to the controller (each VM's monitor is asked)."
    )
    libvirt_uri: str = option(
        "",
        "libvirt connection for the VMs a libvirtd manages (such as qemu:///system); empty: libvirt is not asked.",
    )
    libvirt_work_dir: str = option(
        "/var/tmp/blockferry",
        "Where libvirt's pull backups put their NBD socket and scratch files (one private directory per job, "
        "owned by the user qemu runs as).",
    )


@dataclass
class ControllerLinkSection:
    """Registration with a blockferry-controller (off when address is empty)."""

    address: str = option(
        "",
        "The controller's agent registry: host:port (TLS when tls_ca is set) or "
        "unix:/path. Empty: this agent does not register.",
    )
    token: str = option(
        "", "Bearer token the controller expects from agents ([controller] agent_token there).", secret=True
    )
    tls_ca: str = option(
        "",
        "PEM CA that signed the controller's certificate (TLS); tls_cert/tls_key add a "
        "client certificate (mutual TLS).",
    )
    tls_cert: str = option("", "PEM client certificate for mutual TLS with the controller.")
    tls_key: str = option("", "PEM key of tls_cert (keep it 0600).")
    host_uuid: str = option("", "This host's uuid in the inventory; empty: derived from /etc/machine-id.")
    cluster_uuid: str = option(
        "",
        "The cluster (seed cluster_uuid) this host belongs to; pools of other clusters "
        "are never placed here. Empty: any cluster.",
    )
    zone_uuid: str = option(
        "",
        "The zone (seed zone_uuid) this host belongs to; a pool is attached only on "
        "hosts of its zone. Empty: any zone.",
    )
    zone_name: str = option("", 'A name for zone_uuid, shown as ZoneName (empty: "default").')
    advertise: str = option(
        "",
        "Where the controller reaches this agent's gRPC (host:port or unix:/path); "
        "empty: [grpc] tcp_listen, else the unix socket.",
    )
    heartbeat_interval: float = option(
        10.0, "Seconds between heartbeats (the controller may ask for another interval when the agent registers)."
    )
    fence_after: float = option(
        20.0,
        "Seconds without a successful heartbeat after which this agent cancels its "
        "running jobs (self-fencing), so the controller can run them on another host. "
        "Keep it below the controller's host_dead_after. 0: never.",
    )


@dataclass
class PoolSection:
    """A storage pool: [pools.<pool uuid>] with its type and where it lives."""

    type: str = option(
        "dir",
        "dir: qcow2 volumes in a directory (a local disk or a mounted NFS/SMB/cluster fs); "
        "nfs: qcow2 volumes on an NFSv3 export, reached in user space (libnfs and qemu's nfs "
        "driver, no mount); rbd: RBD images in a Ceph pool; lun: qcow2 layers in slices of one "
        "LUN that several hosts share (a SAN disk or FC LUN; docs/shared-pools.md).",
    )
    path: str = option("", "dir: the pool root; volumes live in <path>/pool-<uuid>/volume/<volume uuid>.")
    ip: str = option(
        "",
        "nfs: the NFS server's address (seed 002 `ip`); its ports come from the portmapper; lun: the iSCSI "
        "portal's address (empty: a local device).",
    )
    export: str = option(
        "",
        "nfs: the export path (seed 002 `source`); volumes live in "
        "nfs://<ip><export>/pool-<uuid>/volume/<volume uuid>.",
    )
    ceph_conf: str = option("/etc/ceph/ceph.conf", "rbd: ceph.conf of the cluster.")
    client_name: str = option("client.admin", "rbd: the Ceph client (cephx user) to connect as.")
    keyring: str = option("", "rbd: keyring file of client_name (empty: what ceph.conf says).")
    rbd_pool: str = option("rbd", "rbd: the RADOS pool holding the images.")
    namespace: str = option("", "rbd: optional RADOS namespace inside rbd_pool.")
    features: list[str] = option(
        ["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"],
        "rbd: image features of new volumes.",
        factory=True,
    )
    timeout: float = option(
        30.0,
        "rbd: seconds any librados/librbd call may block (connect, monitor and OSD ops); "
        "nfs: seconds any NFS call of the agent may block.",
    )
    device: str = option(
        "",
        "lun: the shared LUN: a /dev/disk/by-id name (wwn-0x..., seed 002's Source) or a device path; "
        "every host of the pool must see the same LUN.",
    )
    format_lun: bool = option(
        False,
        "lun: format the LUN as a new pool when it is blank (its first and last MiB zero); a LUN "
        "holding anything else is never touched.",
    )
    lease_timeout: float = option(
        60.0,
        "lun: seconds a lease lives without renewal: a host that stops renewing the metadata owner "
        "lease stops writing after lease_timeout - lease_io_timeout; a successor waits "
        "lease_timeout + lease_io_timeout.",
    )
    lease_io_timeout: float = option(
        5.0, "lun: seconds one lease read or write may take; lease_timeout must exceed three times it."
    )
    thin: bool = option(
        False,
        "lun: new heads start in a small slice that grows while VMs write (a write threshold per "
        "running VM's disk, watched on each VM's host; VMs' disks should use werror=enospc); "
        "false: every layer gets its full size up front.",
    )
    thin_step: int = option(1 << 30, "lun, thin: bytes a thin slice starts with (above its metadata) and grows by.")
    fence_command: list[str] = option(
        [],
        "lun: argv (no shell) the metadata owner runs to cut a host off the LUN when its host lease "
        "lapses unreleased (its agent died; its VMs may still write): it gets BLOCKFERRY_POOL, "
        "BLOCKFERRY_FENCE_HOST (the host uuid) and BLOCKFERRY_FENCE_ADDRESS in its environment and "
        "exits 0 once the host's I/O cannot reach the LUN. Until then head changes wait. Empty: no "
        "fencing (the lease timeout is the only guard).",
        factory=True,
    )
    target: str = option(
        "", "lun on iSCSI: the target IQN (with ip; the LUN is reached through libiscsi and qemu's iscsi driver)."
    )
    lun: int = option(0, "lun on iSCSI: the LUN number.")
    port: int = option(0, "lun on iSCSI: the portal's port (0: 3260).")
    username: str = option("", "lun on iSCSI: the CHAP user (empty: no CHAP).")
    secret: str = option(
        "",
        "lun on iSCSI: the CHAP secret; qemu gets it as a secret object read from a 0600 file under run_dir, "
        "never in argv.",
        secret=True,
    )


@dataclass
class BackupPointSection:
    """A backup point: [backup_points.<uuid>] with its type and where its repository lives."""

    type: str = option(
        "local",
        "local (a directory), nfs (NFSv3 via libnfs), samba (SMB3), iscsi (a LUN via "
        "libiscsi), disk or fc (a local block device), s3 (a bucket of an S3 object store).",
    )
    path: str = option("", "local: the directory holding the repository.")
    ip: str = option("", "nfs, samba, iscsi: the server address (seed 000 `ip`).")
    port: int = option(
        0, "nfs: NFS port (0 asks the portmapper); samba: SMB port (0 = 445); iscsi: portal port (0 = 3260)."
    )
    mount_port: int = option(0, "nfs: MOUNT port (0 asks the portmapper).")
    root_dir: str = option("", "nfs: the export path; samba: the share name (seed 000 `root_dir`).")
    sub_dir: str = option(
        "", "nfs, samba: the repository's directory below root_dir; s3: its prefix in the bucket (no '..')."
    )
    username: str = option("", "samba: the SMB user; iscsi: the CHAP user (empty: no CHAP); s3: the access key.")
    secret: str = option(
        "",
        "samba: the SMB password; iscsi: the CHAP secret; s3: the secret key. A file that sets it must be mode 0600.",
        secret=True,
    )
    endpoint: str = option("", "s3: the gateway's URL (http://host:port or https://...).")
    bucket: str = option("", "s3: the bucket (it must exist).")
    region: str = option("", "s3: the region the bucket is in (empty: us-east-1, what RGW and MinIO accept).")
    part_size: int = option(
        16 << 20, "s3: bytes per part of a multipart upload (at least 5 MiB); each writer holds at most one."
    )
    smb_encrypt: bool = option(False, "samba: require SMB3 encryption of the session (signing is always on).")
    target: str = option("", "iscsi: the target IQN.")
    lun: int = option(0, "iscsi: the LUN number.")
    device: str = option("", "disk, fc: the block device (FC LUNs: /dev/disk/by-id/wwn-...).")
    format_lun: bool = option(
        False,
        "iscsi, disk, fc: format a blank LUN (all zero where a superblock, "
        "partition table or file system would be) on first use; a LUN with other data is "
        "never touched.",
    )
    timeout: float = option(30.0, "nfs, samba, iscsi, s3: seconds any call may block before the job fails.")
    password: str = option(
        "",
        "Turns on encryption (AES-256-GCM, scrypt-derived key) when the repository is "
        "created; then required to open it (seed 000 `pass_word`). A file that sets it must be "
        "mode 0600.",
        secret=True,
    )
    chunk_size: int = option(
        4 << 20, "Bytes per chunk of a new repository (a multiple of 64 KiB; 4 MiB matches RBD objects)."
    )
    compression: str = option("zstd", "zstd or none, for a new repository.")
    bandwidth_limit: int = option(
        0,
        "Bytes per second shared by the jobs on this backup point (backups, restores, verify); 0 means "
        "unlimited. The host's [jobs] bandwidth_limit still applies; a reload (SIGHUP) changes it.",
    )
    lock_days: int = option(
        0,
        "Lock every new backup for at least this many days: no API deletes or prunes it before then, "
        "and gc keeps the data it needs (docs/immutable.md). 0: only the locks jobs ask for.",
    )
    lock_mode: str = option(
        "agent",
        "agent (the agent and the controller enforce locks), or, on s3 with a bucket made with object "
        "lock, governance or compliance: the gateway holds every object a locked backup needs too.",
    )
    initialize: bool = option(
        True,
        "Create a repository on first use when the directory is empty (a directory "
        "holding anything else is never touched).",
    )


POOL_TYPES = ("dir", "nfs", "rbd", "lun")
BACKUP_POINT_TYPES = ("local", "nfs", "samba", "iscsi", "disk", "fc", "s3")
TABLES = {"pools": "PoolSection", "backup_points": "BackupPointSection"}
RBD_FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten", "journaling")


@dataclass
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    systemd: SystemdSection = field(default_factory=SystemdSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    vms: VmsSection = field(default_factory=VmsSection)
    controller: ControllerLinkSection = field(default_factory=ControllerLinkSection)
    pools: dict[str, PoolSection] = field(default_factory=dict)  # pool uuid -> pool
    backup_points: dict[str, BackupPointSection] = field(default_factory=dict)  # uuid -> backup point
    sources: list[str] = field(default_factory=list)  # files merged, in order

    # --- validation of values (types are checked while loading) ---
    def validate(self) -> None:
        def bad(section: str, key: str, why: str) -> ConfigError:
            return ConfigError(f"[{section}] {key}: {why}", field=f"{section}.{key}")

        if self.metrics.listen:
            from agent.metrics import loopback

            loopback(self.metrics.listen, "metrics.listen")
        for uuid, pool in self.pools.items():
            if pool.type not in POOL_TYPES:
                raise bad(f"pools.{uuid}", "type", f"must be one of {', '.join(POOL_TYPES)}, not {pool.type!r}")
            if pool.fence_command and pool.type != "lun":
                raise bad(f"pools.{uuid}", "fence_command", "only shared LUN pools (type lun) fence hosts")
            if pool.type == "dir" and not os.path.isabs(pool.path):
                raise bad(f"pools.{uuid}", "path", "must be an absolute path")
            if pool.type == "lun":
                if not pool.device and not (pool.ip and pool.target):
                    raise bad(
                        f"pools.{uuid}",
                        "device",
                        "a lun pool needs the LUN: a /dev/disk/by-id name or a path, or ip and target (iSCSI)",
                    )
                if pool.lease_timeout <= 3 * pool.lease_io_timeout or pool.lease_io_timeout <= 0:
                    raise bad(
                        f"pools.{uuid}",
                        "lease_timeout",
                        f"{pool.lease_timeout}s must exceed 3 x lease_io_timeout ({pool.lease_io_timeout}s)",
                    )
                if pool.fence_command and not os.path.isabs(pool.fence_command[0]):
                    raise bad(
                        f"pools.{uuid}",
                        "fence_command",
                        f"the command must be an absolute path (no shell runs it), not {pool.fence_command[0]!r}",
                    )
            if pool.type == "nfs":
                from agent.fields import check_nfs_export, check_nfs_server

                for key, check in (("ip", check_nfs_server), ("export", check_nfs_export)):
                    try:
                        check(getattr(pool, key), key)
                    except InvalidArgument as e:
                        raise bad(f"pools.{uuid}", key, e.message.split(": ", 1)[1]) from None
                if pool.timeout <= 0:
                    raise bad(f"pools.{uuid}", "timeout", "must be positive")
            if pool.type == "rbd":
                if not pool.rbd_pool:
                    raise bad(f"pools.{uuid}", "rbd_pool", "must not be empty")
                if not os.path.isabs(pool.ceph_conf):
                    raise bad(f"pools.{uuid}", "ceph_conf", "must be an absolute path")
                unknown = [f for f in pool.features if f not in RBD_FEATURES]
                if unknown:
                    raise bad(f"pools.{uuid}", "features", f"unknown RBD features {unknown}")
                if pool.timeout <= 0:
                    raise bad(f"pools.{uuid}", "timeout", "must be positive")
        for uuid, bp in self.backup_points.items():
            label = f"backup_points.{uuid}"
            if bp.type not in BACKUP_POINT_TYPES:
                raise bad(label, "type", f"must be one of {', '.join(BACKUP_POINT_TYPES)}, not {bp.type!r}")
            if bp.type == "local" and not os.path.isabs(bp.path):
                raise bad(label, "path", "must be an absolute path")
            if bp.type in ("nfs", "samba", "iscsi") and not bp.ip:
                raise bad(label, "ip", f"must be set for a {bp.type} backup point")
            if bp.type == "nfs" and not bp.root_dir.startswith("/"):
                raise bad(label, "root_dir", "must be the absolute export path")
            if bp.type == "samba" and not bp.root_dir.strip("/"):
                raise bad(label, "root_dir", "must name the share")
            if bp.type == "samba" and not (bp.username and bp.secret):
                raise bad(label, "username", "samba needs username and secret (the SMB password)")
            if bp.type == "iscsi" and not bp.target:
                raise bad(label, "target", "must be the target IQN")
            if bp.type == "s3":
                from agent.fields import check_s3

                check_s3(bp, label)
            if bp.type in ("disk", "fc") and not os.path.isabs(bp.device):
                raise bad(label, "device", "must be an absolute block device path")
            if bp.sub_dir and (bp.sub_dir.startswith("/") or ".." in bp.sub_dir.split("/")):
                raise bad(label, "sub_dir", "must be a relative path without '..'")
            if not 0 <= bp.port <= 65535 or not 0 <= bp.mount_port <= 65535:
                raise bad(label, "port", "must be between 0 and 65535")
            if bp.timeout <= 0:
                raise bad(label, "timeout", "must be positive")
            if bp.bandwidth_limit < 0:
                raise bad(label, "bandwidth_limit", "must not be negative")
            if not 0 <= bp.lock_days <= 36500:
                raise bad(label, "lock_days", "must be between 0 and 36500")
            if bp.lock_mode not in ("agent", "governance", "compliance"):
                raise bad(label, "lock_mode", f"must be agent, governance or compliance, not {bp.lock_mode!r}")
            if bp.lock_mode != "agent" and bp.type != "s3":
                raise bad(
                    label, "lock_mode", f"{bp.lock_mode} is S3 object lock: a {bp.type} backup point has agent only"
                )
            if bp.chunk_size < 64 << 10 or bp.chunk_size > 64 << 20 or bp.chunk_size % (64 << 10):
                raise bad(label, "chunk_size", "must be a multiple of 64 KiB between 64 KiB and 64 MiB")
            if bp.compression not in ("zstd", "none"):
                raise bad(label, "compression", f"must be zstd or none, not {bp.compression!r}")
        if not os.path.isabs(self.agent.run_dir):
            raise bad("agent", "run_dir", "must be an absolute path")
        if self.agent.log_level not in ("debug", "info", "warning", "error"):
            raise bad("agent", "log_level", f"must be debug, info, warning or error, not {self.agent.log_level!r}")
        if self.agent.fence_command and not os.path.isabs(self.agent.fence_command[0]):
            raise bad("agent", "fence_command", "the command must be an absolute path (no shell runs it)")
        if self.agent.iscsi_initiator and not self.agent.iscsi_initiator.startswith(("iqn.", "eui.", "naa.")):
            raise bad("agent", "iscsi_initiator", "must be an iSCSI name (iqn.YYYY-MM.domain:name, eui. or naa.)")
        if self.agent.log_format not in ("auto", "journal", "text", "json"):
            raise bad("agent", "log_format", f"must be auto, journal, text or json, not {self.agent.log_format!r}")
        if not os.path.isabs(self.agent.state_dir):
            raise bad("agent", "state_dir", "must be an absolute path")
        for root in self.agent.roots:
            if not os.path.isabs(root):
                raise bad("agent", "roots", f"{root!r} is not an absolute path")
        if not self.grpc.unix_socket and not self.grpc.tcp_listen:
            raise bad("grpc", "unix_socket", "set unix_socket or tcp_listen (or both)")
        if self.grpc.unix_socket and not os.path.isabs(self.grpc.unix_socket):
            raise bad("grpc", "unix_socket", "must be an absolute path")
        if self.grpc.tcp_listen:
            host, sep, port = self.grpc.tcp_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise bad("grpc", "tcp_listen", f"must be host:port, not {self.grpc.tcp_listen!r}")
            if not self.grpc.tls_cert or not self.grpc.tls_key:
                raise bad("grpc", "tls_cert", "tcp_listen needs tls_cert and tls_key (plain TCP is not served)")
        if self.grpc.max_workers < 4:
            raise bad("grpc", "max_workers", "must be at least 4")
        c = self.controller
        if c.address and not c.address.startswith("unix:"):
            host, sep, port = c.address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise bad("controller", "address", f"must be host:port or unix:/path, not {c.address!r}")
        if c.heartbeat_interval <= 0:
            raise bad("controller", "heartbeat_interval", "must be positive")
        if c.fence_after < 0 or (c.fence_after and c.fence_after <= c.heartbeat_interval):
            raise bad("controller", "fence_after", "must be 0 (never) or longer than heartbeat_interval")
        import uuid as _uuid

        for key in ("host_uuid", "cluster_uuid", "zone_uuid"):
            value = getattr(c, key)
            if value:
                try:
                    _uuid.UUID(value)
                except ValueError:
                    raise bad("controller", key, f"{value!r} is not a uuid") from None
        if len(c.zone_name) > 64 or any(ch < " " for ch in c.zone_name):
            raise bad("controller", "zone_name", "at most 64 printable characters")
        if self.jobs.max_concurrent < 1:
            raise bad("jobs", "max_concurrent", "must be at least 1")
        if self.jobs.bandwidth_limit < 0:
            raise bad("jobs", "bandwidth_limit", "must not be negative")
        if self.jobs.on_busy not in ("wait", "refuse"):
            raise bad("jobs", "on_busy", f"must be wait or refuse, not {self.jobs.on_busy!r}")
        if self.jobs.drain_timeout < 0:
            raise bad("jobs", "drain_timeout", "must not be negative")
        if self.jobs.keep_finished < 0:
            raise bad("jobs", "keep_finished", "must not be negative")

    def sections(self) -> dict[str, Any]:
        """The fixed sections (pools are a table of sections, handled apart)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("sources", *TABLES)}


def _type_ok(value: Any, annotation: str) -> bool:
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(annotation)


def _merge_section(path: Path, label: str, section: Any, values: dict) -> None:
    known = {f.name: f for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{path}: [{label}] {key}: unknown option", field=f"{label}.{key}")
        annotation = known[key].type
        if not _type_ok(value, annotation):
            raise ConfigError(f"{path}: [{label}] {key}: expected {annotation}, got {value!r}", field=f"{label}.{key}")
        if annotation == "float":
            value = float(value)
        setattr(section, key, value)


def _merge_file(cfg: Config, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", field=str(path)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", field=str(path)) from None
    sections = cfg.sections()
    for name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {name} must be a [section]", field=name)
        if name in TABLES:
            section_type = globals()[TABLES[name]]
            for item_uuid, item_values in values.items():
                label = f"{name}.{item_uuid}"
                if not isinstance(item_values, dict):
                    raise ConfigError(f"{path}: {label} must be a [section]", field=label)
                _check_uuid_key(path, name, item_uuid)
                if any(f.metadata["secret"] and item_values.get(f.name) for f in dataclasses.fields(section_type)):
                    _check_private(path, label)
                _merge_section(path, label, getattr(cfg, name).setdefault(item_uuid, section_type()), item_values)
            continue
        if name not in sections:
            raise ConfigError(
                f"{path}: unknown section [{name}] (known: {', '.join([*sections, *TABLES])})", field=name
            )
        _merge_section(path, name, sections[name], values)
    cfg.sources.append(str(path))


def _check_uuid_key(path: Path, table: str, value: str) -> None:
    import uuid

    try:
        ok = str(uuid.UUID(value)) == value
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{path}: [{table}.{value}]: the section name must be a canonical UUID", field=table)


def _check_private(path: Path, label: str) -> None:
    """A file that holds a secret must not be readable by group or others."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ConfigError(
            f"{path}: [{label}] holds a secret, so the file must be mode 0600 (it is {mode & 0o777:04o})", field=label
        )


def default_conf_dir(config_path: str) -> str:
    """conf.d beside the main file: /etc/blockferry/agent.toml -> /etc/blockferry/agent.conf.d"""
    p = Path(config_path)
    return str(p.with_name(p.stem + ".conf.d"))


def load(config_path: str | None = None, conf_dir: str | None = None, *, missing_ok: bool = True) -> Config:
    """Defaults, then the main file, then conf.d/*.toml in name order."""
    cfg = Config()
    path = Path(config_path or DEFAULT_CONFIG)
    if path.exists():
        _merge_file(cfg, path)
    elif not missing_ok:
        raise ConfigError(f"{path}: no such config file", field=str(path))
    d = Path(conf_dir if conf_dir is not None else default_conf_dir(str(path)))
    if d.is_dir():
        for f in sorted(d.glob("*.toml")):
            _merge_file(cfg, f)
    try:
        cfg.validate()
    except ConfigError as e:
        where = ", ".join(cfg.sources) or "defaults"
        raise ConfigError(f"{where}: {e.message}", field=e.field) from None
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def render(cfg: Config, *, commented: bool, mask_secrets: bool) -> str:
    """The config as TOML. commented=True gives the shipped default file:
    every option commented out, with its help text."""
    lines: list[str] = []
    if commented:
        lines += [
            "# blockferry-agent configuration.",
            "# Every option is shown with its default, commented out. Files in",
            "# agent.conf.d/*.toml beside this one are merged over it in name order.",
            "",
        ]
    for name, section in cfg.sections().items():
        doc = (type(section).__doc__ or "").strip()
        if commented and doc:
            lines.append(f"# {doc}")
        lines += _render_section(f"[{name}]", section, commented, mask_secrets)
    if commented:
        lines.append(f"# {(PoolSection.__doc__ or '').strip()} For example:")
        example = PoolSection(path="/var/lib/blockferry/pools/local")
        lines += _render_section("[pools.0eca2be3-056f-4634-a25b-5cf717e067fb]", example, True, mask_secrets)
    for pool_uuid, pool in cfg.pools.items():
        lines += _render_section(f"[pools.{pool_uuid}]", pool, commented, mask_secrets)
    if commented:
        lines.append(f"# {(BackupPointSection.__doc__ or '').strip()} For example:")
        example_bp = BackupPointSection(path="/var/lib/blockferry/backups")
        lines += _render_section("[backup_points.5b0c3f55-54d5-4b8e-9c2f-0a4f3c1e9d11]", example_bp, True, mask_secrets)
    for bp_uuid, bp in cfg.backup_points.items():
        lines += _render_section(f"[backup_points.{bp_uuid}]", bp, commented, mask_secrets)
    return "\n".join(lines)


def _render_section(header: str, section: Any, commented: bool, mask_secrets: bool) -> list[str]:
    lines = [f"#{header}" if commented and header.startswith(("[pools.", "[backup_points.")) else header]
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if mask_secrets and f.metadata["secret"] and value:
            value = MASK
        if commented:
            lines.append(f"# {f.metadata['help']}")
            lines.append(f"#{f.name} = {_toml_value(value)}")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    return lines


def secrets(cfg: Config) -> list[str]:
    """Secret values currently set (to keep them out of logs)."""
    out = []
    for section in [*cfg.sections().values(), *cfg.pools.values(), *cfg.backup_points.values()]:
        for f in dataclasses.fields(section):
            if f.metadata["secret"] and getattr(section, f.name):
                out.append(getattr(section, f.name))
    return out


# what a reload (SIGHUP) applies to the running agent
RELOADABLE = {"agent.log_level", "agent.log_format", "jobs.bandwidth_limit"}


def same_place(a: BackupPointSection, b: BackupPointSection) -> bool:
    """Whether two definitions of a backup point reach the same repository
    the same way: they differ at most in what changes at run time (the
    bandwidth limit, how new backups are locked), which neither a reload
    nor a seed 000 update treats as a new backup point."""

    def place(s: BackupPointSection) -> BackupPointSection:
        return dataclasses.replace(s, bandwidth_limit=0, lock_days=0, lock_mode="agent")

    return place(a) == place(b)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys whose change a reload does not apply (they need a restart):
    everything but RELOADABLE and each backup point's bandwidth_limit,
    lock_days and lock_mode."""
    changed = []
    for name, section in old.sections().items():
        other = new.sections()[name]
        for f in dataclasses.fields(section):
            key = f"{name}.{f.name}"
            if key not in RELOADABLE and getattr(section, f.name) != getattr(other, f.name):
                changed.append(key)
    for table in ("pools", "backup_points"):
        before, after = getattr(old, table), getattr(new, table)
        for uuid in sorted(set(before) ^ set(after)):
            changed.append(f"{table}.{uuid}")
        for uuid in sorted(set(before) & set(after)):
            a, b = before[uuid], after[uuid]
            if not (same_place(a, b) if table == "backup_points" else a == b):
                changed.append(f"{table}.{uuid}")
    return changed


HOST_NAMESPACE = uuidlib.UUID("6f1d0c52-3b7e-4f0a-9d2b-7c4e8a1f5b90")


def host_uuid(cfg: Config) -> str:
    """This host's uuid: [controller] host_uuid, else derived from /etc/machine-id
    (else the host name), the same on every start."""
    if cfg.controller.host_uuid:
        return cfg.controller.host_uuid
    try:
        with open("/etc/machine-id") as f:
            return str(uuidlib.uuid5(HOST_NAMESPACE, f.read().strip()))
    except OSError:
        import socket

        return str(uuidlib.uuid5(HOST_NAMESPACE, socket.gethostname()))
