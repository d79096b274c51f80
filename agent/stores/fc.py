"""FC HBAs and the block devices this host can use as FC or disk backup
points (seed 002 `fc_device/list`), read from sysfs and /dev/disk/by-id.

The roots are parameters so tests can point them at a tree shaped like a
real FC host's; the defaults are the real /sys and /dev. A device counts as
FC when its SCSI host is an FC HBA (/sys/class/fc_host/hostN). Multipath
devices (dm-* with a dm/uuid of mpath-...) are listed once, under their
/dev/mapper name, with their paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FcHba:
    host: str  # host5
    port_name: str  # WWPN, 0x...
    node_name: str  # WWNN
    port_state: str  # Online, Linkdown...
    speed: str


@dataclass
class BlockDeviceInfo:
    id: str  # the preferred /dev/disk/by-id name (wwn-* first)
    disk_path: str  # /dev/sdc or /dev/mapper/mpatha
    wwid: str  # from device/wwid (naa.6005...)
    size_bytes: int
    vendor: str
    model: str
    transport: str  # fc, multipath or scsi
    hba: str = ""  # the FC host it is reached through
    by_id: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # multipath: the member devices
    in_use: bool = False  # has partitions, holders or a mount


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def list_hbas(sys_root: str = "/sys") -> list[FcHba]:
    base = os.path.join(sys_root, "class", "fc_host")
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    return [
        FcHba(
            n,
            _read(f"{base}/{n}/port_name"),
            _read(f"{base}/{n}/node_name"),
            _read(f"{base}/{n}/port_state"),
            _read(f"{base}/{n}/speed"),
        )
        for n in names
    ]


def _by_id(dev_root: str) -> dict[str, list[str]]:
    """device name (sdc, dm-0) -> its /dev/disk/by-id names."""
    base = os.path.join(dev_root, "disk", "by-id")
    out: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return out
    for n in names:
        target = os.readlink(os.path.join(base, n)) if os.path.islink(os.path.join(base, n)) else ""
        if target:
            out.setdefault(os.path.basename(target), []).append(n)
    return out


def _preferred(ids: list[str]) -> str:
    for prefix in ("wwn-", "dm-uuid-mpath-", "scsi-3", "scsi-", "dm-name-"):
        for n in ids:
            if n.startswith(prefix) and not re.search(r"-part\d+$", n):
                return n
    return next((n for n in ids if not re.search(r"-part\d+$", n)), "")


def _mounted(dev_root: str, names: set[str]) -> bool:
    mounts = _read("/proc/self/mounts") if dev_root == "/dev" else ""
    return any(f"{dev_root}/{n} " in mounts for n in names)


def list_devices(sys_root: str = "/sys", dev_root: str = "/dev") -> list[BlockDeviceInfo]:
    hbas = {h.host for h in list_hbas(sys_root)}
    ids = _by_id(dev_root)
    block = os.path.join(sys_root, "block")
    try:
        names = sorted(os.listdir(block))
    except FileNotFoundError:
        return []
    out: list[BlockDeviceInfo] = []
    in_multipath: set[str] = set()
    for name in names:  # multipath maps first: their members are not listed on their own
        uuid = _read(f"{block}/{name}/dm/uuid")
        if name.startswith("dm-") and uuid.startswith("mpath-"):
            slaves = sorted(os.listdir(f"{block}/{name}/slaves")) if os.path.isdir(f"{block}/{name}/slaves") else []
            in_multipath.update(slaves)
            first = slaves[0] if slaves else ""
            dm_name = _read(f"{block}/{name}/dm/name", name)
            out.append(
                BlockDeviceInfo(
                    id=_preferred(ids.get(name, [])) or f"dm-uuid-{uuid}",
                    disk_path=f"{dev_root}/mapper/{dm_name}",
                    wwid=_read(f"{block}/{first}/device/wwid") if first else uuid[len("mpath-") :],
                    size_bytes=int(_read(f"{block}/{name}/size", "0")) * 512,
                    vendor=_read(f"{block}/{first}/device/vendor"),
                    model=_read(f"{block}/{first}/device/model"),
                    transport="multipath",
                    hba=",".join(sorted({_scsi_host(f"{block}/{s}") for s in slaves} - {""})),
                    by_id=ids.get(name, []),
                    paths=[f"{dev_root}/{s}" for s in slaves],
                    in_use=bool(os.listdir(f"{block}/{name}/holders"))
                    if os.path.isdir(f"{block}/{name}/holders")
                    else False,
                )
            )
    for name in names:
        if name in in_multipath or not os.path.isdir(f"{block}/{name}/device"):
            continue
        wwid = _read(f"{block}/{name}/device/wwid")
        if not wwid and not ids.get(name):
            continue  # not a SCSI disk with an identity (loop, ram, ...)
        host = _scsi_host(f"{block}/{name}")
        parts = [p for p in os.listdir(f"{block}/{name}") if p.startswith(name)]
        holders = os.listdir(f"{block}/{name}/holders") if os.path.isdir(f"{block}/{name}/holders") else []
        out.append(
            BlockDeviceInfo(
                id=_preferred(ids.get(name, [])) or name,
                disk_path=f"{dev_root}/{name}",
                wwid=wwid,
                size_bytes=int(_read(f"{block}/{name}/size", "0")) * 512,
                vendor=_read(f"{block}/{name}/device/vendor"),
                model=_read(f"{block}/{name}/device/model"),
                transport="fc" if host in hbas else "scsi",
                hba=host if host in hbas else "",
                by_id=ids.get(name, []),
                in_use=bool(parts or holders) or _mounted(dev_root, {name, *parts}),
            )
        )
    return out


def _scsi_host(block_dir: str) -> str:
    """hostN from the device's sysfs path (.../hostN/rport-.../target.../H:C:T:L)."""
    try:
        real = os.path.realpath(os.path.join(block_dir, "device"))
    except OSError:
        return ""
    m = re.search(r"/(host\d+)/", real + "/")
    return m.group(1) if m else ""
