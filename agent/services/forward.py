"""Volume changes of a shared LUN pool asked of a host that is not its
metadata owner: passed on, unchanged, to the owner's agent.

Only the owner writes a shared pool's slice table, so a CreateVolume or a
snapshot asked here goes to the agent whose address the owner lease
carries, over TLS with this agent's [grpc] client settings (tls_client_ca
as the CA that signed the owner's certificate, tls_cert/tls_key, the
fleet's auth_token), as agent/peer.py does for copies. The owner's answer,
or its error, is this call's. Before a change of a volume's head is passed
on, this host's own VMs are asked (the owner cannot see them): a VM here
that has the head open makes it IN_USE.
"""

from __future__ import annotations

import threading

import grpc

from agent.api.v1 import volumes_pb2_grpc
from agent.config import GrpcSection
from agent.errors import FailedPrecondition, from_grpc

TIMEOUT = 600.0  # a snapshot of a large volume, a delete that rebases


class OwnerForward:
    def __init__(self, grpc_cfg: GrpcSection):
        self.cfg = grpc_cfg
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def _read(self, path: str) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    def _stub(self, address: str) -> volumes_pb2_grpc.VolumeServiceStub:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=self._read(self.cfg.tls_client_ca),
                    private_key=self._read(self.cfg.tls_key),
                    certificate_chain=self._read(self.cfg.tls_cert),
                )
                ch = self._channels[address] = grpc.secure_channel(address, creds)
        return volumes_pb2_grpc.VolumeServiceStub(ch)

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
        if not address or not self.cfg.tls_cert:
            raise FailedPrecondition(
                f"pool_uuid: this host is not the metadata owner of pool {pool.pool_uuid}"
                + (f" (host {owner} is)" if owner else " (none holds the lease yet)")
                + "; volumes are created and changed there"
                + ("" if address else " (the owner gives no address to pass the change on to)"),
                field="pool_uuid",
            )
        metadata = [("authorization", f"Bearer {self.cfg.auth_token}")] if self.cfg.auth_token else None
        try:
            return getattr(self._stub(address), method)(request, metadata=metadata, timeout=TIMEOUT)
        except grpc.RpcError as e:
            raise from_grpc(e.code(), e.details() or "", e.trailing_metadata(), where=f"owner {owner}") from None

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
