from __future__ import annotations

import time
from contextlib import ExitStack

from agent import snapsets
from agent.api.v1 import volumes_pb2, volumes_pb2_grpc
from agent.errors import InvalidArgument
from agent.jobs.engine import JobEngine
from agent.kinds.volumes import volume_resource
from agent.pools import PoolRegistry
from agent.services.common import Auth, exclusive, rpc
from agent.services.forward import OwnerForward
from agent.volumes.base import SnapshotInfo, SnapshotRequest, VolumeInfo, check_uuid


def volume_to_pb(v: VolumeInfo) -> volumes_pb2.Volume:
    return volumes_pb2.Volume(
        uuid=v.uuid,
        name=v.name,
        pool_uuid=v.pool_uuid,
        capacity=v.capacity,
        used=v.used,
        snapshot_bytes=v.snapshot_bytes,
        access_path=v.access_path,
        created_at=v.created_at,
        parent_volume=v.parent_volume or "",
        parent_snapshot=v.parent_snapshot or "",
        children=list(v.children),
        format=v.format,
        tracking=v.tracking,
    )


def snapshot_to_pb(s: SnapshotInfo) -> volumes_pb2.Snapshot:
    return volumes_pb2.Snapshot(
        uuid=s.uuid,
        name=s.name,
        volume_uuid=s.volume_uuid,
        description=s.description,
        created_at=s.created_at,
        size=s.size,
        parent=s.parent or "",
        children=list(s.children),
        clones=list(s.clones),
        tracking=s.tracking,
        consistency=s.consistency,
        vm_definition=s.vm_definition,
    )


