"""The pools this agent serves: [pools.<uuid>] in its config, and pools the
controller attached at run time (kept in <state_dir>/pools.d/<uuid>.json,
0600, and loaded again at start)."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import TYPE_CHECKING

from agent.attached import AttachedDefinitions
from agent.config import Config, PoolSection, host_uuid
from agent.errors import AlreadyExists, FailedPrecondition, HasDependents, InvalidArgument, NotFound, TargetUnreachable
from agent.hypervisor.hosts import HostHypervisors
from agent.paths import resolve_under_roots
from agent.volumes.base import VolumeDriver, check_uuid
from agent.volumes.qcow2 import Qcow2Pool

if TYPE_CHECKING:
    from agent.volumes.lun.peers import Peers


class PoolRegistry:
    def __init__(self, cfg: Config, *, peers: Peers | None = None):
        """peers: how a shared LUN pool reaches the other hosts that share it."""
        self.cfg = cfg
        self.peers = peers
        roots = list(cfg.agent.roots) + [p.path for p in cfg.pools.values() if p.path]
        self.allowed_roots = roots
        self._lock = threading.Lock()
        self._pools: dict[str, VolumeDriver] = {}
        self._sections: dict[str, PoolSection] = {}
        self._attached: set[str] = set()
        self.hypervisor = HostHypervisors(
            tuple(cfg.vms.qmp_sockets), qmp_timeout=cfg.vms.qmp_timeout, libvirt_uri=cfg.vms.libvirt_uri
        )
        self.attached = AttachedDefinitions(os.path.join(cfg.agent.state_dir, "pools.d"), PoolSection)
        for pool_uuid, pc in cfg.pools.items():
            self._add(pool_uuid, pc)
        for pool_uuid, pc in self.attached.load().items():
            if pool_uuid not in self._pools:
                self._add(pool_uuid, pc)
                self._attached.add(pool_uuid)

    def _make(self, pool_uuid: str, pc: PoolSection) -> VolumeDriver:
        if pc.type == "dir":
            return Qcow2Pool(
                pool_uuid,
                pc.path,
                run_dir=self.cfg.agent.run_dir,
                allowed_roots=self.allowed_roots,
                lookup=self.get,
                hypervisor=self.hypervisor,
            )
        if pc.type == "nfs":
            from agent.volumes.qcow2.poolfs import NfsFiles  # the libnfs binding loads only when used

            fs = NfsFiles(pc.ip, pc.export, label=f"{pool_uuid} (nfs://{pc.ip}{pc.export})", timeout=pc.timeout)
            return Qcow2Pool(
                pool_uuid,
                fs.url(""),
                run_dir=self.cfg.agent.run_dir,
                allowed_roots=self.allowed_roots,
                lookup=self.get,
                fs=fs,
            )
        if pc.type == "rbd":
            from agent.volumes.rbd import RbdPool  # the rados/rbd bindings load only when used

            return RbdPool(
                pool_uuid,
                ceph_conf=pc.ceph_conf,
                client_name=pc.client_name,
                keyring=pc.keyring,
                rbd_pool=pc.rbd_pool,
                namespace=pc.namespace,
                features=pc.features,
                timeout=pc.timeout,
                hypervisor=self.hypervisor,
            )
        if pc.type == "lun":
            from agent.volumes.lun.driver import LunPool

            dev, protocol = self._lun_device(pool_uuid, pc)
            try:
                return LunPool.open(
                    pool_uuid,
                    dev,
                    protocol,
                    host_uuid=host_uuid(self.cfg),
                    run_dir=self.cfg.agent.run_dir,
                    format_lun=pc.format_lun,
                    lease_timeout=pc.lease_timeout,
                    lease_io_timeout=pc.lease_io_timeout,
                    thin=pc.thin,
                    thin_step=pc.thin_step,
                    address=self.cfg.controller.advertise or self.cfg.grpc.tcp_listen,
                    peers=self.peers,
                    fence_command=pc.fence_command or self.cfg.agent.fence_command,
                )
            except BaseException:
                if "password-secret" in protocol:
                    from agent.volumes.qemu_objects import remove

                    remove(protocol["password-secret"])
                raise
        raise InvalidArgument(f"type: pool type must be dir, nfs, rbd or lun, not {pc.type!r}", field="type")

    def _lun_device(self, pool_uuid: str, pc: PoolSection):
        """A shared LUN opened for the pool's own I/O (its table and leases),
        and the qemu protocol node that reaches it on this host."""
        if pc.ip:  # an iSCSI LUN: libiscsi here, qemu's iscsi driver for the layers
            from agent.stores.iscsi import IscsiBlockDevice, initiator_name, portal

            if bool(pc.username) != bool(pc.secret):
                raise InvalidArgument("username: CHAP needs both username and secret", field="username")
            dev = IscsiBlockDevice(
                pc.ip, pc.target, pc.lun, port=pc.port, user=pc.username, secret=pc.secret, timeout=pc.timeout
            )
            node = {
                "driver": "iscsi",
                "transport": "tcp",
                "portal": portal(pc.ip, pc.port),
                "target": pc.target,
                "lun": pc.lun,
                "initiator-name": initiator_name(),
            }
            if pc.username:  # qemu reads the CHAP secret from a 0600 file, by object id
                from agent.volumes.qemu_objects import add_secret

                ident = add_secret(
                    f"bfchap-{pool_uuid[:8]}", pc.secret, os.path.join(self.cfg.agent.run_dir, "secrets")
                )
                node.update({"user": pc.username, "password-secret": ident})
            return dev, node
        from agent.stores.blockdev import LocalBlockDevice

        path = self.lun_path(pc.device)
        return LocalBlockDevice(path, label=path, exclusive=False), {"driver": "host_device", "filename": path}

    def lun_path(self, device: str) -> str:
        """A shared LUN's device: a /dev/disk/by-id name (wwn-0x..., the
        same on every host) under the configured dev root, or a path."""
        if not device:
            raise InvalidArgument("device: a lun pool needs the LUN (a /dev/disk/by-id name or a path)", field="device")
        if "/" not in device:
            if device in (".", "..") or not all(c.isalnum() or c in "-_.:" for c in device):
                raise InvalidArgument(f"device: {device!r} is not a /dev/disk/by-id name", field="device")
            device = os.path.join(self.cfg.agent.dev_root, "disk", "by-id", device)
        if not os.path.isabs(device):
            raise InvalidArgument(f"device: {device!r} must be a by-id name or an absolute path", field="device")
        return device

    def _add(self, pool_uuid: str, pc: PoolSection) -> VolumeDriver:
        driver = self._make(pool_uuid, pc)
        self._pools[pool_uuid] = driver
        self._sections[pool_uuid] = pc
        return driver

    def get(self, pool_uuid: str, field: str = "pool_uuid") -> VolumeDriver:
        check_uuid(pool_uuid, field)
        pool = self._pools.get(pool_uuid)
        if pool is None:
            raise NotFound(f"{field}: pool {pool_uuid} is not configured on this agent", field=field)
        return pool

    def all(self) -> list[VolumeDriver]:
        return list(self._pools.values())

    def local_heads(self) -> dict[tuple[str, str], str]:
        """(pool, volume) -> head file, for the pools whose files are local
        (a running VM on this host opens them by path)."""
        out = {}
        for pool in self.all():
            if isinstance(pool, Qcow2Pool) and pool.fs.local:
                for vol in pool.volume_uuids():
                    out[(pool.pool_uuid, vol)] = pool.head_path(vol)
        return out

    # --- pools attached at run time ---
    def attach(self, pool_uuid: str, pc: PoolSection) -> VolumeDriver:
        check_uuid(pool_uuid, "pool_uuid")
        if pc.type == "dir":
            if not os.path.isabs(pc.path):
                raise InvalidArgument("path: must be an absolute path", field="path")
            pc = dataclasses.replace(pc, path=resolve_under_roots(pc.path, self.cfg.agent.roots, "path"))
        elif pc.type == "rbd":
            if not os.path.isabs(pc.ceph_conf) or not os.path.isfile(pc.ceph_conf):
                raise InvalidArgument(f"ceph_conf: {pc.ceph_conf!r} is not a file on this host", field="ceph_conf")
            if not pc.rbd_pool:
                raise InvalidArgument("rbd_pool: must not be empty", field="rbd_pool")
        elif pc.type == "nfs":
            from agent.fields import check_nfs_export, check_nfs_server

            check_nfs_server(pc.ip)
            pc = dataclasses.replace(pc, export=check_nfs_export(pc.export))
        elif pc.type == "lun":
            if pc.lease_io_timeout <= 0 or pc.lease_timeout <= 3 * pc.lease_io_timeout:
                raise InvalidArgument(
                    f"lease_timeout: {pc.lease_timeout}s must exceed 3 x lease_io_timeout ({pc.lease_io_timeout}s)",
                    field="lease_timeout",
                )
            if pc.ip:
                if not pc.target:
                    raise InvalidArgument("target: an iSCSI pool needs the target IQN", field="target")
            else:
                path = self.lun_path(pc.device)
                if not os.path.exists(path):
                    raise NotFound(
                        f"device: {path} does not exist on this host (the LUN is not visible here)", field="device"
                    )
        else:
            raise InvalidArgument(f"type: pool type must be dir, nfs, rbd or lun, not {pc.type!r}", field="type")
        with self._lock:
            if pool_uuid in self._pools:
                if self._sections[pool_uuid] == pc:
                    return self._pools[pool_uuid]  # the same pool again: nothing to do
                raise AlreadyExists(
                    f"pool_uuid: pool {pool_uuid} is served here with another definition", field="pool_uuid"
                )
            if pc.type == "dir":
                os.makedirs(pc.path, mode=0o750, exist_ok=True)
            driver = self._make(pool_uuid, pc)
            status = driver.pool_status()
            if status.status == "unreachable":
                _close(driver)
                raise TargetUnreachable(
                    f"pool_uuid: pool {pool_uuid} does not answer: {status.error}", field="pool_uuid"
                )
            self.attached.save(pool_uuid, pc)
            self._pools[pool_uuid] = driver
            self._sections[pool_uuid] = pc
            self._attached.add(pool_uuid)
            return driver

    def detach(self, pool_uuid: str, *, force: bool = False) -> None:
        driver = self.get(pool_uuid)
        with self._lock:
            if pool_uuid not in self._attached:
                raise FailedPrecondition(
                    f"pool_uuid: pool {pool_uuid} comes from the agent's config file; remove it there",
                    field="pool_uuid",
                )
            if not force and driver.list_volumes():
                raise HasDependents(f"pool_uuid: pool {pool_uuid} still holds volumes", field="pool_uuid")
            self.attached.remove(pool_uuid)
            del self._pools[pool_uuid]
            del self._sections[pool_uuid]
            self._attached.discard(pool_uuid)
        _close(driver)

    def close(self) -> None:
        """At the agent's stop: pools that hold leases on shared storage let them go."""
        for driver in self.all():
            _close(driver)


def _close(driver: VolumeDriver) -> None:
    close = getattr(driver, "close", None)
    if close is not None:
        close()
