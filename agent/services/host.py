from __future__ import annotations

import socket

from agent import __version__
from agent.api.v1 import host_pb2, host_pb2_grpc
from agent.bindings import BindingStatus
from agent.jobs.engine import JobEngine
from agent.services.common import Auth, rpc


class HostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self, engine: JobEngine, auth: Auth, bindings: list[BindingStatus], roots: list[str]):
        self.engine = engine
        self.auth = auth
        self.bindings = bindings
        self.roots = roots

    @rpc
    def GetHostInfo(self, request, context):
        return host_pb2.HostInfo(
            version=__version__, hostname=socket.gethostname(),
            max_concurrent_jobs=self.engine.max_concurrent,
            bandwidth_limit_bytes_per_second=self.engine.limiter.rate,
            draining=self.engine.draining,
            bindings=[host_pb2.Binding(module=b.module, debian_package=b.package, ok=b.ok, error=b.error)
                      for b in self.bindings],
            roots=self.roots,
        )
