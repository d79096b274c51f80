"""Volume changes of a shared LUN pool asked of a host that is not its
metadata owner: passed on, unchanged, to the owner's agent.

Only the owner writes a shared pool's slice table, so a CreateVolume or a
snapshot asked here goes to the agent whose address the owner lease
carries, over the fleet's channels (agent/services/fleet.py). The owner's answer,
or its error, is this call's. Before a change of a volume's head is passed
on, nothing is checked here: the owner asks every host of the pool,
this one too, which of its VMs have the head open.
"""

from __future__ import annotations

from agent.api.v1 import volumes_pb2_grpc
from agent.errors import FailedPrecondition
from agent.services.fleet import FleetChannels

TIMEOUT = 600.0  # a snapshot of a large volume, a delete that rebases


class OwnerForward:
    def __init__(self, channels: FleetChannels):
        self.channels = channels

    def wanted(self, pool) -> bool:
        """Whether a change of this pool is the owner's to make, not ours
        (an election in progress is waited out first)."""
        if getattr(pool, "kind", "") != "lun":
            return False
        pool.settle_owner()
        return not pool.is_owner

    def call(self, pool, method: str, request):
        """request passed on to the owner's VolumeService.method."""
        address = pool.owner_address()
        owner = pool.owner()
        if not address or not self.channels.usable:
            raise FailedPrecondition(
                f"pool_uuid: this host is not the metadata owner of pool {pool.pool_uuid}"
                + (f" (host {owner} is)" if owner else " (none holds the lease yet)")
                + "; volumes are created and changed there"
                + ("" if address else " (the owner gives no address to pass the change on to)"),
                field="pool_uuid",
            )
        return self.channels.call(
            volumes_pb2_grpc.VolumeServiceStub, address, method, request, timeout=TIMEOUT, where=f"owner {owner}"
        )
