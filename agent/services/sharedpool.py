"""SharedPoolService: what the hosts of a shared LUN pool ask of each other
(proto/agent/api/v1/sharedpool.proto, docs/shared-pools.md). The owner
asks a VM's host which VMs hold a slice and has it switch a VM to a live
snapshot's new layers; a VM's host asks the owner to grow or move a running
head's slice. Thin handlers over the pool driver's methods."""

from __future__ import annotations

from agent.api.v1 import sharedpool_pb2 as sp
from agent.api.v1 import sharedpool_pb2_grpc
from agent.errors import FailedPrecondition
from agent.pools import PoolRegistry
from agent.services.common import Auth, rpc
from agent.services.pool_peers import geometry, slice_ref
from agent.volumes.lun.peers import Geometry


def _ref(rec) -> sp.SliceRef:
    return slice_ref(Geometry.of(rec))


class SharedPoolService(sharedpool_pb2_grpc.SharedPoolServiceServicer):
    def __init__(self, pools: PoolRegistry, auth: Auth):
        self.pools = pools
        self.auth = auth

    def _pool(self, pool_uuid: str):
        pool = self.pools.get(pool_uuid)
        if getattr(pool, "kind", "") != "lun":
            raise FailedPrecondition(f"pool_uuid: pool {pool_uuid} is not a shared LUN pool", field="pool_uuid")
        return pool

    @rpc
    def SliceUsers(self, request, context):
        pool = self._pool(request.pool_uuid)
        users = pool.local_slice_users(list(request.offsets))
        return sp.SliceUsersResponse(
            host_uuid=pool.host_uuid, users=[sp.SliceUser(offset=u.offset, vm=u.vm, qmp=u.qmp) for u in users]
        )

    @rpc
    def SwitchToOverlays(self, request, context):
        pool = self._pool(request.pool_uuid)
        switches = [(geometry(s.head), geometry(s.overlay), s.bitmap) for s in request.switches]
        frozen, ms = pool.switch_here(
            request.qmp, switches, freeze=request.freeze, timeout=request.freeze_timeout or pool.freeze_timeout
        )
        return sp.SwitchToOverlaysResponse(
            consistency=frozen.consistency, reason=frozen.reason, frozen_ms=frozen.frozen_ms, switch_ms=ms
        )

    @rpc
    def GrowSlice(self, request, context):
        pool = self._pool(request.pool_uuid)
        head = pool.slice_as_seen(geometry(request.slice), "slice")
        now = pool.grow_as_owner(head, request.size)
        return sp.GrowSliceResponse(
            slice=_ref(now or head), grown=now is not None and now.size > head.size, boxed=now is None
        )

    @rpc
    def BeginMove(self, request, context):
        pool = self._pool(request.pool_uuid)
        new = pool.begin_move_as_owner(pool.slice_as_seen(geometry(request.slice), "slice"), request.size)
        return sp.MoveSliceResponse() if new is None else sp.MoveSliceResponse(target=_ref(new))

    @rpc
    def EndMove(self, request, context):
        pool = self._pool(request.pool_uuid)
        head = pool.slice_as_seen(geometry(request.slice), "slice")
        target = pool.slice_as_seen(geometry(request.target), "target")
        return sp.MoveSliceResponse(target=_ref(pool.end_move_as_owner(head, target, done=request.done)))
