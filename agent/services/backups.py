from __future__ import annotations

import threading
import time

from agent.api.v1 import backups_pb2, backups_pb2_grpc
from agent.backup_points import BackupPoints
from agent.errors import FailedPrecondition, InvalidArgument
from agent.exports import Exports
from agent.jobs.engine import JobEngine
from agent.kinds.backups import backup_point_resource
from agent.repo import holds
from agent.repo.catalog import BackupFilter, list_backups
from agent.repo.format import BLOCK_SIZE, ZERO, Manifest
from agent.services.common import Auth, exclusive, rpc
from agent.volumes.base import check_uuid


def backup_to_pb(bp_uuid: str, m: Manifest, lock: holds.Lock | None = None) -> backups_pb2.Backup:
    locked = lock is not None and lock.until > time.time()
    return backups_pb2.Backup(
        uuid=m.backup_id,
        backup_point_uuid=bp_uuid,
        volume_uuid=m.volume_uuid,
        snapshot_uuid=m.snapshot_uuid,
        snapshot_name=m.snapshot_name,
        pool_uuid=m.pool_uuid,
        size=m.size,
        data_bytes=m.data_bytes,
        image_digest=m.image_digest,
        created_at=m.created_at,
        parent_backup_uuid=m.parent or "",
        name=m.name,
        description=m.description,
        tenant=m.tenant,
        mode=m.mode,
        format_version=m.format_version,
        agent_version=m.agent_version,
        chunk_size=m.chunk_size,
        mode_reason=m.mode_reason,
        consistency=m.vm.consistency if m.vm else "",
        vm_definition=m.vm.definition if m.vm else "",
        locked_until=lock.until if locked else 0,
        lock_mode=lock.mode if locked else "",
    )


INDEX_WINDOW = 256  # chunks' block digests per BackupIndexPart (4 MiB chunks: 512 KiB)
CHUNK_LISTS = 16  # backups whose chunk lists ReadChunks keeps


