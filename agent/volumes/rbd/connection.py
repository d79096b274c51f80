"""One librados connection per cluster identity, shared by every RBD pool
that names it and reconnected after a failure. Every call that can block
is bounded by the pool's timeout (rados_mon_op_timeout,
rados_osd_op_timeout, client_mount_timeout)."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import rados

from agent.errors import StorageIOError


@dataclass(frozen=True)
class CephTarget:
    """What identifies one cluster connection."""

    ceph_conf: str
    client_name: str
    keyring: str
    timeout: float


class CephConnection:
    """One librados connection per (conf, client, keyring), reconnected when lost."""

    _shared: dict[CephTarget, CephConnection] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def get(cls, target: CephTarget) -> CephConnection:
        with cls._shared_lock:
            conn = cls._shared.get(target)
            if conn is None:
                conn = cls._shared[target] = CephConnection(target)
            return conn

    def __init__(self, target: CephTarget):
        self.target = target
        self._lock = threading.Lock()
        self._cluster: rados.Rados | None = None
        self.last_error = ""

    def cluster(self) -> rados.Rados:
        with self._lock:
            if self._cluster is not None:
                return self._cluster
            t = self.target
            timeout = str(int(max(1, t.timeout)))
            conf = {"rados_mon_op_timeout": timeout, "rados_osd_op_timeout": timeout, "client_mount_timeout": timeout}
            if t.keyring:
                conf["keyring"] = t.keyring
            name = t.client_name if t.client_name.startswith("client.") else f"client.{t.client_name}"
            try:
                cluster = rados.Rados(conffile=t.ceph_conf, name=name, conf=conf)
                cluster.connect(timeout=max(1, int(t.timeout)))
            except (rados.Error, OSError) as e:
                self.last_error = str(e)
                raise StorageIOError(f"ceph cluster of {t.ceph_conf} is unreachable as {name}: {e}") from None
            self._cluster = cluster
            self.last_error = ""
            return cluster

    def reset(self, why: str) -> None:
        """Drop a connection that failed; the next call reconnects."""
        with self._lock:
            cluster, self._cluster = self._cluster, None
            self.last_error = why
        if cluster is not None:
            threading.Thread(target=cluster.shutdown, daemon=True).start()  # may block; never wait on it
