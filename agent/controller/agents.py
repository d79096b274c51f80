"""Calls from the controller to agents, at the address each registered:
one channel per address, TLS (and mutual TLS) for host:port agents, the
agents' bearer token, a deadline on every call. An agent's error keeps its
code; an agent that does not answer is TARGET_UNREACHABLE naming the host."""
from __future__ import annotations

import threading

import grpc

from agent import errors
from agent.api.v1 import backups_pb2_grpc, host_pb2_grpc, jobs_pb2_grpc, volumes_pb2_grpc
from agent.controller.config import ControllerConfig

STUBS = {"volumes": volumes_pb2_grpc.VolumeServiceStub, "jobs": jobs_pb2_grpc.JobServiceStub,
         "host": host_pb2_grpc.HostServiceStub, "backups": backups_pb2_grpc.BackupServiceStub}


class AgentClients:
    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _channel(self, address: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                if address.startswith("unix:") or not self.cfg.agent_tls_ca:
                    ch = grpc.insecure_channel(address)
                else:
                    def read(path):
                        with open(path, "rb") as f:
                            return f.read()
                    creds = grpc.ssl_channel_credentials(
                        read(self.cfg.agent_tls_ca), read(self.cfg.agent_tls_key) if self.cfg.agent_tls_key else None,
                        read(self.cfg.agent_tls_cert) if self.cfg.agent_tls_cert else None)
                    ch = grpc.secure_channel(address, creds)
                self._channels[address] = ch
            return ch

    def call(self, host, service: str, method: str, request, *, timeout: float = 60.0):
        stub = STUBS[service](self._channel(host.address))
        metadata = [("authorization", f"Bearer {self.cfg.agent_auth_token}")] if self.cfg.agent_auth_token else []
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise agent_error(host, e) from None

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()


def agent_error(host, e: grpc.RpcError) -> errors.BlockferryError:
    details = e.details() or ""
    code, sep, message = details.partition(": ")
    name = host.hostname or host.uuid
    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not (sep and code.isupper()):
        return errors.TargetUnreachable(f"host {name}: the agent does not answer ({e.code().name})",
                                        field="host_uuid")
    if sep and code.replace("_", "").isalpha() and code.isupper():
        return errors.from_code(code, f"host {name}: {message}")
    return errors.BlockferryError(f"host {name}: {e.code().name}")
