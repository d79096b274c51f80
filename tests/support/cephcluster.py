"""A real single-node Ceph cluster (ceph-mon + one ceph-osd) on 127.0.0.1.

Used by the test fixtures and the RBD bench. Settings follow the measured
facts for these machines: auth none, msgr2 only, one replica, short paxos
intervals (start-up ~1 s instead of 8-10 s), memstore (or bluestore on a
sparse file for large data).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Killed daemons linger as zombies here: state Z counts as exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class CephCluster:
    def __init__(
        self,
        root: Path | None = None,
        *,
        objectstore: str = "memstore",
        store_bytes: int = 6 << 30,
        pool: str = "rbd",
        with_mgr: bool = True,
        addr: str = "127.0.0.1",
    ):
        """addr: where the daemons listen (the multi-host test's bridge, for
        agents in other network namespaces)."""
        self.addr = addr
        self.root = Path(root or tempfile.mkdtemp(prefix="bf-ceph-", dir="/tmp"))
        self.port = free_port()
        self.fsid = str(uuid.uuid4())
        self.conf = self.root / "ceph.conf"
        self.objectstore = objectstore
        self.store_bytes = store_bytes
        self.pool = pool
        self.with_mgr = with_mgr
        self.mgr: subprocess.Popen | None = None
        self.mon: subprocess.Popen | None = None
        self.osd: subprocess.Popen | None = None
        self.osd_uuid = str(uuid.uuid4())

    def _write_conf(self) -> None:
        r = self.root
        store = (
            f"osd objectstore = memstore\nmemstore device bytes = {self.store_bytes}\n"
            if self.objectstore == "memstore"
            else f"osd objectstore = bluestore\nbluestore block create = true\n"
            f"bluestore block size = {self.store_bytes}\nosd memory target = 939524096\n"
        )
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v2:{self.addr}:{self.port}
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
public addr = {self.addr}
cluster addr = {self.addr}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
paxos propose interval = 0.05
paxos min wait = 0.01
mon data avail warn = 1
mon warn on insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon warn on pool no redundancy = false
rbd default features = 61
run dir = {r}/run
admin socket = {r}/run/$name.asok
log file = {r}/log/$name.log
pid file = {r}/run/$name.pid
{store}
[mon.a]
mon data = {r}/mon-a
[osd.0]
osd data = {r}/osd-0
[mgr.x]
mgr data = {r}/mgr-x
""")

    def ceph(self, *args: str, timeout: float = 30) -> str:
        return subprocess.run(
            ["ceph", "-c", str(self.conf), *args], check=True, capture_output=True, text=True, timeout=timeout
        ).stdout

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return subprocess.run(
            ["rbd", "-c", str(self.conf), *args], check=True, capture_output=True, text=True, timeout=timeout
        ).stdout

    def start(self) -> CephCluster:
        r = self.root
        for d in ("run", "log", "mon-a", "osd-0", "mgr-x"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        subprocess.run(
            [
                "monmaptool",
                "--create",
                "--addv",
                "a",
                f"[v2:{self.addr}:{self.port}]",
                "--fsid",
                self.fsid,
                str(r / "monmap"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(r / "monmap"), "-c", str(self.conf)],
            check=True,
            capture_output=True,
        )
        self.start_mon()
        osd_id = self.ceph("osd", "new", self.osd_uuid).strip()
        assert osd_id == "0", osd_id
        subprocess.run(
            ["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid, "-c", str(self.conf)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.start_osd()
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.rbd("pool", "init", self.pool)
        if self.with_mgr:
            self.start_mgr()
        return self

    def start_mgr(self) -> None:
        """The mgr reports capacity (ceph df, cluster stats); ~2.5 s until it does."""
        self.mgr = subprocess.Popen(
            ["ceph-mgr", "-f", "-i", "x", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log" / "mgr.out", "ab"),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            df = json.loads(self.ceph("df", "-f", "json"))
            if df.get("stats", {}).get("total_bytes"):
                return
            time.sleep(0.2)
        raise TimeoutError("ceph-mgr reported no capacity")

    def add_pool(self, name: str) -> None:
        self.ceph("osd", "pool", "create", name, "8", "8")
        self.rbd("pool", "init", name)

    def start_mon(self) -> None:
        self.mon = subprocess.Popen(
            ["ceph-mon", "-f", "-i", "a", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log" / "mon.out", "ab"),
        )

    def start_osd(self) -> None:
        self.osd = subprocess.Popen(
            ["ceph-osd", "-f", "-i", "0", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "log" / "osd.out", "ab"),
        )
        self._wait_up_osds(1)

    def stop_osd(self) -> None:
        self._stop(self.osd)
        self.osd = None
        self._wait_up_osds(0)  # until the mon knows, clients keep sending to it

    def _wait_up_osds(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if json.loads(self.ceph("osd", "stat", "-f", "json")).get("num_up_osds") == n:
                return
            if n == 0:
                self.ceph("osd", "down", "0")
            time.sleep(0.1)
        raise TimeoutError(f"ceph never reported {n} OSDs up")

    def _stop(self, proc: subprocess.Popen | None) -> None:
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(proc.pid):
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        self._stop(self.mgr)
        self._stop(self.osd)  # the OSD, then the mon
        self._stop(self.mon)
        self.osd = self.mon = self.mgr = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def rbd_pool(self, **kw):
        """An RbdPool of the agent on this cluster's default pool (all RBD features on)."""
        import uuid

        from agent.volumes.rbd import RbdPool

        return RbdPool(
            str(uuid.uuid4()),
            ceph_conf=str(self.conf),
            client_name="admin",
            keyring="",
            rbd_pool=self.pool,
            namespace="",
            features=["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"],
            timeout=30,
            **kw,
        )

    def pool_section(self, pool_uuid: str, pool: str | None = None, timeout: float = 10.0) -> str:
        return (
            f'[pools.{pool_uuid}]\ntype = "rbd"\nceph_conf = "{self.conf}"\nclient_name = "admin"\n'
            f'rbd_pool = "{pool or self.pool}"\ntimeout = {timeout}\n'
        )


if __name__ == "__main__":
    c = CephCluster().start()
    print(c.conf)
    os.system(f"rbd -c {c.conf} ls")
    c.destroy()
