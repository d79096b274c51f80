"""The controller's agents: one channel per address (TLS and mutual TLS
for host:port agents), the agents' bearer token, and the typed client
(agent.client.AgentClient) on it for each host, whose errors keep the
agent's code and name the host; a call's deadline is 60 s unless it says
otherwise."""

from __future__ import annotations

import json
import threading

import grpc

from agent.api.v1 import backups_pb2
from agent.client import AgentClient
from agent.controller.config import ControllerConfig
from agent.controller.models import BackupPoint, Host

CALL_TIMEOUT = 60.0


class AgentClients:
    def __init__(self, cfg: ControllerConfig):
        self.cfg = cfg
        self._channels: dict[str, grpc.Channel] = {}
        self._clients: dict[tuple[str, str], AgentClient] = {}
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
                        read(self.cfg.agent_tls_ca),
                        read(self.cfg.agent_tls_key) if self.cfg.agent_tls_key else None,
                        read(self.cfg.agent_tls_cert) if self.cfg.agent_tls_cert else None,
                    )
                    ch = grpc.secure_channel(address, creds)
                self._channels[address] = ch
            return ch

    def client(self, host: Host) -> AgentClient:
        """The agent of a host, kept (its stubs cost more to build than a
        call; the channel is kept here, not by the client)."""
        key = (host.address, f"host {host.hostname or host.uuid}")
        c = self._clients.get(key)
        if c is None:
            c = AgentClient(
                channel=self._channel(host.address), token=self.cfg.agent_auth_token, where=key[1], timeout=CALL_TIMEOUT
            )
            with self._lock:
                self._clients[key] = c
        return c

    def close(self) -> None:
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            self._clients.clear()


def backup_point_env(bp: BackupPoint, secrets) -> dict:
    """A seed 000 backup point's env, unsealed (it holds its secrets)."""
    return json.loads(secrets.open(bp.env_sealed)) if bp.env_sealed else {}


def lock_until(bp: BackupPoint | None, secrets, retention_days: int, now: float) -> int:
    """When a policy's backup on a backup point with lock_days should be
    locked until: as long as the policy keeps it (its retention days),
    the agent adding lock_days as a floor; 0 when the backup point locks
    nothing or the policy keeps by count only (lock_days alone then)."""
    if bp is None or retention_days <= 0 or not int(backup_point_env(bp, secrets).get("lock_days", 0)):
        return 0
    return int(now + retention_days * 86400)


def backup_point_request(bp: BackupPoint, secrets) -> backups_pb2.AttachBackupPointRequest:
    """The agent-side definition of a seed 000 backup point."""
    env = backup_point_env(bp, secrets)
    req = backups_pb2.AttachBackupPointRequest(
        backup_point_uuid=bp.uuid,
        type=bp.btype,
        password=secrets.open(bp.password_sealed),
        port=int(env.get("port") or (bp.port or 0)),
        mount_port=int(env.get("mount_port", 0)),
        username=str(env.get("username", "")),
        secret=str(env.get("secret", "")),
        smb_encrypt=bool(env.get("smb_encrypt", False)),
        lun=int(env.get("lun", 0)),
        format_lun=bool(env.get("format_lun", False)),
        chunk_size=int(env.get("chunk_size", 0)),
        compression=str(env.get("compression", "")),
        bandwidth_limit=int(env.get("bandwidth_limit", 0)),
        lock_days=int(env.get("lock_days", 0)),
        lock_mode=str(env.get("lock_mode", "")),
    )
    sub = bp.sub_dir
    if bp.btype == "local":
        req.path = bp.root_dir.rstrip("/") + (f"/{sub}" if sub else "")
    elif bp.btype in ("disk", "fc"):
        req.device = bp.root_dir
    elif bp.btype == "iscsi":
        req.ip, req.target = bp.ip, bp.root_dir
    elif bp.btype == "s3":
        req.endpoint = str(env.get("endpoint") or f"https://{_url_host(bp.ip)}")
        req.bucket, req.sub_dir = bp.root_dir, sub
        req.region, req.part_size = str(env.get("region", "")), int(env.get("part_size", 0))
        req.port = 0
    else:
        req.ip, req.root_dir, req.sub_dir = bp.ip, bp.root_dir, sub
    return req


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
