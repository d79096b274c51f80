"""The hypervisor interface the volume drivers use.

A volume whose file a running qemu holds cannot be changed by qemu-img: the
VM's qemu must do it. The drivers ask a Hypervisor which running VM holds a
file and then ask that VM, through a RunningVm, for what they need while it
runs. Adapters: qemu.py (QMP, for qemu processes no libvirt manages) and
libvirt.py (VMs a libvirtd manages); hosts.py asks both.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.hypervisor.freeze import Freeze


def same_file(a: str, b: str) -> bool:
    """Two names of one file (by name, then by device and inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


STATE_FILE_LIMIT = 16 << 20  # a VM's firmware variables are KiBs; anything this large is no NVRAM


def state_files(paths: list[str]) -> dict[str, str]:
    """The contents (base64) of a VM's small state files, such as its UEFI
    variable store, kept with its definition so a restored VM boots the
    same way; a file that cannot be read or is too large is left out."""
    import base64

    out = {}
    for p in paths:
        try:
            if os.path.getsize(p) <= STATE_FILE_LIMIT:
                with open(p, "rb") as f:
                    out[p] = base64.b64encode(f.read()).decode()
        except OSError:
            continue
    return out


@dataclass(frozen=True)
class VmDisk:
    """One disk of a running VM, as its hypervisor names it."""

    device: str  # the guest device (qdev id), e.g. "vd0"
    node: str  # the block node on top of the disk's chain (the live state)
    file: str  # the file that top node was opened from
    bitmaps: tuple[str, ...]  # persistent dirty bitmaps on the top node that qemu keeps consistent
    rbd: tuple[str, str, str] | None = None  # (RADOS pool, namespace, image) of a disk on Ceph RBD


@dataclass(frozen=True)
class LiveLayer:
    """A new top layer for a running VM's disk: `overlay` is a qcow2 file the
    caller created, backed by the disk's current top layer; `path` is the
    name the caller gives the overlay after the switch (the volume's head),
    by which disk_of finds the disk again; `bitmap` names the persistent
    bitmap that stops recording on the old top (qemu stores it in that file)
    and records on the overlay from now.

    The caller renames files only after add_layers returned: qemu reopens
    the old top read-only during the switch, and a file node qemu made
    itself (a VM started with -drive) is reopened by its name."""

    disk: VmDisk
    overlay: str
    path: str
    bitmap: str = ""


@dataclass(frozen=True)
class ChainNode:
    """One layer of a running disk's chain, as qemu holds it."""

    node: str  # the format node
    read_only: bool
    file_node: str  # its protocol (file) node
    file_name: str  # the name qemu opened that file by (stale once the file was renamed)
    file_implicit: bool  # a file node qemu made itself: qemu reopens it by file_name
    file_read_only: bool

    def reopens_by_stale_name(self, path: str) -> bool:
        """Whether making this layer writable would make qemu open its file
        again by a name that no longer is that file (the layer lives at path)."""
        if self.file_implicit or self.file_read_only:
            return not same_file(self.file_name, path)
        return False  # a read-write file node of its own keeps its descriptor


@dataclass(frozen=True)
class VmSummary:
    """What a host reports about a running VM."""

    uuid: str  # the VM's uuid (qemu -uuid, libvirt's), "" when it has none
    name: str
    state: str  # running, paused, ... as the hypervisor says
    guest_agent: bool  # a guest agent channel the guest has opened (an agent runs inside)


class RunningVm(ABC):
    """A running VM, reached through its hypervisor for one operation."""

    name: str
    pid: int
    ident: str  # the same for every RunningVm of one VM (its monitor's address)
    manager: str = "qemu"  # who runs it: "qemu" (reached through QMP) or "libvirt"

    @abstractmethod
    def disks(self) -> list[VmDisk]:
        """The VM's disks, as they are now."""

    def disk_of(self, path: str) -> VmDisk | None:
        """The disk whose top layer is the file at path, if this VM has one."""
        return next((d for d in self.disks() if same_file(d.file, path)), None)

    @abstractmethod
    def pause(self) -> None:
        """Stop the guest's CPUs (its devices' I/O in flight completes)."""

    @abstractmethod
    def resume(self) -> None:
        """Run the guest again after pause."""

    def rbd_disk(self, pool: str, namespace: str, image: str) -> VmDisk | None:
        """The disk on that RBD image, if this VM has one."""
        return next((d for d in self.disks() if d.rbd == (pool, namespace, image)), None)

    @abstractmethod
    def definition(self) -> str:
        """How to start the VM again, as JSON: {"type": "qemu", "argv": [...],
        "nvram": [files], "files": {path: base64}} for a qemu started by
        hand, {"type": "libvirt", "xml": ..., "files": {...}} for a libvirt
        domain ("files": the contents of its writable firmware variable
        stores); "" when unknown."""

    @abstractmethod
    def summary(self) -> VmSummary:
        """Its uuid, name, state and guest agent."""

    @abstractmethod
    def guest_agent_socket(self) -> str | None:
        """The host side of the VM's qemu-guest-agent channel, if it has one."""

    @abstractmethod
    def frozen(self, *, timeout: float, wanted: bool = True) -> AbstractContextManager[Freeze]:
        """The guest's filesystems frozen for the block (thawed on every
        exit); the Freeze says whether they were, and why not."""

    @abstractmethod
    def chain(self, disk: VmDisk) -> list[ChainNode]:
        """The disk's layers, top first."""

    @abstractmethod
    def merge_bitmap(self, target: ChainNode, source: ChainNode, name: str) -> None:
        """Add the bits of source's bitmap `name` to target's (both recorded)."""

    @abstractmethod
    def stream(self, top: ChainNode, gone: ChainNode, base: ChainNode | None, backing_file: str | None) -> None:
        """Merge the layer `gone`, directly below top, into top: copy what top
        reads from it, then make base (gone's backing; None: nothing) top's
        backing, `backing_file` written in top's header. Returns when qemu
        finished; gone is released and its named nodes removed from qemu."""

    @abstractmethod
    def add_layers(self, layers: list[LiveLayer]) -> None:
        """Put each overlay on top of its disk, all disks at one point in time
        (one transaction): the writes of the VM go to the overlays from then on."""

    def close(self) -> None:
        """Let go of the connection to the hypervisor."""

    def __enter__(self) -> RunningVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Hypervisor(ABC):
    """Finds the running VM that holds a file."""

    @abstractmethod
    def running_vms(self) -> list[RunningVm]:
        """Every running VM this hypervisor drives on the host (the caller
        closes each)."""

    @abstractmethod
    def holder(self, path: str) -> RunningVm | None:
        """The running VM that holds the file at path open, or None when no
        VM this hypervisor drives does (another process may still hold it)."""
