"""Job kinds for volumes: clone (linked or full) and flatten."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import AlreadyExists, FailedPrecondition
from agent.jobs.kinds import Claim, JobKind
from agent.jobs.locks import LockMode
from agent.pools import PoolRegistry
from agent.volumes.base import check_name, check_uuid
from agent.volumes.copy import copy_snapshot


def volume_resource(pool_uuid: str, volume_uuid: str) -> str:
    return f"volume:{pool_uuid}/{volume_uuid}"


@dataclass(frozen=True)
class CloneSpec:
    pool_uuid: str
    volume_uuid: str
    snapshot_uuid: str
    target_pool_uuid: str
    target_volume_uuid: str
    target_name: str
    linked: bool


@dataclass(frozen=True)
class CloneResult:
    pool_uuid: str
    volume_uuid: str
    access_path: str
    capacity: int
    linked: bool
    copied_bytes: int


@dataclass(frozen=True)
class FlattenSpec:
    pool_uuid: str
    volume_uuid: str


@dataclass(frozen=True)
class FlattenResult:
    pool_uuid: str
    volume_uuid: str


class CloneKind(JobKind):
    name = "clone"
    spec_type = CloneSpec
    result_type = CloneResult

    def __init__(self, pools: PoolRegistry):
        self.pools = pools

    def prepare(self, spec: CloneSpec) -> Claim:
        source = self.pools.get(spec.pool_uuid)
        target = self.pools.get(spec.target_pool_uuid, "target_pool_uuid")
        check_uuid(spec.target_volume_uuid, "target_volume_uuid")
        check_name(spec.target_name, "target_name")
        if spec.linked and source.kind != target.kind:
            raise FailedPrecondition(
                f"target_pool_uuid: a linked clone of a {source.kind} pool's snapshot cannot "
                f"live in a {target.kind} pool; make a full clone",
                field="target_pool_uuid",
            )
        source.snapshot_info(spec.volume_uuid, spec.snapshot_uuid)  # both exist
        if target.volume_exists(spec.target_volume_uuid):
            raise AlreadyExists(
                f"target_volume_uuid: volume {spec.target_volume_uuid} exists in pool {spec.target_pool_uuid}",
                field="target_volume_uuid",
            )
        if (spec.pool_uuid, spec.volume_uuid) == (spec.target_pool_uuid, spec.target_volume_uuid):
            raise FailedPrecondition(
                "target_volume_uuid: a volume cannot be cloned onto itself", field="target_volume_uuid"
            )
        # Reading a snapshot: others may read too, but nothing may rewrite its layers.
        return Claim(volume_resource(spec.pool_uuid, spec.volume_uuid), LockMode.SHARED)

    def run(self, spec: CloneSpec, ctx) -> CloneResult:
        source = self.pools.get(spec.pool_uuid)
        target = self.pools.get(spec.target_pool_uuid, "target_pool_uuid")
        if spec.linked:
            ctx.progress(0, 1, "linking")
            info = target.linked_clone(
                source, spec.volume_uuid, spec.snapshot_uuid, spec.target_volume_uuid, spec.target_name
            )
            ctx.progress(1, 1, "done")
            return CloneResult(target.pool_uuid, info.uuid, info.access_path, info.capacity, True, 0)
        if type(source) is not type(target):  # qcow2 <-> RBD
            info, copied = copy_snapshot(
                source, spec.volume_uuid, spec.snapshot_uuid, target, spec.target_volume_uuid, spec.target_name, ctx
            )
        else:
            info, copied = target.full_clone(
                source, spec.volume_uuid, spec.snapshot_uuid, spec.target_volume_uuid, spec.target_name, ctx
            )
        return CloneResult(target.pool_uuid, info.uuid, info.access_path, info.capacity, False, copied)


class FlattenKind(JobKind):
    name = "flatten"
    spec_type = FlattenSpec
    result_type = FlattenResult

    def __init__(self, pools: PoolRegistry):
        self.pools = pools

    def prepare(self, spec: FlattenSpec) -> Claim:
        info = self.pools.get(spec.pool_uuid).volume_info(spec.volume_uuid)
        if not info.parent_volume:
            raise FailedPrecondition(f"volume_uuid: volume {info.uuid} is not a linked clone", field="volume_uuid")
        return Claim(volume_resource(spec.pool_uuid, info.uuid), LockMode.EXCLUSIVE)

    def run(self, spec: FlattenSpec, ctx) -> FlattenResult:
        pool = self.pools.get(spec.pool_uuid)
        ctx.progress(0, 100, "flattening")
        pool.flatten(spec.volume_uuid, on_percent=lambda p: ctx.progress(int(p), 100), checkpoint=ctx.checkpoint)
        return FlattenResult(spec.pool_uuid, spec.volume_uuid)
