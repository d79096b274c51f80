"""The other hosts of a shared pool, as the driver sees them.

A VM on any host may have a volume's head open, but only the metadata
owner changes the slice table. So the owner asks every other live host
which of its VMs hold a slice before it changes a head, and has the VM's
host do the QMP part of a live snapshot; a VM's host asks the owner to grow
or move a running head's slice. The driver talks to those hosts through
this interface; agent/services/pool_peers.py implements it over gRPC (the
address each host's lease carries, mutual TLS and the fleet's token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from agent.hypervisor.freeze import Freeze
from agent.volumes.lun.format import SliceRecord


@dataclass(frozen=True)
class SliceUse:
    """A running VM on some host with a node over a slice."""

    host: str  # the host's uuid
    offset: int  # the slice's offset on the LUN
    vm: str  # its name, for errors
    qmp: str  # its QMP socket on that host


@dataclass(frozen=True)
class Geometry:
    """A slice as another host saw it (stale geometry is refused)."""

    slot: int
    generation: int
    offset: int
    size: int

    @classmethod
    def of(cls, rec: SliceRecord) -> Geometry:
        return cls(rec.slot, rec.generation, rec.offset, rec.size)


class Peers(Protocol):
    def slice_users(self, address: str, pool_uuid: str, offsets: list[int]) -> list[SliceUse]:
        """The VMs on the host at address with a node over these slices."""
        ...

    def switch(
        self,
        address: str,
        pool_uuid: str,
        qmp: str,
        switches: list[tuple[Geometry, Geometry, str]],
        *,
        freeze: bool,
        timeout: float,
    ) -> tuple[Freeze, float]:
        """A live snapshot's switch (head, overlay, bitmap) in a VM there:
        the guest's freeze and the switch's milliseconds."""
        ...

    def grow(self, address: str, pool_uuid: str, head: Geometry, size: int) -> str:
        """The owner at address grows a running head's slice in place:
        "grown", "boxed" (the next slice is in the way: move it) or "later"
        (the volume is being changed, or it changed: look again)."""
        ...

    def begin_move(self, address: str, pool_uuid: str, head: Geometry, size: int) -> Geometry | None:
        """A new slice from the owner, holding an empty layer over the
        head's parent, for a running head to be mirrored into (None: no
        room anywhere)."""
        ...

    def end_move(self, address: str, pool_uuid: str, head: Geometry, target: Geometry, *, done: bool) -> None:
        """The move finished (the target is the head now) or not (the
        target is freed)."""
        ...
