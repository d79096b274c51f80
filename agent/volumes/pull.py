"""A running VM's disk at the instant of a hypervisor's pull backup, read
like a snapshot.

libvirt's pull backup (agent.hypervisor.libvirt) exports a point in time of
a disk over NBD (qemu keeps it with a scratch file while the guest goes on
writing) and, for an incremental, the dirty bitmap since the checkpoint it
counts from. PullSource gives the backup code (agent.repo.backup) what it
asks a volume driver for: the point's record, its changes since the parent
backup's point, and a reader. The point is named by the checkpoint created
with it, which the next incremental counts from.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from agent.errors import TrackingLost
from agent.volumes.base import ChangedExtents, SnapshotInfo
from agent.volumes.nbd import NbdClient, NbdSnapshotReader

GRANULARITY = 64 << 10  # qemu's default dirty bitmap granularity for a 64 KiB cluster image


class PullSource:
    def __init__(
        self,
        pool_uuid: str,
        volume_uuid: str,
        *,
        socket: str,
        export: str,
        bitmap: str,
        since: str,
        checkpoint: str,
        vm: str,
        consistency: str,
        lost: str = "",
        vm_definition: str = "",
    ):
        self.pool_uuid = pool_uuid
        self.volume_uuid = volume_uuid
        self.socket, self.export, self.bitmap, self.since = socket, export, bitmap, since
        self.checkpoint, self.vm, self.consistency = checkpoint, vm, consistency
        self.lost = lost  # why no changes can be counted, though the parent backup was asked for
        self.vm_definition = vm_definition
        self.created_at = time.time()

    def snapshot_info(self, volume_uuid: str, snapshot_uuid: str) -> SnapshotInfo:
        return SnapshotInfo(
            uuid=self.checkpoint,
            name=f"checkpoint {self.checkpoint} of VM {self.vm}",
            volume_uuid=self.volume_uuid,
            description="",
            created_at=self.created_at,
            size=0,
            parent=self.since or None,
            children=(),
            clones=(),
            consistency=self.consistency,
            vm_definition=self.vm_definition,
        )

    def changed_extents(self, volume_uuid: str, snapshot_uuid: str, since: str | None) -> ChangedExtents:
        if self.lost:
            raise TrackingLost(self.lost)
        if not self.bitmap:
            raise TrackingLost(f"VM {self.vm} has no checkpoint {since} to count changes from")
        if since != self.since:
            raise TrackingLost(f"VM {self.vm} counts changes from checkpoint {self.since}, not {since}")
        with NbdClient(self.socket, (f"qemu:dirty-bitmap:{self.bitmap}",), export=self.export) as c:
            return ChangedExtents(c.dirty(self.bitmap), exact=True, granularity=GRANULARITY)

    @contextmanager
    def open_reader(self, volume_uuid: str, snapshot_uuid: str, only=None):
        with NbdClient(self.socket, export=self.export) as c:
            yield NbdSnapshotReader(c)