class BackupService(backups_pb2_grpc.BackupServiceServicer):
    def __init__(self, points: BackupPoints, engine: JobEngine, auth: Auth, exports: Exports | None = None):
        self.points = points
        self.engine = engine
        self.auth = auth
        self.exports = exports
        self._chunk_lock = threading.Lock()
        self._chunk_lists: dict[tuple[str, str, str], list[str]] = {}  # oldest first

    def _exports(self) -> Exports:
        if self.exports is None:
            raise FailedPrecondition("exports: this agent serves no exports")
        return self.exports

    @rpc
    def ExportBackup(self, request, context):
        e = self._exports().export(request.backup_point_uuid, request.backup_uuid, int(request.lease_seconds or 3600))
        return _export_pb(e)

    @rpc
    def UnexportBackup(self, request, context):
        self._exports().unexport(request.export_id)
        return backups_pb2.UnexportBackupResponse()

    @rpc
    def ListExports(self, request, context):
        return backups_pb2.ListExportsResponse(exports=[_export_pb(e) for e in self._exports().list()])

    @rpc
    def ListBackups(self, request, context):
        repo = self.points.get(request.backup_point_uuid).repository()
        flt = BackupFilter(
            volume_uuid=request.volume_uuid,
            snapshot_uuid=request.snapshot_uuid,
            name=request.name,
            description=request.description,
            tenant=request.tenant,
            created_after=request.created_after,
            created_before=request.created_before,
        )
        locks = holds.all_locks(repo)
        return backups_pb2.ListBackupsResponse(
            backups=[
                backup_to_pb(request.backup_point_uuid, m, locks.get(m.backup_id)) for m in list_backups(repo, flt)
            ]
        )

    @rpc
    def GetBackup(self, request, context):
        repo = self.points.get(request.backup_point_uuid).repository()
        m = repo.manifest(check_uuid(request.backup_uuid, "backup_uuid"))
        return backup_to_pb(request.backup_point_uuid, m, holds.lock_of(repo, m.backup_id))

    @rpc
    def DeleteBackup(self, request, context):
        repo = self.points.get(request.backup_point_uuid).repository()
        bid = check_uuid(request.backup_uuid, "backup_uuid")
        # not while a verify of this backup runs, nor while a gc job runs here
        with exclusive(self.engine.locks, f"{backup_point_resource(request.backup_point_uuid)}/{bid}"):
            with repo.shared("delete", timeout=0):
                holds.check_delete(repo, bid)
                repo.delete_backup(bid)
        return backups_pb2.DeleteBackupResponse()

    @rpc
    def LockBackup(self, request, context):
        bp = self.points.get(request.backup_point_uuid)
        repo = bp.repository()
        bid = check_uuid(request.backup_uuid, "backup_uuid")
        with repo.shared("lock", timeout=0):  # not while a gc runs
            lock = holds.extend(repo, bid, float(request.until), mode=bp.section.lock_mode)
            return backup_to_pb(request.backup_point_uuid, repo.manifest(bid), lock)

    @rpc
    def ReadBackupIndex(self, request, context):
        repo = self.points.get(request.backup_point_uuid).repository()
        bid = check_uuid(request.backup_uuid, "backup_uuid")
        with repo.shared("copy", timeout=0):  # not while a gc runs
            repo.refresh()
            m = repo.manifest(bid)
            yield backups_pb2.BackupIndexPart(manifest=m.to_bytes())
            reader, cs = repo.block_reader(bid), m.chunk_size
            for start in range(0, len(m.chunks), INDEX_WINDOW):
                digests = []
                for i in range(start, min(start + INDEX_WINDOW, len(m.chunks))):
                    length = min(cs, m.size - i * cs)
                    digests.append(bytes(reader.get(i, (length + BLOCK_SIZE - 1) // BLOCK_SIZE)))
                yield backups_pb2.BackupIndexPart(first_chunk=start, block_digests=digests)

    @rpc
    def ReadChunks(self, request, context):
        """No repository lock per call (on S3 that is two requests a chunk):
        the copying agent holds the index stream, whose shared lock keeps
        gc away; a chunk whose pack went anyway is a read error, never
        wrong data."""
        repo = self.points.get(request.backup_point_uuid).repository()
        bid = check_uuid(request.backup_uuid, "backup_uuid")
        chunks = self._chunks(request.backup_point_uuid, repo, bid)
        for i in request.indexes:
            if not 0 <= i < len(chunks) or chunks[i] == ZERO:
                raise InvalidArgument(f"indexes: {i} is not a data chunk of backup {bid}", field="indexes")
            cid = bytes.fromhex(chunks[i])
            if repo.location(cid) is None:
                repo.refresh()  # packs committed since this agent last looked
            data, _ = repo.get(cid)  # checked against its digest
            yield backups_pb2.ChunkData(index=i, data=bytes(data))

    def _chunks(self, bp_uuid: str, repo, bid: str) -> list[str]:
        """A backup's chunk list, kept for the next calls of a copy (one per
        chunk): a manifest read for each would make a copy quadratic."""
        key = (bp_uuid, repo.id, bid)
        with self._chunk_lock:
            chunks = self._chunk_lists.get(key)
        if chunks is None:
            chunks = repo.manifest(bid).chunks
            with self._chunk_lock:
                self._chunk_lists[key] = chunks
                while len(self._chunk_lists) > CHUNK_LISTS:
                    self._chunk_lists.pop(next(iter(self._chunk_lists)))
        return chunks

    @rpc
    def GetRepositoryStats(self, request, context):
        bp = self.points.get(request.backup_point_uuid)
        repo = bp.repository()
        repo.refresh()
        s = repo.stats()
        st = repo.store.stats()
        return backups_pb2.RepositoryStats(
            backup_point_uuid=bp.uuid,
            repository_id=repo.id,
            format_version=repo.config["format_version"],
            encrypted=repo.sealer.encrypted,
            chunk_size=repo.chunk_size,
            backups=s.backups,
            chunks=s.chunks,
            logical_bytes=s.logical_bytes,
            unique_bytes=s.unique_bytes,
            stored_bytes=s.stored_bytes,
            packs=s.packs,
            total_bytes=st.total_bytes,
            available_bytes=st.available_bytes,
        )

    @rpc
    def ListBackupPoints(self, request, context):
        return backups_pb2.ListBackupPointsResponse(backup_points=[_health_pb(bp.check()) for bp in self.points.all()])

    @rpc
    def CheckBackupPoint(self, request, context):
        return _health_pb(self.points.get(request.backup_point_uuid).check())

    @rpc
    def AttachBackupPoint(self, request, context):
        bp = self.points.attach(request.backup_point_uuid, _section_from(request))
        self.engine.limits.set(f"backup_point:{bp.uuid}", bp.section.bandwidth_limit)
        return _health_pb(bp.check())

    @rpc
    def DetachBackupPoint(self, request, context):
        self.points.detach_unused(request.backup_point_uuid, self.engine)
        return backups_pb2.DetachBackupPointResponse()

    @rpc
    def ReconnectBackupPoint(self, request, context):
        from agent.errors import Busy
        from agent.jobs.model import JobState

        bp = self.points.get(request.backup_point_uuid)
        # not under a running job of this backup point: its sessions are in use
        busy = [
            j.id for j in self.engine.list({JobState.RUNNING}) if getattr(j.spec, "backup_point_uuid", "") == bp.uuid
        ]
        if busy:
            raise Busy(
                f"backup_point_uuid: jobs {', '.join(busy)} are using {bp.label}; reconnect when they end",
                field="backup_point_uuid",
            )
        return _health_pb(bp.reconnect())


def _health_pb(h) -> backups_pb2.BackupPointStatus:
    return backups_pb2.BackupPointStatus(
        backup_point_uuid=h.uuid,
        type=h.type,
        location=h.location,
        status=h.status,
        total_bytes=h.total_bytes,
        used_bytes=h.used_bytes,
        available_bytes=h.available_bytes,
        latency_ms=h.latency_ms,
        repository=h.repository,
        error_code=h.error_code,
        error=h.error,
        object_lock=h.object_lock,
    )


def _export_pb(e) -> backups_pb2.BackupExport:
    return backups_pb2.BackupExport(
        export_id=e.export_id,
        backup_point_uuid=e.backup_point_uuid,
        backup_uuid=e.backup_uuid,
        uri=e.uri,
        socket=e.socket,
        size=e.size,
        expires_at=e.expires_at,
    )


def _section_from(request):
    from agent.config import BackupPointSection

    base = BackupPointSection()
    return BackupPointSection(
        type=request.type,
        path=request.path,
        ip=request.ip,
        port=request.port,
        mount_port=request.mount_port,
        root_dir=request.root_dir,
        sub_dir=request.sub_dir,
        username=request.username,
        secret=request.secret,
        smb_encrypt=request.smb_encrypt,
        endpoint=request.endpoint,
        bucket=request.bucket,
        region=request.region,
        part_size=request.part_size or base.part_size,
        target=request.target,
        lun=request.lun,
        device=request.device,
        format_lun=request.format_lun,
        password=request.password,
        chunk_size=request.chunk_size or base.chunk_size,
        compression=request.compression or base.compression,
        bandwidth_limit=max(0, request.bandwidth_limit),
        lock_days=request.lock_days,
        lock_mode=request.lock_mode or base.lock_mode,
        timeout=base.timeout,
        initialize=True,
    )
