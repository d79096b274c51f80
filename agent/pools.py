"""The pools this agent serves, from [pools.<uuid>] in its config."""
from __future__ import annotations

from agent.config import Config
from agent.errors import NotFound
from agent.volumes.base import VolumeDriver, check_uuid
from agent.volumes.qcow2 import Qcow2Pool


class PoolRegistry:
    def __init__(self, cfg: Config):
        roots = list(cfg.agent.roots) + [p.path for p in cfg.pools.values()]
        self.allowed_roots = roots
        self._pools: dict[str, VolumeDriver] = {}
        for pool_uuid, pc in cfg.pools.items():
            if pc.type == "dir":
                self._pools[pool_uuid] = Qcow2Pool(pool_uuid, pc.path, run_dir=cfg.agent.run_dir,
                                                   allowed_roots=roots, lookup=self.get)
            elif pc.type == "rbd":
                from agent.volumes.rbd import RbdPool  # the rados/rbd bindings load only when used

                self._pools[pool_uuid] = RbdPool(pool_uuid, ceph_conf=pc.ceph_conf, client_name=pc.client_name,
                                                 keyring=pc.keyring, rbd_pool=pc.rbd_pool, namespace=pc.namespace,
                                                 features=pc.features, timeout=pc.timeout)

    def get(self, pool_uuid: str, field: str = "pool_uuid") -> VolumeDriver:
        check_uuid(pool_uuid, field)
        pool = self._pools.get(pool_uuid)
        if pool is None:
            raise NotFound(f"{field}: pool {pool_uuid} is not configured on this agent", field=field)
        return pool

    def all(self) -> list[VolumeDriver]:
        return list(self._pools.values())
