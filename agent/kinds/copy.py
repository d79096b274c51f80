"""The copy job: backups from one backup point to another (agent/repo/copy.py)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from agent.backup_points import BackupPoints
from agent.config import GrpcSection
from agent.errors import BlockferryError, DataCorrupt, InvalidArgument
from agent.jobs.kinds import Claim, JobKind
from agent.jobs.locks import LockMode
from agent.kinds.backups import backup_point_resource
from agent.peer import PeerSource
from agent.repo import copy as copy_mod
from agent.repo import verify as verify_mod
from agent.volumes.base import check_uuid

log = logging.getLogger("agent.copy")


@dataclass(frozen=True)
class CopySpec:
    source_backup_point_uuid: str
    target_backup_point_uuid: str
    backup_uuids: tuple[str, ...] = ()  # these backups; empty: those of volume_uuid, or all
    volume_uuid: str = ""  # every backup of this volume (with no backup_uuids)
    verify: bool = True  # a deep verify of each copy at the destination
    bandwidth_limit: int = 0  # bytes per second for this job (a policy's limit); 0: none
    target_backup_uuids: tuple[str, ...] = ()  # each backup_uuids' copy's own id (the controller's); empty: the same
    source_address: str = ""  # host:port of the agent whose backup point is the source; "": this agent's

    def __post_init__(self) -> None:
        object.__setattr__(self, "backup_uuids", tuple(self.backup_uuids))
        object.__setattr__(self, "target_backup_uuids", tuple(self.target_backup_uuids))

    def new_ids(self) -> dict[str, str]:
        return dict(zip(self.backup_uuids, self.target_backup_uuids, strict=True))


@dataclass(frozen=True)
class CopyResult:
    copied: tuple[str, ...]  # source backup ids copied by this job
    present: tuple[str, ...]  # source backup ids whose copy was at the destination already: skipped
    chunks_sent: int
    chunks_present: int  # held by the destination: not sent
    bytes_sent: int
    stored_bytes: int
    verified: int  # copies deep-verified at the destination

    def __post_init__(self) -> None:
        object.__setattr__(self, "copied", tuple(self.copied))
        object.__setattr__(self, "present", tuple(self.present))


class CopyKind(JobKind):
    name = "copy"
    spec_type = CopySpec
    result_type = CopyResult
    resumable = True  # a run again skips what arrived: the backups copied, and the chunks sent

    def __init__(self, points: BackupPoints, grpc_section: GrpcSection | None = None):
        self.points = points
        self.grpc = grpc_section or GrpcSection()

    def _source(self, spec: CopySpec):
        if not spec.source_address:
            return self.points.get(spec.source_backup_point_uuid).repository()
        g = self.grpc
        return PeerSource(
            spec.source_address,
            check_uuid(spec.source_backup_point_uuid, "source_backup_point_uuid"),
            tls_ca=g.tls_client_ca,
            tls_cert=g.tls_cert,
            tls_key=g.tls_key,
            token=g.auth_token,
        )

    def _manifests(self, spec: CopySpec, src):
        if spec.backup_uuids:
            return src, [src.manifest(check_uuid(b, "backup_uuids")) for b in spec.backup_uuids]
        ms = src.manifests()
        if spec.volume_uuid:
            ms = [m for m in ms if m.volume_uuid == check_uuid(spec.volume_uuid, "volume_uuid")]
        return src, ms

    def prepare(self, spec: CopySpec) -> Claim:
        if spec.source_backup_point_uuid == spec.target_backup_point_uuid:
            raise InvalidArgument(
                "target_backup_point_uuid: must differ from source_backup_point_uuid", field="target_backup_point_uuid"
            )
        if spec.backup_uuids and spec.volume_uuid:
            raise InvalidArgument("volume_uuid: give backup_uuids or volume_uuid, not both", field="volume_uuid")
        if spec.target_backup_uuids:
            if len(spec.target_backup_uuids) != len(spec.backup_uuids):
                raise InvalidArgument(
                    "target_backup_uuids: one per backup_uuids, in the same order", field="target_backup_uuids"
                )
            for t in spec.target_backup_uuids:
                check_uuid(t, "target_backup_uuids")
        src = self._source(spec)
        try:
            self._manifests(spec, src)  # each named backup exists
            copy_mod.check_compatible(src, self.points.get(spec.target_backup_point_uuid).repository())
        finally:
            if isinstance(src, PeerSource):
                src.close()
        # the destination takes new backups meanwhile, but no gc
        return Claim(backup_point_resource(spec.target_backup_point_uuid), LockMode.SHARED)

    def run(self, spec: CopySpec, ctx) -> CopyResult:
        src = self._source(spec)
        try:
            return self._run(spec, src, ctx)
        finally:
            if isinstance(src, PeerSource):
                src.close()

    def _run(self, spec: CopySpec, src, ctx) -> CopyResult:
        src, manifests = self._manifests(spec, src)
        target = self.points.get(spec.target_backup_point_uuid)
        dst = target.repository()
        ids = spec.new_ids() if spec.target_backup_uuids else {}
        before = {m.backup_id for m in manifests if dst.has_backup(ids.get(m.backup_id, m.backup_id))}
        stats = copy_mod.copy_backups(src, dst, manifests, ctx=ctx, lock=target.lock_for(), new_ids=ids)
        copied = [m for m in manifests if m.backup_id not in before]
        verified = 0
        if spec.verify:
            ctx.progress(0, len(copied), "verifying")
            for k, m in enumerate(copied):
                copy_id = ids.get(m.backup_id, m.backup_id)
                r = verify_mod.verify(dst, dst.manifest(copy_id), deep=True, ctx=ctx)
                if r.damage:  # a damaged copy is not listed as one: unlisted, its data goes at the next gc
                    with contextlib.suppress(BlockferryError):
                        dst.delete_backup(copy_id)
                    raise DataCorrupt(
                        f"backup point {target.uuid}: the copy of backup {m.backup_id}: {r.summary()}; "
                        "the copy was removed",
                        field="target_backup_point_uuid",
                        result=r,
                    )
                verified += 1
                ctx.progress(k + 1)
        log.info(
            "copy done",
            extra={"source": spec.source_backup_point_uuid, "target": target.uuid, "copied": len(copied)},
        )
        return CopyResult(
            copied=tuple(sorted(m.backup_id for m in copied)),
            present=tuple(sorted(before)),
            chunks_sent=stats.chunks_sent,
            chunks_present=stats.chunks_present,
            bytes_sent=stats.bytes_sent,
            stored_bytes=stats.stored_bytes,
            verified=verified,
        )
