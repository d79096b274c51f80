"""Another agent's backup point as the source of a copy (agent/repo/copy.py):
its backups read over gRPC, agent to agent.

The copying agent connects to the other agent's TCP listener with its own
[grpc] settings: tls_client_ca as the CA that signed the other agent's
certificate, tls_cert/tls_key as its client certificate, and auth_token
as the bearer token, which a fleet shares. For each backup it reads the
index (the manifest, then every chunk's block digests) in one stream, and
each chunk it lacks with one call; the other agent checks every chunk
against its digest before sending it.

PeerSource has the part of Repository's interface a copy reads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import grpc

from agent.api.v1 import backups_pb2, backups_pb2_grpc
from agent.errors import BlockferryError, DataCorrupt, from_grpc
from agent.repo.format import ZERO, Manifest

MAX_MESSAGE = 80 << 20  # a chunk (at most 64 MiB) and its envelope


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def agent_channel(address: str, *, tls_ca: str, tls_cert: str, tls_key: str, options=None) -> grpc.Channel:
    """A TLS channel to another agent: tls_ca the CA that signed its
    certificate, tls_cert/tls_key this agent's client certificate (PEM files;
    "" for none)."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca), private_key=_read(tls_key), certificate_chain=_read(tls_cert)
    )
    return grpc.secure_channel(address, creds, options=options)


class PeerSource:
    def __init__(
        self,
        address: str,
        backup_point_uuid: str,
        *,
        tls_ca: str = "",
        tls_cert: str = "",
        tls_key: str = "",
        token: str = "",
        timeout: float = 60.0,
    ):
        self.address, self.backup_point_uuid, self.timeout = address, backup_point_uuid, timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = agent_channel(address, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, options=options)
        self.stub = backups_pb2_grpc.BackupServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self._lock = threading.Lock()
        self._where: dict[bytes, tuple[str, int]] = {}  # chunk id -> (backup, index), for get()
        stats = self._call(
            self.stub.GetRepositoryStats, backups_pb2.RepositoryStatsRequest(backup_point_uuid=backup_point_uuid)
        )
        self.id, self.chunk_size = stats.repository_id, stats.chunk_size

    def _error(self, e: grpc.RpcError) -> BlockferryError:
        return from_grpc(e.code(), e.details() or "", e.trailing_metadata(), where=f"agent {self.address}")

    def _call(self, fn, request):
        try:
            return fn(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _index(self, backup_id: str) -> Iterator[backups_pb2.BackupIndexPart]:
        req = backups_pb2.ReadBackupRequest(backup_point_uuid=self.backup_point_uuid, backup_uuid=backup_id)
        stream = self.stub.ReadBackupIndex(req, metadata=self.metadata)
        try:
            yield from stream
        except grpc.RpcError as e:
            raise self._error(e) from None
        finally:
            stream.cancel()

    # ---- what a copy reads ----

    def manifest(self, backup_id: str) -> Manifest:
        parts = self._index(backup_id)
        try:
            first = next(parts)
        finally:
            parts.close()
        m = Manifest.from_bytes(first.manifest, backup_id)
        with self._lock:
            for i, c in enumerate(m.chunks):
                if c != ZERO:
                    self._where.setdefault(bytes.fromhex(c), (backup_id, i))
        return m

    def manifests(self) -> list[Manifest]:
        listed = self._call(
            self.stub.ListBackups, backups_pb2.ListBackupsRequest(backup_point_uuid=self.backup_point_uuid)
        )
        return sorted((self.manifest(b.uuid) for b in listed.backups), key=lambda m: m.created_at)

    def shared(self, purpose: str, timeout: float = 0.0, checkpoint=None):
        return contextlib.nullcontext()  # the other agent holds its repository for each call

    def refresh(self) -> None:
        pass

    def block_reader(self, backup_id: str) -> _IndexReader:
        return _IndexReader(self._index(backup_id))

    def get(self, cid: bytes, out=None, record_buf=None) -> tuple[bytes, bytes]:
        with self._lock:
            where = self._where.get(cid)
        if where is None:
            raise DataCorrupt(f"agent {self.address}: chunk {cid.hex()} is in no backup read so far")
        backup_id, index = where
        req = backups_pb2.ReadChunksRequest(
            backup_point_uuid=self.backup_point_uuid, backup_uuid=backup_id, indexes=[index]
        )
        try:
            for part in self.stub.ReadChunks(req, metadata=self.metadata, timeout=self.timeout):
                return part.data, b""
        except grpc.RpcError as e:
            raise self._error(e) from None
        raise DataCorrupt(f"agent {self.address}: chunk {index} of backup {backup_id} did not come")

    def close(self) -> None:
        self.channel.close()


class _IndexReader:
    """A backup's block digests, chunk after chunk, from its index stream."""

    def __init__(self, parts: Iterator[backups_pb2.BackupIndexPart]):
        self.parts = parts
        next(parts)  # the manifest
        self.start, self.digests = 0, []

    def get(self, i: int, nblocks: int) -> bytes:
        while i >= self.start + len(self.digests):
            part = next(self.parts, None)
            if part is None:
                raise DataCorrupt(f"the index of a backup ended before chunk {i}")
            self.start, self.digests = part.first_chunk, list(part.block_digests)
        return self.digests[i - self.start][: nblocks * 32]
