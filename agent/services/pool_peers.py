"""The other hosts of a shared LUN pool, reached over gRPC: the client side
of SharedPoolService (agent/volumes/lun/peers.py says what the driver asks
of them; agent/services/sharedpool.py answers it on each host).

Addresses come from the hosts' leases on the LUN; calls go over the
fleet's channels (mutual TLS, the fleet's token). An error a host answers
with is re-raised as ours, naming the host's address.
"""

from __future__ import annotations

from agent.api.v1 import sharedpool_pb2 as sp
from agent.api.v1 import sharedpool_pb2_grpc
from agent.errors import FailedPrecondition
from agent.hypervisor.freeze import Freeze
from agent.services.fleet import FleetChannels
from agent.volumes.lun.peers import Geometry, SliceUse

ASK_TIMEOUT = 15.0  # which VMs use a slice: a QMP query per VM there
MOVE_TIMEOUT = 600.0  # a new slice's layer written by the owner


def slice_ref(g: Geometry) -> sp.SliceRef:
    return sp.SliceRef(slot=g.slot, generation=g.generation, offset=g.offset, size=g.size)


def geometry(r: sp.SliceRef) -> Geometry:
    return Geometry(r.slot, r.generation, r.offset, r.size)


class PoolPeers:
    def __init__(self, channels: FleetChannels):
        self.channels = channels

    def _call(self, address: str, method: str, request, timeout: float):
        if not self.channels.usable:
            raise FailedPrecondition(
                f"pool_uuid: this agent has no [grpc] tls_cert to reach the host at {address}, which shares the pool",
                field="pool_uuid",
            )
        return self.channels.call(
            sharedpool_pb2_grpc.SharedPoolServiceStub,
            address,
            method,
            request,
            timeout=timeout,
            where=f"host at {address}",
        )

    def slice_users(self, address: str, pool_uuid: str, offsets: list[int]) -> list[SliceUse]:
        r = self._call(address, "SliceUsers", sp.SliceUsersRequest(pool_uuid=pool_uuid, offsets=offsets), ASK_TIMEOUT)
        return [SliceUse(r.host_uuid, u.offset, u.vm, u.qmp) for u in r.users]

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
        req = sp.SwitchToOverlaysRequest(
            pool_uuid=pool_uuid,
            qmp=qmp,
            switches=[sp.OverlaySwitch(head=slice_ref(h), overlay=slice_ref(o), bitmap=b) for h, o, b in switches],
            freeze=freeze,
            freeze_timeout=timeout,
        )
        r = self._call(address, "SwitchToOverlays", req, timeout + 60)
        return Freeze(consistency=r.consistency, reason=r.reason, frozen_ms=r.frozen_ms), r.switch_ms

    def grow(self, address: str, pool_uuid: str, head: Geometry, size: int) -> str:
        req = sp.GrowSliceRequest(pool_uuid=pool_uuid, slice=slice_ref(head), size=size)
        r = self._call(address, "GrowSlice", req, ASK_TIMEOUT)
        return "grown" if r.grown else "boxed" if r.boxed else "later"

    def begin_move(self, address: str, pool_uuid: str, head: Geometry, size: int) -> Geometry | None:
        req = sp.MoveSliceRequest(pool_uuid=pool_uuid, slice=slice_ref(head), size=size)
        r = self._call(address, "BeginMove", req, MOVE_TIMEOUT)
        return geometry(r.target) if r.HasField("target") else None

    def end_move(self, address: str, pool_uuid: str, head: Geometry, target: Geometry, *, done: bool) -> None:
        req = sp.MoveSliceRequest(pool_uuid=pool_uuid, slice=slice_ref(head), target=slice_ref(target), done=done)
        self._call(address, "EndMove", req, ASK_TIMEOUT)
