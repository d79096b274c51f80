"""blockferry-agent: configuration, gRPC server, signals, sd_notify, drain."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
import threading
from concurrent import futures

from agent import __version__, bindings, config, logs, procs, systemd
from agent.errors import BindingMissing, ConfigError

log = logging.getLogger("agent.server")

EX_UNAVAILABLE = 69  # sysexits: a needed binding is missing
EX_CONFIG = 78  # sysexits: configuration error


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Agent:
    def __init__(
        self,
        cfg: config.Config,
        binding_status: list[bindings.BindingStatus],
        config_path: str = "",
        conf_dir: str | None = None,
    ):
        self.cfg = cfg
        self.binding_status = binding_status
        self.config_path, self.conf_dir = config_path, conf_dir
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.tcp_port: int | None = None

    def _bind_unix(self, server) -> None:
        path = self.cfg.grpc.unix_socket
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # stale socket of an earlier run
        except FileNotFoundError:
            pass
        server.add_insecure_port(f"unix:{path}")

    def _bind_tcp(self, server) -> None:
        g = self.cfg.grpc
        client_ca = _read(g.tls_client_ca) if g.tls_client_ca else None
        creds = __import__("grpc").ssl_server_credentials(
            [(_read(g.tls_key), _read(g.tls_cert))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(g.tcp_listen, creds)
        if port == 0:
            raise OSError(f"cannot listen on {g.tcp_listen}")
        self.tcp_port = port

    def run(self) -> int:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from agent.api.v1 import (
            backups_pb2,
            backups_pb2_grpc,
            host_pb2,
            host_pb2_grpc,
            jobs_pb2,
            jobs_pb2_grpc,
            sharedpool_pb2,
            sharedpool_pb2_grpc,
            volumes_pb2,
            volumes_pb2_grpc,
        )
        from agent.backup_points import BackupPoints
        from agent.exports import Exports
        from agent.jobs.engine import JobEngine
        from agent.kinds.backups import BackupKind, GcKind, RestoreKind, VerifyKind
        from agent.kinds.checksum import ChecksumKind
        from agent.kinds.copy import CopyKind
        from agent.kinds.vm_backup import VmBackupKind
        from agent.kinds.volumes import CloneKind, FlattenKind
        from agent.pools import PoolRegistry
        from agent.services.backups import BackupService
        from agent.services.common import Auth
        from agent.services.fleet import FleetChannels
        from agent.services.forward import OwnerForward
        from agent.services.host import HostService
        from agent.services.jobs import JobService
        from agent.services.pool_peers import PoolPeers
        from agent.services.sharedpool import SharedPoolService
        from agent.services.volumes import VolumeService
        from agent.stores.iscsi import set_initiator_name

        cfg = self.cfg
        set_initiator_name(cfg.agent.iscsi_initiator)  # this host's sessions and its VMs' on shared LUNs
        fleet = FleetChannels(cfg.grpc)
        pools = PoolRegistry(cfg, peers=PoolPeers(fleet))
        points = BackupPoints(cfg)
        exports = Exports(points, cfg.agent.run_dir)
        kinds = [
            ChecksumKind(pools.allowed_roots, pools),
            CloneKind(pools),
            FlattenKind(pools),
            BackupKind(pools, points),
            RestoreKind(pools, points, exports),
            VerifyKind(points),
            GcKind(points),
            CopyKind(points, cfg.grpc),
            VmBackupKind(pools, points, cfg.vms.libvirt_work_dir),
        ]
        engine = JobEngine(
            os.path.join(cfg.agent.state_dir, "jobs.sqlite3"),
            kinds,
            max_concurrent=cfg.jobs.max_concurrent,
            bandwidth_limit=cfg.jobs.bandwidth_limit,
            on_busy=cfg.jobs.on_busy,
            keep_finished=cfg.jobs.keep_finished,
        )
        for bp in points.all():
            engine.limits.set(f"backup_point:{bp.uuid}", bp.section.bandwidth_limit)
        engine.start()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.grpc.max_workers, thread_name_prefix="rpc"))
        auth = Auth(cfg.grpc.auth_token)
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobService(engine, auth), server)
        host_pb2_grpc.add_HostServiceServicer_to_server(
            HostService(engine, auth, self.binding_status, cfg, pools), server
        )
        volumes_pb2_grpc.add_VolumeServiceServicer_to_server(
            VolumeService(pools, engine, auth, OwnerForward(fleet)), server
        )
        sharedpool_pb2_grpc.add_SharedPoolServiceServicer_to_server(SharedPoolService(pools, auth), server)
        backups_pb2_grpc.add_BackupServiceServicer_to_server(BackupService(points, engine, auth, exports), server)
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = [
            jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
            host_pb2.DESCRIPTOR.services_by_name["HostService"].full_name,
            volumes_pb2.DESCRIPTOR.services_by_name["VolumeService"].full_name,
            backups_pb2.DESCRIPTOR.services_by_name["BackupService"].full_name,
            sharedpool_pb2.DESCRIPTOR.services_by_name["SharedPoolService"].full_name,
        ]
        reflection.enable_server_reflection(
            [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
        )

        old_umask = os.umask(0o117)  # gRPC binds here: the socket is created 0660
        try:
            if cfg.grpc.unix_socket:
                self._bind_unix(server)
        finally:
            os.umask(old_umask)
        if cfg.grpc.tcp_listen:
            self._bind_tcp(server)
        server.start()
        for name in ["", *services]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

        listening = [f"unix:{cfg.grpc.unix_socket}"] if cfg.grpc.unix_socket else []
        if self.tcp_port is not None:
            host = cfg.grpc.tcp_listen.rpartition(":")[0]
            listening.append(f"{host}:{self.tcp_port}")
        log.info(
            "blockferry-agent ready",
            extra={"version": __version__, "listen": ",".join(listening), "mtls": bool(cfg.grpc.tls_client_ca)},
        )
        systemd.notify(f"READY=1\nSTATUS=serving on {', '.join(listening)}\nMAINPID={os.getpid()}")

        metrics = None
        if cfg.metrics.listen:
            from agent.metrics import AgentMetrics

            metrics = AgentMetrics(points, kinds=sorted(engine.kinds))
            engine.observer = metrics
            port = metrics.serve(cfg.metrics.listen)
            log.info("metrics served", extra={"listen": f"{cfg.metrics.listen.rpartition(':')[0]}:{port}"})

        link = None
        if cfg.controller.address:
            from agent.controller_link import ControllerLink

            link = ControllerLink(
                cfg,
                pools=pools,
                points=points,
                engine=engine,
                bindings_ok={b.module for b in self.binding_status if b.ok},
                tcp_port=self.tcp_port,
            ).start()

        watchdog = None
        interval = systemd.watchdog_interval() if cfg.systemd.watchdog else None
        if interval:
            watchdog = systemd.Watchdog(interval, healthy=engine._dispatcher.is_alive)
            watchdog.start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop_requested.set())
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload_requested.set())
        while not self.stop_requested.wait(0.5):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload(engine, points)

        log.info(
            "draining: no new jobs; waiting for running jobs",
            extra={"running": engine.running_count(), "timeout": cfg.jobs.drain_timeout},
        )
        systemd.notify("STOPPING=1\nSTATUS=draining")
        for name in ["", *services]:
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        engine.drain(cfg.jobs.drain_timeout)
        if link:
            link.stop()
        server.stop(grace=2.0).wait()
        exports.stop_all()  # no export outlives the agent
        procs.Child.stop_all()  # no qemu-nbd outlives the agent
        pools.close()  # shared pools' leases released: other hosts need not wait them out
        if watchdog:
            watchdog.stop()
        if metrics:
            metrics.stop()
        if cfg.grpc.unix_socket:
            try:
                os.unlink(cfg.grpc.unix_socket)
            except FileNotFoundError:
                pass
        log.info("blockferry-agent stopped")
        return 0

    def reload(self, engine, points) -> None:
        """SIGHUP (systemctl reload): read the config again and apply what
        applies at run time: the log level and format, the host's bandwidth
        limit and each backup point's (running jobs follow at once), and
        how each backup point locks new backups. Other
        changes are named in the log: they take effect at the next restart.
        A config that does not load is refused and the running one kept."""
        systemd.notify("RELOADING=1")
        try:
            new = config.load(self.config_path, self.conf_dir)
        except ConfigError as e:
            log.error("reload refused: the config does not load; the running one stays", extra={"error": e.message})
            systemd.notify("READY=1")
            return
        logs.setup(new.agent.log_level, new.agent.log_format, config.secrets(new))
        engine.limits.host.set_rate(new.jobs.bandwidth_limit)
        for uuid, section in new.backup_points.items():
            if uuid in self.cfg.backup_points:
                engine.limits.set(f"backup_point:{uuid}", section.bandwidth_limit)
                points.relock(uuid, section.lock_days, section.lock_mode)
        later = config.restart_needed(self.cfg, new)
        if later:
            log.warning("config changes that need a restart", extra={"keys": ",".join(later)})
        log.info(
            "config reloaded",
            extra={"bandwidth_limit": new.jobs.bandwidth_limit, "backup_point_limits": engine.limits.rates() or "none"},
        )
        systemd.notify("READY=1")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blockferry-agent", description="blockferry storage agent")
    p.add_argument("-c", "--config", default=config.DEFAULT_CONFIG, help="main config file (TOML)")
    p.add_argument("--conf-dir", help="conf.d directory (default: agent.conf.d beside --config)")
    p.add_argument("--show-config", action="store_true", help="print the effective config, secrets masked")
    p.add_argument("--print-default-config", action="store_true", help="print the commented default config file")
    p.add_argument("--check-bindings", action="store_true", help="check the Python bindings and exit")
    p.add_argument("--version", action="version", version=f"blockferry-agent {__version__}")
    args = p.parse_args(argv)

    if args.print_default_config:
        print(config.render(config.Config(), commented=True, mask_secrets=False), end="")
        return 0
    try:
        cfg = config.load(args.config, args.conf_dir)
    except ConfigError as e:
        print(f"blockferry-agent: config error: {e.message}", file=sys.stderr)
        return EX_CONFIG
    if args.show_config:
        print(f"# effective config from: {', '.join(cfg.sources) or 'defaults'}")
        print(config.render(cfg, commented=False, mask_secrets=True), end="")
        return 0
    logs.setup(cfg.agent.log_level, cfg.agent.log_format, config.secrets(cfg))
    try:
        status = bindings.require()
    except BindingMissing as e:
        print(f"blockferry-agent: {e.message}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.check_bindings:
        for s in status:
            print(f"{s.module}: ok ({s.package})")
        return 0
    try:
        return Agent(cfg, status, args.config, args.conf_dir).run()
    except (OSError, RuntimeError) as e:
        log.error("agent failed to start", extra={"error": str(e)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
