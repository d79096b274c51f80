"""Channels to the other agents of a fleet: TLS with this agent's [grpc]
client settings (tls_client_ca as the CA that signed the other agents'
certificates, tls_cert/tls_key as this agent's client certificate) and
the fleet's auth_token as the bearer token. One channel per address,
kept for the agent's life; call() maps another agent's error to ours."""

from __future__ import annotations

import threading

import grpc

from agent.config import GrpcSection
from agent.errors import from_grpc
from agent.peer import agent_channel


class FleetChannels:
    def __init__(self, grpc_cfg: GrpcSection):
        self.cfg = grpc_cfg
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    @property
    def usable(self) -> bool:
        """Whether this agent can reach others (it has a client certificate)."""
        return bool(self.cfg.tls_cert)

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                c = self.cfg
                ch = agent_channel(address, tls_ca=c.tls_client_ca, tls_cert=c.tls_cert, tls_key=c.tls_key)
                self._channels[address] = ch
        return ch

    def call(self, stub_class, address: str, method: str, request, *, timeout: float, where: str):
        """stub_class(channel to address).method(request) with the fleet's
        token; another agent's error comes back as ours, prefixed by where."""
        stub = stub_class(self.channel(address))
        metadata = [("authorization", f"Bearer {self.cfg.auth_token}")] if self.cfg.auth_token else None
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise from_grpc(e.code(), e.details() or "", e.trailing_metadata(), where=where) from None
