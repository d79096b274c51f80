"""The agent's side of the controller: register once, then heartbeat, from
a background thread. The controller learns this host's facts, pools and
backup points (with their health) and where to call the agent. A controller
that is down is retried with backoff; the agent works on without it.

Three threads, so nothing slow delays what must be on time:
- the link sends heartbeats (each RPC has a deadline below fence_after);
- the prober refreshes pool and backup point health into a cache that
  heartbeats send (a check of an unreachable SMB or iSCSI server may block
  for its full `timeout`);
- the fence watchdog cancels running jobs once no heartbeat has succeeded
  for fence_after seconds, whatever the other two are doing.
A heartbeat answer may name backup points the controller attached here and
has since deleted: they are detached (their definition and secret leave
this host)."""

from __future__ import annotations

import logging
import threading
import time

import grpc

from agent.config import Config, host_uuid

log = logging.getLogger("agent.controller_link")


def advertised_address(cfg: Config, tcp_port: int | None) -> str:
    if cfg.controller.advertise:
        return cfg.controller.advertise
    if cfg.grpc.tcp_listen and tcp_port:
        return f"{cfg.grpc.tcp_listen.rpartition(':')[0]}:{tcp_port}"
    return f"unix:{cfg.grpc.unix_socket}"


def channel(cfg: Config) -> grpc.Channel:
    c = cfg.controller
    if c.address.startswith("unix:") or not c.tls_ca:
        return grpc.insecure_channel(c.address)
    with open(c.tls_ca, "rb") as f:
        ca = f.read()
    cert = key = None
    if c.tls_cert:
        with open(c.tls_cert, "rb") as f:
            cert = f.read()
        with open(c.tls_key, "rb") as f:
            key = f.read()
    return grpc.secure_channel(c.address, grpc.ssl_channel_credentials(ca, key, cert))


