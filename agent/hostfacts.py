"""What this host is and can do, for the controller: NICs and addresses
(pyroute2), CPU, memory and disk capacity (psutil), and the pool and backup
point types this agent supports."""

from __future__ import annotations

import glob
import os
import socket
from dataclasses import dataclass, field

import psutil

from agent import __version__
from agent.config import BACKUP_POINT_TYPES, POOL_TYPES, Config
from agent.stores.fc import FcHba, list_hbas

# seed 002 pool_type/support: the shared pool types this host can hold
# volumes on (nfs: an NFSv3 export in user space; disk: a directory, a local
# disk or any mounted file system, or a shared LUN by WWN; fc: a shared FC LUN,
# listed when the host has FC HBAs; iscsi: a shared iSCSI LUN, where qemu's
# iscsi driver is installed; rbd: a Ceph pool). samba is a backup point type
# only (qemu has no SMB driver).
SHARED_POOL_TYPES = ("iscsi", "nfs", "disk", "fc", "rbd")
KIND_OF_SHARED = {"iscsi": "lun", "nfs": "nfs", "disk": "dir", "fc": "lun", "rbd": "rbd"}


@dataclass
class Nic:
    name: str
    mac: str
    mtu: int
    up: bool
    addresses: list[tuple[str, str, int]] = field(default_factory=list)  # (family, address, prefixlen)


@dataclass
class HostFacts:
    hostname: str
    version: str
    cpus: int
    load1: float
    memory_total: int
    memory_available: int
    boot_time: float
    nics: list[Nic]
    disks: list[tuple[str, int, int, int]]  # (path, total, used, available)
    pool_types: list[str]
    backup_point_types: list[str]
    shared_pool_types: list[str]
    pool_uuids: list[str]
    backup_point_uuids: list[str]
    iscsi_initiator: str
    fc_hbas: list[FcHba]
    roots: list[str] = field(default_factory=list)


def nics() -> list[Nic]:
    from pyroute2 import IPRoute

    out: dict[int, Nic] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            out[link["index"]] = Nic(
                link.get_attr("IFLA_IFNAME") or "",
                link.get_attr("IFLA_ADDRESS") or "",
                link.get_attr("IFLA_MTU") or 0,
                bool(link["flags"] & 1),
            )
        for addr in ipr.get_addr():
            nic = out.get(addr["index"])
            if nic is not None:
                family = "inet" if addr["family"] == socket.AF_INET else "inet6"
                nic.addresses.append((family, addr.get_attr("IFA_ADDRESS") or "", addr["prefixlen"]))
    return sorted(out.values(), key=lambda n: n.name)


def qemu_nfs_driver() -> bool:
    """qemu's nfs block driver (Debian: qemu-block-extra), which NFS pools
    open their images with."""
    return bool(glob.glob("/usr/lib/*/qemu/block-nfs.so") or glob.glob("/usr/lib/qemu/block-nfs.so"))


def qemu_iscsi_driver() -> bool:
    """qemu's iscsi block driver (Debian: qemu-block-extra), which iSCSI pools
    open their layers with."""
    return bool(glob.glob("/usr/lib/*/qemu/block-iscsi.so") or glob.glob("/usr/lib/qemu/block-iscsi.so"))


def _supported_pool_types(bindings_ok: set[str]) -> list[str]:
    def ok(t: str) -> bool:
        if t == "rbd":
            return {"rados", "rbd"} <= bindings_ok
        if t == "nfs":
            return qemu_nfs_driver()
        return True

    return [t for t in POOL_TYPES if ok(t)]


def host_facts(cfg: Config, bindings_ok: set[str], *, sys_root: str = "/sys") -> HostFacts:
    from agent.stores.iscsi import initiator_name

    paths = [
        cfg.agent.state_dir,
        *(p.path for p in cfg.pools.values() if p.type == "dir"),
        *(b.path for b in cfg.backup_points.values() if b.type == "local"),
    ]
    disks, seen = [], set()
    for path in paths:
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        key = (st.f_fsid, path)
        if key in seen:
            continue
        seen.add(key)
        total = st.f_blocks * st.f_frsize
        disks.append((path, total, total - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize))
    mem = psutil.virtual_memory()
    pool_types = _supported_pool_types(bindings_ok)
    hbas = list_hbas(sys_root)
    return HostFacts(
        hostname=socket.gethostname(),
        version=__version__,
        cpus=psutil.cpu_count() or 1,
        load1=os.getloadavg()[0],
        memory_total=mem.total,
        memory_available=mem.available,
        boot_time=psutil.boot_time(),
        nics=nics(),
        disks=disks,
        pool_types=pool_types,
        backup_point_types=list(BACKUP_POINT_TYPES),
        shared_pool_types=[
            t
            for t in SHARED_POOL_TYPES
            if KIND_OF_SHARED[t] in pool_types and (t != "fc" or hbas) and (t != "iscsi" or qemu_iscsi_driver())
        ],
        pool_uuids=sorted(cfg.pools),
        backup_point_uuids=sorted(cfg.backup_points),
        iscsi_initiator=initiator_name(),
        fc_hbas=hbas,
        roots=list(cfg.agent.roots),
    )