class VolumeService(volumes_pb2_grpc.VolumeServiceServicer):
    def __init__(self, pools: PoolRegistry, engine: JobEngine, auth: Auth, forward: OwnerForward):
        self.pools = pools
        self.engine = engine
        self.auth = auth
        self.forward = forward

    def _owners(self, pool, method: str, request):
        """A shared pool's change asked of a host that is not its owner:
        the answer of the owner's agent (None: ours to make). The owner
        asks every host, this one too, whether its VMs have the head open."""
        if not self.forward.wanted(pool):
            return None
        return self.forward.call(pool, method, request)

    def _exclusive(self, request):
        """Synchronous changes take the volume's lock, so they never race a job."""
        check_uuid(request.volume_uuid, "volume_uuid")
        return exclusive(self.engine.locks, volume_resource(request.pool_uuid, request.volume_uuid))

    @rpc
    def GetPoolStatus(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        t0 = time.monotonic()
        st = pool.pool_status()
        latency = (time.monotonic() - t0) * 1000
        status, error = st.status, st.error
        if status == "healthy" and st.total_bytes and st.available_bytes < 0.05 * st.total_bytes:
            status = "degraded"
            error = f"only {st.available_bytes * 100 / st.total_bytes:.1f} % free ({st.available_bytes} bytes)"
        return volumes_pb2.PoolStatus(
            pool_uuid=st.pool_uuid,
            type=st.kind,
            status=status,
            total_bytes=st.total_bytes,
            used_bytes=st.used_bytes,
            available_bytes=st.available_bytes,
            error=error,
            latency_ms=latency,
            metadata_owner=st.owner,
            live_hosts=list(st.hosts),
            lapsed_hosts=list(st.lapsed),
        )

    @rpc
    def AttachPool(self, request, context):
        from agent.config import PoolSection

        pc = PoolSection(type=request.type, path=request.path)
        if request.type == "rbd":
            pc = PoolSection(
                type="rbd",
                ceph_conf=request.ceph_conf,
                client_name=request.client_name or "client.admin",
                rbd_pool=request.rbd_pool,
                namespace=request.namespace,
            )
        elif request.type == "nfs":
            pc = PoolSection(type="nfs", ip=request.ip, export=request.export)
        elif request.type == "lun":
            pc = PoolSection(
                type="lun",
                device=request.device,
                format_lun=request.format_lun,
                ip=request.ip,
                target=request.target,
                lun=request.lun,
                port=request.port,
                username=request.username,
                secret=request.secret,
            )
            if request.lease_timeout:
                pc.lease_timeout = request.lease_timeout
            if request.lease_io_timeout:
                pc.lease_io_timeout = request.lease_io_timeout
        self.pools.attach(request.pool_uuid, pc)
        return self.GetPoolStatus(volumes_pb2.PoolRef(pool_uuid=request.pool_uuid), context)

    @rpc
    def DetachPool(self, request, context):
        with exclusive(self.engine.locks, f"pool/{request.pool_uuid}"):
            self.pools.detach(request.pool_uuid, force=request.force)
        return volumes_pb2.DetachPoolResponse()

    @rpc
    def CreateVolume(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "CreateVolume", request)) is not None:
            return answer
        with self._exclusive(request):
            return volume_to_pb(
                pool.create_volume(
                    request.volume_uuid, request.name, request.capacity or None, request.backing_file or None
                )
            )

    @rpc
    def DeleteVolume(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "DeleteVolume", request)) is not None:
            return answer
        with self._exclusive(request):
            pool.delete_volume(request.volume_uuid, force=request.force)
        return volumes_pb2.DeleteVolumeResponse()

    @rpc
    def GetVolume(self, request, context):
        return volume_to_pb(self.pools.get(request.pool_uuid).volume_info(request.volume_uuid))

    @rpc
    def ListVolumes(self, request, context):
        return volumes_pb2.ListVolumesResponse(
            volumes=[volume_to_pb(v) for v in self.pools.get(request.pool_uuid).list_volumes()]
        )

    @rpc
    def ResizeVolume(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "ResizeVolume", request)) is not None:
            return answer
        with self._exclusive(request):
            return volume_to_pb(pool.resize_volume(request.volume_uuid, request.capacity))

    @rpc
    def CreateSnapshot(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "CreateSnapshot", request)) is not None:
            return answer
        with self._exclusive(request):
            return snapshot_to_pb(
                pool.create_snapshot(request.volume_uuid, request.snapshot_uuid, request.name, request.description)
            )

    @rpc
    def CreateSnapshotSet(self, request, context):
        if not request.snapshots:
            raise InvalidArgument("snapshots: name at least one volume", field="snapshots")
        if request.freeze_timeout < 0 or request.freeze_timeout > 600:
            raise InvalidArgument("freeze_timeout: from 0 (the default, 10 s) to 600 seconds", field="freeze_timeout")
        wanted = []
        for i, r in enumerate(request.snapshots):
            self.pools.get(r.pool_uuid, f"snapshots[{i}].pool_uuid")
            check_uuid(r.volume_uuid, f"snapshots[{i}].volume_uuid")
            wanted.append(SnapshotRequest(r.pool_uuid, r.volume_uuid, r.snapshot_uuid, r.name, r.description))
        with ExitStack() as stack:
            for r in sorted(wanted, key=lambda r: (r.pool_uuid, r.volume_uuid)):
                stack.enter_context(exclusive(self.engine.locks, volume_resource(r.pool_uuid, r.volume_uuid)))
            got = snapsets.create_snapshot_set(
                self.pools, wanted, freeze=not request.no_freeze, freeze_timeout=request.freeze_timeout or 10.0
            )
        return volumes_pb2.SnapshotSet(
            snapshots=[snapshot_to_pb(s) for s in got.snapshots],
            consistency=got.consistency,
            vm=got.vm,
            reason=got.reason,
            frozen_ms=got.frozen_ms,
            switch_ms=got.switch_ms,
            vm_definition=got.vm_definition,
        )

    @rpc
    def DeleteSnapshot(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "DeleteSnapshot", request)) is not None:
            return answer
        with self._exclusive(request):
            pool.delete_snapshot(request.volume_uuid, request.snapshot_uuid)
        return volumes_pb2.DeleteSnapshotResponse()

    @rpc
    def RollbackSnapshot(self, request, context):
        pool = self.pools.get(request.pool_uuid)
        if (answer := self._owners(pool, "RollbackSnapshot", request)) is not None:
            return answer
        with self._exclusive(request):
            return volume_to_pb(pool.rollback_snapshot(request.volume_uuid, request.snapshot_uuid))

    @rpc
    def ListSnapshots(self, request, context):
        snaps = self.pools.get(request.pool_uuid).list_snapshots(request.volume_uuid)
        return volumes_pb2.ListSnapshotsResponse(snapshots=[snapshot_to_pb(s) for s in snaps])

    @rpc
    def GetSnapshotTree(self, request, context):
        tree = self.pools.get(request.pool_uuid).snapshot_tree(request.volume_uuid)
        return volumes_pb2.SnapshotTree(
            parents=tree.parents,
            root=tree.root,
            children={k: volumes_pb2.NameList(names=v) for k, v in tree.children.items()},
        )

    @rpc
    def GetExtents(self, request, context):
        extents = self.pools.get(request.pool_uuid).data_extents(request.volume_uuid, request.snapshot_uuid or None)
        return volumes_pb2.ExtentList(
            extents=[volumes_pb2.Extent(start=e.start, length=e.length, zero=e.zero, hole=e.hole) for e in extents],
            exact=True,
            granularity=512,
        )

    @rpc
    def GetChangedExtents(self, request, context):
        changed = self.pools.get(request.pool_uuid).changed_extents(
            request.volume_uuid, request.snapshot_uuid, request.since_snapshot_uuid or None
        )
        return volumes_pb2.ExtentList(
            extents=[volumes_pb2.Extent(start=e.start, length=e.length) for e in changed.extents],
            exact=changed.exact,
            granularity=changed.granularity,
        )
