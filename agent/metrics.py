"""Prometheus metrics of the agent, served on a loopback address
(`[metrics] listen`; off when empty), by Prometheus's naming conventions
(units last, counters end in _total, no _created series; docs/metrics.md):

- blockferry_build_info{component, version}; process_* and python_* of the process
- blockferry_jobs_ended_total{kind, state}: jobs that ended (succeeded, failed, cancelled)
- blockferry_jobs_running{kind}
- blockferry_job_duration_seconds{kind}: histogram of ended jobs
- blockferry_job_moved_bytes_total{kind}: bytes jobs read or wrote (their progress)
- blockferry_job_throughput_bytes_per_second{kind}: of the last job of that kind that ended
- blockferry_agent_backup_point_state{backup_point, location, type, state}: 1 for this host's
  probe of it (healthy, degraded, unreachable, auth_failed), at most every HEALTH_EVERY seconds
- blockferry_agent_backup_point_latency_seconds, ..._available_bytes{backup_point, location}

The controller's blockferry_backup_point_state is the fleet's judgement
from every host's heartbeats; these are one host's view.

The endpoint has no authentication, so it binds only to loopback; a node
exporter or a local Prometheus agent scrapes it.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from types import SimpleNamespace

import prometheus_client
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

from agent import __version__
from agent.errors import ConfigError

log = logging.getLogger("agent.metrics")

# a counter's _created series reads like a count on dashboards; none of ours is needed
prometheus_client.disable_created_metrics()

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, float("inf"))
HEALTH_EVERY = 30.0
STATUSES = ("healthy", "degraded", "unreachable", "auth_failed")
ENDED = ("succeeded", "failed", "cancelled")  # a job's final states


def new_registry(component: str) -> CollectorRegistry:
    """A registry with blockferry_build_info and the process's own metrics
    (CPU, memory, open files, Python's GC), as both daemons serve them."""
    r = CollectorRegistry()
    for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        r.register(c)
    info = Gauge("blockferry_build_info", "1, labelled with the running version", ["component", "version"], registry=r)
    info.labels(component, __version__).set(1)
    return r


def loopback(listen: str, field: str) -> tuple[str, int]:
    """host:port, the host a loopback address (the endpoint has no auth)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        ok = ipaddress.ip_address(host).is_loopback and port.isdigit() and 0 <= int(port) < 65536
    except ValueError:
        ok = host == "localhost" and port.isdigit()
    if not ok:
        raise ConfigError(
            f"{field}: {listen!r} must be a loopback host:port such as 127.0.0.1:9464 (metrics have no authentication)",
            field=field,
        )
    return host, int(port)


class _BackupPoints:
    """Backup point health at scrape time, from a cached check."""

    def __init__(self, points):
        self.points = points
        self._cache: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def _health(self, bp):
        with self._lock:
            at, h = self._cache.get(bp.uuid, (0.0, None))
        if h is None or time.monotonic() - at > HEALTH_EVERY:
            try:
                h = bp.check()
            except Exception as e:  # one bad probe must not fail the scrape
                log.warning("backup point probe failed", extra={"backup_point_uuid": bp.uuid, "error": str(e)})
                h = SimpleNamespace(
                    uuid=bp.uuid,
                    location=bp.label,
                    type=bp.section.type,
                    status="unreachable",
                    latency_ms=0.0,
                    available_bytes=0,
                )
            with self._lock:
                self._cache[bp.uuid] = (time.monotonic(), h)
        return h

    def collect(self):
        labels = ["backup_point", "location"]
        state = GaugeMetricFamily(
            "blockferry_agent_backup_point_state",
            "1 for this host's probe of the backup point",
            labels=[*labels, "type", "state"],
        )
        latency = GaugeMetricFamily(
            "blockferry_agent_backup_point_latency_seconds", "One metadata round trip", labels=labels
        )
        avail = GaugeMetricFamily("blockferry_agent_backup_point_available_bytes", "Free space", labels=labels)
        for bp in self.points.all():
            h = self._health(bp)
            for s in STATUSES:
                state.add_metric([h.uuid, bp.location, h.type, s], 1.0 if h.status == s else 0.0)
            latency.add_metric([h.uuid, bp.location], h.latency_ms / 1000)
            avail.add_metric([h.uuid, bp.location], h.available_bytes)
        yield state
        yield latency
        yield avail


class AgentMetrics:
    """Observes the job engine (started/ended) and backup point health."""

    def __init__(self, points=None, kinds: list[str] | None = None):
        self.registry = new_registry("agent")
        r = self.registry
        self.jobs = Counter(
            "blockferry_jobs_ended_total", "Jobs that ended, by kind and final state", ["kind", "state"], registry=r
        )
        self.running = Gauge("blockferry_jobs_running", "Jobs running now", ["kind"], registry=r)
        self.duration = Histogram(
            "blockferry_job_duration_seconds", "Duration of ended jobs", ["kind"], buckets=DURATION_BUCKETS, registry=r
        )
        self.bytes = Counter("blockferry_job_moved_bytes_total", "Bytes jobs read or wrote", ["kind"], registry=r)
        self.throughput = Gauge(
            "blockferry_job_throughput_bytes_per_second",
            "Average throughput of the last ended job of a kind",
            ["kind"],
            registry=r,
        )
        for kind in kinds or ():  # every series from the start: increase() sees a first failure
            for state in ENDED:
                self.jobs.labels(kind, state)
            self.running.labels(kind)
            self.bytes.labels(kind)
        if points is not None:
            r.register(_BackupPoints(points))
        self._server = None

    def job_started(self, kind: str) -> None:
        self.running.labels(kind).inc()

    def job_paused(self, kind: str) -> None:  # interrupted, waiting to resume
        self.running.labels(kind).dec()

    def job_ended(self, kind: str, state: str, seconds: float, moved: int, *, was_running: bool = True) -> None:
        if was_running:
            self.running.labels(kind).dec()
        self.jobs.labels(kind, state).inc()
        self.duration.labels(kind).observe(max(seconds, 0.0))
        if moved > 0:
            self.bytes.labels(kind).inc(moved)
            if seconds > 0:
                self.throughput.labels(kind).set(moved / seconds)

    def serve(self, listen: str, field: str = "metrics.listen") -> int:
        """Start the HTTP endpoint; returns its port."""
        host, port = loopback(listen, field)
        server, _ = start_http_server(port, host, registry=self.registry)
        self._server = server
        return server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