class ControllerLink:
    def __init__(self, cfg: Config, *, pools, points, engine, bindings_ok: set[str], tcp_port: int | None):
        self.cfg = cfg
        self.pools = pools
        self.points = points
        self.engine = engine
        self.bindings_ok = bindings_ok
        self.tcp_port = tcp_port
        self.host_uuid = host_uuid(cfg)
        self.interval = cfg.controller.heartbeat_interval
        self.last_ok = 0.0  # monotonic time of the last successful register/heartbeat
        self.fenced = False
        self._stop = threading.Event()
        self._fence_lock = threading.Lock()
        self._cache = None  # (pools, points) reports from the prober
        self._cache_lock = threading.Lock()
        self._probe_now = threading.Event()
        self._vms: list = []  # host_pb2.Vm of the last scan
        self._vms_at = -1e9  # monotonic time of that scan
        self._threads = [
            threading.Thread(target=self._run, name="controller-link", daemon=True),
            threading.Thread(target=self._probe_loop, name="controller-probe", daemon=True),
            threading.Thread(target=self._fence_loop, name="controller-fence", daemon=True),
        ]
        self.registered = threading.Event()

    def start(self) -> ControllerLink:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._probe_now.set()
        for t in self._threads:
            t.join(5)

    @property
    def _rpc_timeout(self) -> float:
        """Short enough that a cut link is noticed before fence_after."""
        fence = self.cfg.controller.fence_after or 60.0
        return max(1.0, min(10.0, self.interval * 2, fence / 2))

    @property
    def _metadata(self):
        return [("authorization", f"Bearer {self.cfg.controller.token}")] if self.cfg.controller.token else []

    def _reports(self):
        """The latest health the prober measured (measured now when it has
        none yet: the first registration waits for it)."""
        with self._cache_lock:
            cached = self._cache
        if cached is None:
            cached = self._measure()
            with self._cache_lock:
                self._cache = self._cache or cached
        return cached

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                measured = self._measure()
                with self._cache_lock:
                    self._cache = measured
            except Exception:
                log.exception("health probe failed")
            if time.monotonic() - self._vms_at >= self.cfg.vms.report_interval:
                self._scan_vms()
            self._probe_now.wait(self.interval)
            self._probe_now.clear()

    def _scan_vms(self) -> None:
        from agent.vms import running_vms, vm_to_pb

        try:
            vms = [vm_to_pb(v) for v in running_vms(self.pools.hypervisor, self.pools)]
        except Exception:
            log.exception("scanning the running VMs failed")
            return
        with self._cache_lock:
            self._vms, self._vms_at = vms, time.monotonic()

    def _measure(self):
        """Every pool's and backup point's health, each probed on its own:
        whatever one probe raises makes that object unreachable with the
        reason, and the others still report."""
        from agent.api.v1 import registry_pb2 as r

        pools = []
        for pool in self.pools.all():
            try:
                st = pool.pool_status()
                report = r.PoolReport(
                    pool_uuid=st.pool_uuid,
                    type=st.kind,
                    status=st.status,
                    total_bytes=st.total_bytes,
                    available_bytes=st.available_bytes,
                    reason=st.error if st.status != "healthy" else "",
                    metadata_owner=st.owner,
                    live_hosts=list(st.hosts),
                    lapsed_hosts=list(st.lapsed),
                )
            except Exception as e:
                report = r.PoolReport(pool_uuid=pool.pool_uuid, type=pool.kind, status="unreachable", reason=_why(e))
                log.warning("pool probe failed", extra={"pool_uuid": pool.pool_uuid, "error": report.reason})
            pools.append(report)
        points = []
        for bp in self.points.all():
            try:
                h = bp.check()
                report = r.BackupPointReport(
                    backup_point_uuid=h.uuid,
                    type=h.type,
                    status=h.status,
                    total_bytes=h.total_bytes,
                    available_bytes=h.available_bytes,
                    reason=h.error,
                    error_code=h.error_code,
                )
            except Exception as e:
                report = r.BackupPointReport(
                    backup_point_uuid=bp.uuid,
                    type=bp.section.type,
                    status="unreachable",
                    reason=_why(e),
                    error_code=getattr(e, "code", "INTERNAL"),
                )
                log.warning("backup point probe failed", extra={"backup_point_uuid": bp.uuid, "error": report.reason})
            report.attached = self.points.is_attached(report.backup_point_uuid)
            points.append(report)
        return pools, points

    def _register(self, stub) -> None:
        from agent.api.v1 import registry_pb2 as r
        from agent.hostfacts import host_facts
        from agent.services.host import facts_to_pb

        pools, points = self._reports()
        facts = facts_to_pb(host_facts(self.cfg, self.bindings_ok, sys_root=self.cfg.agent.sys_root))
        resp = stub.Register(
            r.RegisterRequest(
                host_uuid=self.host_uuid,
                address=advertised_address(self.cfg, self.tcp_port),
                facts=facts,
                pools=pools,
                backup_points=points,
                max_concurrent_jobs=self.engine.max_concurrent,
                cluster_uuid=self.cfg.controller.cluster_uuid.lower(),
                zone_uuid=self.cfg.controller.zone_uuid.lower(),
                zone_name=self.cfg.controller.zone_name,
            ),
            metadata=self._metadata,
            timeout=self._rpc_timeout,
        )
        if resp.heartbeat_interval_seconds > 0:
            self.interval = resp.heartbeat_interval_seconds
        self.registered.set()
        log.info(
            "registered with the controller",
            extra={"controller": self.cfg.controller.address, "host_uuid": self.host_uuid},
        )

    def _heartbeat(self, stub) -> bool:
        from agent.api.v1 import registry_pb2 as r

        pools, points = self._reports()
        resp = stub.Heartbeat(
            r.HeartbeatRequest(
                host_uuid=self.host_uuid,
                running_jobs=self.engine.running_count(),
                pools=pools,
                backup_points=points,
                draining=self.engine.draining,
                vms=self._vms,
            ),
            metadata=self._metadata,
            timeout=self._rpc_timeout,
        )
        for uuid_ in resp.detach_backup_point_uuids:
            self._detach_deleted(uuid_)
        return not resp.reregister

    def _detach_deleted(self, uuid_: str) -> None:
        """The controller deleted a backup point it had attached here."""
        from agent.errors import BlockferryError, NotFound

        try:
            self.points.detach_unused(uuid_, self.engine)
        except NotFound:  # gone already (a probe that began before the detach still listed it)
            return
        except BlockferryError as e:  # in use: the next heartbeat asks again
            log.info("deleted backup point not detached yet", extra={"backup_point": uuid_, "why": e.message})
            return
        with self._cache_lock:  # no longer reported (the heartbeat never waits for a new probe)
            if self._cache is not None:
                pools, points = self._cache
                self._cache = (pools, [p for p in points if p.backup_point_uuid != uuid_])
        self._probe_now.set()
        log.info("backup point deleted by the controller: detached", extra={"backup_point": uuid_})

    def _run(self) -> None:
        from agent.api.v1 import registry_pb2_grpc

        backoff = 1.0
        registered = False
        with channel(self.cfg) as ch:
            stub = registry_pb2_grpc.AgentRegistryStub(ch)
            while not self._stop.is_set():
                try:
                    if not registered:
                        self._register(stub)
                        registered = True
                    elif not self._heartbeat(stub):
                        registered = False
                        continue
                    backoff = 1.0
                    wait = self.interval
                    with self._fence_lock:
                        self.last_ok = time.monotonic()
                        self.fenced = False
                except grpc.RpcError as e:
                    log.warning(
                        "controller unreachable or refused us",
                        extra={
                            "controller": self.cfg.controller.address,
                            "code": e.code().name,
                            "detail": e.details(),
                            "retry_in": backoff,
                        },
                    )
                    wait, backoff = backoff, min(backoff * 2, 60.0)
                    registered = registered and e.code() != grpc.StatusCode.UNAUTHENTICATED
                except Exception:
                    log.exception("controller link failed")
                    wait, backoff = backoff, min(backoff * 2, 60.0)
                self._stop.wait(min(wait, self.interval))

    def _fence_loop(self) -> None:
        fence_after = self.cfg.controller.fence_after
        if not fence_after:
            return
        while not self._stop.wait(min(1.0, fence_after / 5)):
            try:
                self._fence_if_cut_off()
            except Exception:
                log.exception("fence watchdog failed")

    def _fence_if_cut_off(self) -> None:
        """Cut off from the controller for fence_after seconds: it will run
        our jobs elsewhere, so stop them here (each cleans up after itself)."""
        fence_after = self.cfg.controller.fence_after
        with self._fence_lock:
            if not fence_after or not self.last_ok or self.fenced:
                return
            lost = time.monotonic() - self.last_ok
            if lost < fence_after:
                return
            self.fenced = True
        from agent.jobs.model import JobState

        running = self.engine.list({JobState.RUNNING, JobState.WAITING})
        for job in running:
            try:
                self.engine.cancel(job.id)
            except Exception:
                log.exception("could not cancel a job while fencing", extra={"job": job.id})
        log.warning(
            "cut off from the controller: running jobs cancelled (self-fencing)",
            extra={"seconds": round(lost, 1), "jobs": len(running)},
        )


def _why(e: BaseException) -> str:
    """A probe's failure in one line, without a traceback."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(getattr(e, "message", "") or e) or type(e).__name__
