"""Channels to the other agents of a fleet: TLS with this agent's [grpc]
client settings (tls_client_ca as the CA that signed the other agents'
certificates, tls_cert/tls_key as this agent's client certificate) and
the fleet's auth_token as the bearer token. One channel per address,
kept for the agent's life."""

from __future__ import annotations

import threading

import grpc

from agent.config import GrpcSection


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class FleetChannels:
    def __init__(self, grpc_cfg: GrpcSection):
        self.cfg = grpc_cfg
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    @property
    def usable(self) -> bool:
        """Whether this agent can reach others (it has a client certificate)."""
        return bool(self.cfg.tls_cert)

    @property
    def metadata(self) -> list[tuple[str, str]] | None:
        return [("authorization", f"Bearer {self.cfg.auth_token}")] if self.cfg.auth_token else None

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_read(self.cfg.tls_client_ca),
                    private_key=_read(self.cfg.tls_key),
                    certificate_chain=_read(self.cfg.tls_cert),
                )
                ch = self._channels[address] = grpc.secure_channel(address, creds)
        return ch
