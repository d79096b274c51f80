"""A sysfs and /dev tree shaped like a real FC host's, for discovery tests
(this machine has no FC HBA). Layout follows a two-port QLogic HBA with a
NetApp LUN seen through both ports (a dm-multipath map), a second LUN on one
path, and a local virtual disk with a partition:

    /sys/class/fc_host/host5 -> ../../devices/pci0000:00/0000:00:03.0/0000:05:00.0/host5/fc_host/host5
    /sys/block/sdb -> ../devices/.../host5/rport-5:0-0/target5:0:0/5:0:0:0/block/sdb
    /sys/block/sdb/device -> ../../../5:0:0:0   (wwid, vendor, model)
    /sys/block/dm-0/dm/{name,uuid}, /sys/block/dm-0/slaves/{sdb,sdc}
    /dev/disk/by-id/wwn-0x600a0980... -> ../../dm-0
"""

from __future__ import annotations

import os
from pathlib import Path

PCI = "devices/pci0000:00/0000:00:03.0"
WWID_A = "600a098038303053453f463045727a41"
WWID_B = "600a098038303053453f463045727a42"


def _w(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _link(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def _hba(sys: Path, host: int, func: str, wwpn: str, wwnn: str) -> str:
    base = f"{PCI}/{func}/host{host}"
    fc = sys / base / "fc_host" / f"host{host}"
    _w(fc / "port_name", wwpn)
    _w(fc / "node_name", wwnn)
    _w(fc / "port_state", "Online")
    _w(fc / "speed", "16 Gbit")
    _link(sys / "class" / "fc_host" / f"host{host}", f"../../{base}/fc_host/host{host}")
    return base


def _disk(
    sys: Path,
    parent: str,
    hctl: str,
    name: str,
    wwid: str,
    sectors: int,
    vendor: str,
    model: str,
    partitions: tuple[str, ...] = (),
) -> None:
    dev = sys / parent / hctl
    _w(dev / "wwid", f"naa.{wwid}" if wwid else "")
    _w(dev / "vendor", vendor)
    _w(dev / "model", model)
    blk = dev / "block" / name
    _w(blk / "size", str(sectors))
    (blk / "holders").mkdir(parents=True, exist_ok=True)
    for p in partitions:
        _w(blk / p / "size", str(sectors // 2))
    _link(blk / "device", f"../../../{hctl}")
    _link(sys / "block" / name, f"../{parent}/{hctl}/block/{name}")


def build(root: Path) -> tuple[str, str]:
    """Build the tree under root; returns (sys_root, dev_root)."""
    sys, dev = root / "sys", root / "dev"
    h5 = _hba(sys, 5, "0000:05:00.0", "0x21000024ff3f6c5a", "0x20000024ff3f6c5a")
    h6 = _hba(sys, 6, "0000:05:00.1", "0x21000024ff3f6c5b", "0x20000024ff3f6c5b")
    gib = 2 * 1024 * 1024  # sectors
    _disk(sys, f"{h5}/rport-5:0-0/target5:0:0", "5:0:0:0", "sdb", WWID_A, 100 * gib, "NETAPP", "LUN C-Mode")
    _disk(sys, f"{h6}/rport-6:0-0/target6:0:0", "6:0:0:0", "sdc", WWID_A, 100 * gib, "NETAPP", "LUN C-Mode")
    _disk(sys, f"{h5}/rport-5:0-0/target5:0:0", "5:0:0:1", "sdd", WWID_B, 20 * gib, "NETAPP", "LUN C-Mode")
    _disk(
        sys,
        f"{PCI}/0000:00:05.0/virtio1/host0/target0:0:0",
        "0:0:0:0",
        "sda",
        "",
        40 * gib,
        "QEMU",
        "QEMU HARDDISK",
        partitions=("sda1",),
    )
    # the multipath map over sdb and sdc
    mp = sys / "devices" / "virtual" / "block" / "dm-0"
    _w(mp / "dm" / "name", "mpatha")
    _w(mp / "dm" / "uuid", f"mpath-3{WWID_A}")
    _w(mp / "size", str(100 * gib))
    (mp / "holders").mkdir(parents=True, exist_ok=True)
    for s in ("sdb", "sdc"):
        _link(mp / "slaves" / s, f"../../../../{PCI}/x/{s}")
    _link(sys / "block" / "dm-0", "../devices/virtual/block/dm-0")
    byid = dev / "disk" / "by-id"
    for name, target in (
        (f"wwn-0x{WWID_A}", "dm-0"),
        (f"dm-uuid-mpath-3{WWID_A}", "dm-0"),
        ("dm-name-mpatha", "dm-0"),
        (f"scsi-3{WWID_A}", "dm-0"),
        (f"wwn-0x{WWID_B}", "sdd"),
        (f"scsi-3{WWID_B}", "sdd"),
        ("scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0", "sda"),
        ("scsi-0QEMU_QEMU_HARDDISK_drive-scsi0-0-0-0-part1", "sda1"),
    ):
        _link(byid / name, f"../../{target}")
    return str(sys), str(dev)
