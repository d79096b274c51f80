"""Prometheus metrics of the controller, on a loopback address
(`[controller] metrics_listen`; off when empty). Read from the database at
scrape time, except the task duration histogram, which the dispatcher feeds:

- blockferry_tasks{operation_type, status}: tasks in the database
- blockferry_task_duration_seconds{operation_type}: histogram of ended tasks
- blockferry_task_bytes_moved_total{operation_type}: bytes of succeeded backups, restores, clones
- blockferry_host_heartbeat_age_seconds{host, hostname}; blockferry_host_up{host, hostname}
- blockferry_backup_point_status{backup_point, status}: 1 for the state its agents last reported
- blockferry_vault_used_bytes{vault}, blockferry_vault_size_bytes{vault}
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from agent.controller.inventory import host_state, usage
from agent.controller.models import BackupPoint, Host, Task, Vault
from agent.metrics import DURATION_BUCKETS, STATUSES, loopback


class _Inventory:
    def __init__(self, db, cfg):
        self.db, self.cfg = db, cfg

    def collect(self):
        tasks = GaugeMetricFamily(
            "blockferry_tasks", "Tasks by operation and status", labels=["operation_type", "status"]
        )
        age = GaugeMetricFamily(
            "blockferry_host_heartbeat_age_seconds",
            "Seconds since the host's last heartbeat",
            labels=["host", "hostname"],
        )
        up = GaugeMetricFamily("blockferry_host_up", "1 while the host is online", labels=["host", "hostname"])
        bps = GaugeMetricFamily(
            "blockferry_backup_point_status",
            "1 for the backup point's reported state",
            labels=["backup_point", "status"],
        )
        used = GaugeMetricFamily(
            "blockferry_vault_used_bytes", "What the vault's backups added to the repository", labels=["vault"]
        )
        size = GaugeMetricFamily("blockferry_vault_size_bytes", "The vault's size", labels=["vault"])
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
            for bp in s.scalars(select(BackupPoint)):
                for st in (*STATUSES, "unknown"):
                    bps.add_metric([bp.uuid, st], 1.0 if bp.state == st else 0.0)
            for v in s.scalars(select(Vault)):
                used.add_metric([v.id], usage(s, v.id)[2])
                size.add_metric([v.id], v.size_gb << 30)
        yield from (tasks, age, up, bps, used, size)


class ControllerMetrics:
    def __init__(self, db, cfg):
        self.registry = CollectorRegistry()
        self.duration = Histogram(
            "blockferry_task_duration_seconds",
            "Duration of ended tasks",
            ["operation_type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.bytes = Counter(
            "blockferry_task_bytes_moved_total", "Bytes of succeeded tasks", ["operation_type"], registry=self.registry
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
