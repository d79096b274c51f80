"""Prometheus metrics of the controller, on a loopback address
(`[controller] metrics_listen`; off when empty), by Prometheus's naming
conventions (docs/metrics.md). Read from the database at scrape time,
except the task duration histogram and moved bytes, which the dispatcher
feeds:

- blockferry_build_info{component, version}; process_* and python_* of the process
- blockferry_tasks{operation_type, status}: tasks in the database
- blockferry_task_duration_seconds{operation_type}: histogram of ended tasks
- blockferry_task_moved_bytes_total{operation_type}: bytes of succeeded backups, restores, clones
- blockferry_host_heartbeat_age_seconds{host, hostname}; blockferry_host_up{host, hostname}
- blockferry_backup_point_state{backup_point, name, type, state}: 1 for the fleet's judgement
  from the hosts' heartbeats (health.py; unknown when no online host reports it)
- blockferry_backup_point_capacity_bytes, ..._available_bytes{backup_point, name}
- blockferry_pool_state{pool, name, type, state}
- blockferry_volume_last_backup_timestamp_seconds{volume, name, pool, tenant}: the newest
  succeeded backup's snapshot time
- blockferry_vault_last_backup_timestamp_seconds{vault, name, tenant}
- blockferry_vault_used_bytes{vault, name}, blockferry_vault_size_bytes{vault, name}
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from agent.controller.health import STATES, Fleet, host_state
from agent.controller.inventory import usage
from agent.controller.models import Backup, BackupPoint, Host, Pool, Task, Vault, Volume
from agent.metrics import DURATION_BUCKETS, loopback, new_registry

SUCCEEDED = "BackupSucceeded"


class _Inventory:
    def __init__(self, db, cfg):
        self.db, self.cfg = db, cfg

    def collect(self):
        def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(labels))

        tasks = gauge("blockferry_tasks", "Tasks by operation and status", "operation_type", "status")
        age = gauge(
            "blockferry_host_heartbeat_age_seconds", "Seconds since the host's last heartbeat", "host", "hostname"
        )
        up = gauge("blockferry_host_up", "1 while the host is online", "host", "hostname")
        bp_state = gauge(
            "blockferry_backup_point_state",
            "1 for the backup point's state from every host's heartbeats",
            "backup_point",
            "name",
            "type",
            "state",
        )
        bp_total = gauge(
            "blockferry_backup_point_capacity_bytes", "Its size, as hosts report it", "backup_point", "name"
        )
        bp_free = gauge("blockferry_backup_point_available_bytes", "Its free space", "backup_point", "name")
        pool_state = gauge(
            "blockferry_pool_state",
            "1 for the pool's state from every host's heartbeats",
            "pool",
            "name",
            "type",
            "state",
        )
        vol_last = gauge(
            "blockferry_volume_last_backup_timestamp_seconds",
            "When the snapshot of the volume's newest succeeded backup was taken",
            "volume",
            "name",
            "pool",
            "tenant",
        )
        vault_last = gauge(
            "blockferry_vault_last_backup_timestamp_seconds",
            "When the newest succeeded backup of the vault was taken",
            "vault",
            "name",
            "tenant",
        )
        used = gauge("blockferry_vault_used_bytes", "What the vault's backups added to the repository", "vault", "name")
        size = gauge("blockferry_vault_size_bytes", "The vault's size", "vault", "name")
        now = time.time()
        with self.db.session() as s:
            for op, status, n in s.execute(
                select(Task.operation_type, Task.status, func.count()).group_by(Task.operation_type, Task.status)
            ):
                tasks.add_metric([op, status], n)
            for h in s.scalars(select(Host)):
                age.add_metric([h.uuid, h.hostname], max(0.0, now - h.last_seen))
                offline = host_state(h, self.cfg.host_dead_after, now) == "offline"
                up.add_metric([h.uuid, h.hostname], 0.0 if offline else 1.0)
            fleet = Fleet(s, self.cfg.host_dead_after, now)
            for bp in s.scalars(select(BackupPoint)):
                health = fleet.backup_point(bp.uuid)
                for st in STATES:
                    bp_state.add_metric([bp.uuid, bp.name, bp.btype, st], 1.0 if health.state == st else 0.0)
                bp_total.add_metric([bp.uuid, bp.name], health.total_bytes)
                bp_free.add_metric([bp.uuid, bp.name], health.available_bytes)
            for p in s.scalars(select(Pool)):
                health = fleet.pool(p.uuid)
                for st in STATES:
                    pool_state.add_metric([p.uuid, p.name, p.kind, st], 1.0 if health.state == st else 0.0)
            newest = (
                select(Backup.volume_uuid, func.max(Backup.ctime))
                .where(Backup.status == SUCCEEDED)
                .group_by(Backup.volume_uuid)
            )
            for vid, at in s.execute(newest):
                vol = s.get(Volume, vid)
                if vol is not None:  # a deleted volume's backups stay, but nobody alerts on it
                    vol_last.add_metric([vid, vol.name, vol.pool_uuid, vol.tenant], float(at))
            for v in s.scalars(select(Vault)):
                at = s.scalar(select(func.max(Backup.ctime)).where(Backup.vault_id == v.id, Backup.status == SUCCEEDED))
                if at:
                    vault_last.add_metric([v.id, v.name, v.tenant], float(at))
                used.add_metric([v.id, v.name], usage(s, v.id)[2])
                size.add_metric([v.id, v.name], v.size_gb << 30)
        yield from (tasks, age, up, bp_state, bp_total, bp_free, pool_state, vol_last, vault_last, used, size)


class ControllerMetrics:
    def __init__(self, db, cfg):
        self.registry = new_registry("controller")
        self.duration = Histogram(
            "blockferry_task_duration_seconds",
            "Duration of ended tasks",
            ["operation_type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes = Counter(
            "blockferry_task_moved_bytes_total", "Bytes of succeeded tasks", ["operation_type"], registry=self.registry
        )
        self.registry.register(_Inventory(db, cfg))
        self._server = None

    def task_ended(self, operation: str, status: str, seconds: float, result: dict) -> None:
        self.duration.labels(operation).observe(max(seconds, 0.0))
        if status == "success":
            moved = int(result.get("read_bytes") or result.get("written_bytes") or 0) or sum(
                int(b.get("read_bytes", 0))
                for b in result.get("backups", [])  # a vm_backup: one per disk
            )
            if moved:
                self.bytes.labels(operation).inc(moved)

    def serve(self, listen: str) -> int:
        host, port = loopback(listen, "controller.metrics_listen")
        self._server, _ = start_http_server(port, host, registry=self.registry)
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
