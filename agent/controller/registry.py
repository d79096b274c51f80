"""The agent registry (gRPC, served by the controller): agents register with
their facts, pools and backup points, then send heartbeats. A host is
online while its last heartbeat is younger than host_dead_after."""

from __future__ import annotations

import hmac
import json
import logging
import time
from concurrent import futures

import grpc
from google.protobuf.json_format import MessageToDict
from sqlalchemy import select

from agent import __version__
from agent.api.v1 import registry_pb2, registry_pb2_grpc
from agent.controller.config import ControllerConfig
from agent.controller.db import Database
from agent.controller.models import BackupPoint, Host

log = logging.getLogger("controller.registry")

# The oldest agent API level (agent.API_LEVEL) this controller works with.
# Raise it only when the dispatcher relies on something older agents lack;
# the upgrade order in docs/operator-guide.md (controller first, then agents) keeps it safe.
MIN_AGENT_API_LEVEL = 1


def _pool_reports(items) -> str:
    """Every field of each report, defaults and all (health.py reads them)."""
    return json.dumps(
        [
            {
                "pool_uuid": x.pool_uuid,
                "type": x.type,
                "status": x.status,
                "reason": x.reason,
                "total_bytes": x.total_bytes,
                "available_bytes": x.available_bytes,
                "metadata_owner": x.metadata_owner,
                "live_hosts": list(x.live_hosts),
                "lapsed_hosts": list(x.lapsed_hosts),
            }
            for x in items
        ]
    )


def _backup_point_reports(items) -> str:
    return json.dumps(
        [
            {
                "backup_point_uuid": x.backup_point_uuid,
                "type": x.type,
                "status": x.status,
                "reason": x.reason,
                "error_code": x.error_code,
                "total_bytes": x.total_bytes,
                "available_bytes": x.available_bytes,
                "attached": x.attached,
            }
            for x in items
        ]
    )


def _vms(vms) -> str:
    """Every field, defaults too (MessageToDict leaves out an empty string or false)."""
    return json.dumps(
        [
            {
                "UUID": vm.uuid,
                "Name": vm.name,
                "State": vm.state,
                "GuestAgent": vm.guest_agent,
                "Manager": vm.manager or "qemu",
                "Disks": [
                    {"Device": d.device, "File": d.file, "PoolUUID": d.pool_uuid, "VolumeUUID": d.volume_uuid}
                    for d in vm.disks
                ],
            }
            for vm in vms
        ]
    )


class Registry(registry_pb2_grpc.AgentRegistryServicer):
    def __init__(self, cfg: ControllerConfig, db: Database):
        self.cfg = cfg
        self.db = db

    def _auth(self, context) -> None:
        if not self.cfg.agent_token:
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.cfg.agent_token}".encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED: missing or wrong agent token")

    def Register(self, request, context):
        self._auth(context)
        import uuid as uuidlib

        try:
            host_uuid = str(uuidlib.UUID(request.host_uuid))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT: host_uuid: not a uuid")
        level = request.facts.api_level or 1
        if level < MIN_AGENT_API_LEVEL:
            log.warning(
                "agent refused: API level too old",
                extra={"host_uuid": host_uuid, "version": request.facts.version, "api_level": level},
            )
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"FAILED_PRECONDITION: facts.api_level: agent {request.facts.version or '?'} speaks API "
                f"level {level}, this controller ({__version__}) needs {MIN_AGENT_API_LEVEL} or newer: "
                "upgrade blockferry on this host",
            )
        now = time.time()
        facts = MessageToDict(request.facts, preserving_proto_field_name=True)
        with self.db.session() as s:
            h = s.get(Host, host_uuid) or Host(uuid=host_uuid, registered_at=now)
            h.hostname = request.facts.hostname
            h.address = request.address
            h.version = request.facts.version
            h.facts_json = json.dumps(facts)
            h.pools_json = _pool_reports(request.pools)
            h.backup_points_json = _backup_point_reports(request.backup_points)
            h.max_jobs = request.max_concurrent_jobs or 4
            h.cluster_uuid, h.zone_uuid = request.cluster_uuid.lower(), request.zone_uuid.lower()
            h.zone_name = request.zone_name[:64]
            h.running_jobs = 0
            h.draining = False
            h.last_seen = now
            s.merge(h)
        log.info(
            "agent registered",
            extra={"host_uuid": host_uuid, "hostname": request.facts.hostname, "address": request.address},
        )
        return registry_pb2.RegisterResponse(heartbeat_interval_seconds=self.cfg.heartbeat_interval)

    def Heartbeat(self, request, context):
        self._auth(context)
        with self.db.session() as s:
            h = s.get(Host, request.host_uuid)
            if h is None:
                return registry_pb2.HeartbeatResponse(reregister=True)
            h.last_seen = time.time()
            h.running_jobs = request.running_jobs
            h.draining = request.draining
            h.pools_json = _pool_reports(request.pools)
            h.backup_points_json = _backup_point_reports(request.backup_points)
            h.vms_json = _vms(request.vms)
            # attached by us, deleted since: the agent drops its definition (and secret)
            attached = {p.backup_point_uuid for p in request.backup_points if p.attached}
            gone = sorted(attached - set(s.scalars(select(BackupPoint.uuid).where(BackupPoint.uuid.in_(attached)))))
        return registry_pb2.HeartbeatResponse(reregister=False, detach_backup_point_uuids=gone)


def serve(cfg: ControllerConfig, db: Database) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    registry_pb2_grpc.add_AgentRegistryServicer_to_server(Registry(cfg, db), server)
    addr = cfg.grpc_listen
    if addr.startswith("unix:") or not cfg.grpc_tls_cert:
        host = addr.rpartition(":")[0].strip("[]")
        if not addr.startswith("unix:") and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the agent registry listens without TLS on a network address; set grpc_tls_cert and "
                "grpc_tls_key (and grpc_client_ca for mutual TLS) in production",
                extra={"listen": addr},
            )
        server.add_insecure_port(addr)
    else:
        with open(cfg.grpc_tls_cert, "rb") as f:
            cert = f.read()
        with open(cfg.grpc_tls_key, "rb") as f:
            key = f.read()
        ca = None
        if cfg.grpc_client_ca:
            with open(cfg.grpc_client_ca, "rb") as f:
                ca = f.read()
        server.add_secure_port(
            addr, grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        )
    server.start()
    return server
