"""The hypervisors of this host, asked in turn: libvirt first (when
`[vms] libvirt_uri` is set), then the QMP adapter for qemu processes no
libvirt manages. libvirt passes its monitor to qemu as a descriptor, so the
QMP adapter never finds a socket on such a qemu's command line and leaves it
to libvirt."""

from __future__ import annotations

import logging

from agent.errors import BlockferryError
from agent.hypervisor.base import Hypervisor, RunningVm
from agent.hypervisor.libvirt import LibvirtHypervisor
from agent.hypervisor.qemu import QemuHypervisor

log = logging.getLogger("agent.hypervisor")


class HostHypervisors(Hypervisor):
    def __init__(self, qmp_sockets: tuple[str, ...], *, qmp_timeout: float, libvirt_uri: str = ""):
        self.qemu = QemuHypervisor(qmp_sockets, timeout=qmp_timeout)
        self.libvirt = LibvirtHypervisor(libvirt_uri) if libvirt_uri else None

    def running_vms(self) -> list[RunningVm]:
        out: list[RunningVm] = []
        if self.libvirt is not None:
            try:
                out += self.libvirt.running_vms()
            except BlockferryError as e:  # libvirtd down: its VMs are missing from this scan only
                log.warning("libvirt could not be asked for its VMs", extra={"error": e.message})
        return out + self.qemu.running_vms()

    def holder(self, path: str) -> RunningVm | None:
        if self.libvirt is not None:
            try:
                vm = self.libvirt.holder(path)
            except BlockferryError as e:  # libvirtd down: a qemu without libvirt may still hold it
                log.warning("libvirt could not be asked who holds a file", extra={"path": path, "error": e.message})
                vm = None
            if vm is not None:
                return vm
        return self.qemu.holder(path)
