"""The running VMs of this host, with their disks mapped to volumes.

Reported to the controller in heartbeats (refreshed every `[vms]
report_interval` seconds, as each VM's monitor is asked in turn and serves
one client at a time) and listed by ListVms. A disk is a volume of a pool
this agent serves when its top layer is that volume's head (found by the
hypervisor layer, which knows the names qemu no longer does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from agent.errors import BlockferryError
from agent.hypervisor.base import Hypervisor
from agent.pools import PoolRegistry

log = logging.getLogger("agent.vms")


@dataclass(frozen=True)
class VmDiskReport:
    device: str  # the guest device, e.g. vd0
    file: str  # the volume's head, or the file of its top layer as the VM opened it
    pool_uuid: str  # "" when the disk is no volume of this agent's pools
    volume_uuid: str


@dataclass(frozen=True)
class VmReport:
    uuid: str
    name: str
    state: str
    guest_agent: bool
    disks: tuple[VmDiskReport, ...]
    manager: str = "qemu"  # "libvirt" for a VM a libvirtd manages


def running_vms(hypervisor: Hypervisor, pools: PoolRegistry) -> list[VmReport]:
    heads = pools.local_heads()  # (pool, volume) -> head path, of the pools whose files qemu opens here
    out = []
    for vm in hypervisor.running_vms():
        try:
            summary = vm.summary()
            volume_of = {}  # disk node -> (pool, volume), head; each head asked once
            for key, head in heads.items():
                d = vm.disk_of(head) if os.path.exists(head) else None
                if d is not None:
                    volume_of[d.node] = (key, head)
            disks = []
            for d in vm.disks():
                if d.node not in volume_of:
                    disks.append(VmDiskReport(d.device, d.file, "", ""))
                else:  # its head's name now: qemu keeps the name it opened, which a live snapshot changed
                    (pool, volume), head = volume_of[d.node]
                    disks.append(VmDiskReport(d.device, head, pool, volume))
            out.append(
                VmReport(summary.uuid, summary.name, summary.state, summary.guest_agent, tuple(disks), vm.manager)
            )
        except BlockferryError as e:  # gone meanwhile, or its monitor is busy: reported next time
            log.info("a running VM could not be asked", extra={"vm": vm.name, "error": e.message})
        finally:
            vm.close()
    return out


def vm_to_pb(v: VmReport):  # -> host_pb2.Vm; here, as both ListVms and the heartbeats send it
    from agent.api.v1 import host_pb2

    return host_pb2.Vm(
        uuid=v.uuid,
        name=v.name,
        state=v.state,
        guest_agent=v.guest_agent,
        manager=v.manager,
        disks=[
            host_pb2.VmDisk(device=d.device, file=d.file, pool_uuid=d.pool_uuid, volume_uuid=d.volume_uuid)
            for d in v.disks
        ],
    )
