from __future__ import annotations

import socket

from agent import API_LEVEL, __version__
from agent.api.v1 import host_pb2, host_pb2_grpc
from agent.bindings import BindingStatus
from agent.config import Config
from agent.jobs.engine import JobEngine
from agent.pools import PoolRegistry
from agent.services.common import Auth, rpc
from agent.vms import running_vms, vm_to_pb


class HostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self, engine: JobEngine, auth: Auth, bindings: list[BindingStatus], cfg: Config, pools: PoolRegistry):
        self.engine = engine
        self.pools = pools
        self.auth = auth
        self.bindings = bindings
        self.cfg = cfg
        self.roots = cfg.agent.roots

    @rpc
    def GetHostInfo(self, request, context):
        return host_pb2.HostInfo(
            version=__version__,
            hostname=socket.gethostname(),
            max_concurrent_jobs=self.engine.max_concurrent,
            bandwidth_limit_bytes_per_second=self.engine.limiter.rate,
            draining=self.engine.draining,
            bindings=[
                host_pb2.Binding(module=b.module, debian_package=b.package, ok=b.ok, error=b.error)
                for b in self.bindings
            ],
            roots=self.roots,
        )

    @rpc
    def ListVms(self, request, context):
        return host_pb2.ListVmsResponse(vms=[vm_to_pb(v) for v in running_vms(self.pools.hypervisor, self.pools)])

    @rpc
    def GetHostFacts(self, request, context):
        from agent.hostfacts import host_facts

        return facts_to_pb(
            host_facts(self.cfg, {b.module for b in self.bindings if b.ok}, sys_root=self.cfg.agent.sys_root)
        )

    @rpc
    def ListFcDevices(self, request, context):
        from agent.stores.fc import list_devices, list_hbas

        a = self.cfg.agent
        devices = list_devices(a.sys_root, a.dev_root)
        if request.fc_only:
            devices = [d for d in devices if d.transport in ("fc", "multipath")]
        return host_pb2.ListFcDevicesResponse(
            devices=[
                host_pb2.FcDevice(
                    id=d.id,
                    disk_path=d.disk_path,
                    wwid=d.wwid,
                    size_bytes=d.size_bytes,
                    vendor=d.vendor,
                    model=d.model,
                    transport=d.transport,
                    hba=d.hba,
                    by_id=d.by_id,
                    paths=d.paths,
                    in_use=d.in_use,
                )
                for d in devices
            ],
            hbas=[_hba_pb(h) for h in list_hbas(a.sys_root)],
        )

    @rpc
    def DiscoverIscsi(self, request, context):
        from agent.stores.iscsi import discover

        targets = discover(request.ip, request.port, user=request.username, secret=request.secret)
        return host_pb2.DiscoverIscsiResponse(
            targets=[
                host_pb2.DiscoveredIscsiTarget(
                    iqn=t.iqn,
                    portal=t.portal,
                    state=t.state,
                    luns=[host_pb2.DiscoveredIscsiLun(lun=x.lun, size_bytes=x.size) for x in t.luns],
                )
                for t in targets
            ]
        )

    @rpc
    def DiscoverS3(self, request, context):
        from agent.stores.s3 import discover

        buckets = discover(request.endpoint, request.username, request.secret, region=request.region)
        return host_pb2.DiscoverS3Response(
            buckets=[
                host_pb2.DiscoveredBucket(
                    name=b.name,
                    object_lock=b.object_lock,
                    versioning=b.versioning,
                    used_bytes=b.used_bytes,
                    total_bytes=b.total_bytes,
                    error=b.error,
                )
                for b in buckets
            ]
        )


def facts_to_pb(f) -> host_pb2.HostFacts:
    return host_pb2.HostFacts(
        hostname=f.hostname,
        version=f.version,
        cpus=f.cpus,
        load1=f.load1,
        memory_total_bytes=f.memory_total,
        memory_available_bytes=f.memory_available,
        boot_time=f.boot_time,
        nics=[
            host_pb2.Nic(
                name=n.name,
                mac=n.mac,
                mtu=n.mtu,
                up=n.up,
                addresses=[host_pb2.NetAddress(family=a, address=b, prefixlen=c) for a, b, c in n.addresses],
            )
            for n in f.nics
        ],
        disks=[host_pb2.DiskUsage(path=p, total_bytes=t, used_bytes=u, available_bytes=a) for p, t, u, a in f.disks],
        pool_types=f.pool_types,
        backup_point_types=f.backup_point_types,
        shared_pool_types=f.shared_pool_types,
        pool_uuids=f.pool_uuids,
        backup_point_uuids=f.backup_point_uuids,
        iscsi_initiator=f.iscsi_initiator,
        fc_hbas=[_hba_pb(h) for h in f.fc_hbas],
        api_level=API_LEVEL,
        roots=f.roots,
    )


def _hba_pb(h):
    return host_pb2.FcHba(
        host=h.host, port_name=h.port_name, node_name=h.node_name, port_state=h.port_state, speed=h.speed
    )
