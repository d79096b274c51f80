"""A real nfs-ganesha server (NFSv3, VFS FSAL) on 127.0.0.1, with rpcbind.

Two exports: `export` (a plain directory) and `small` (a 48 MiB ext4 file
system on a loop device, for ENOSPC). Ports are fixed per instance, so a
stopped server comes back on the same ones. Used by the tests and the
targets bench.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from support.cephcluster import _alive, free_port
from support.smallfs import mount_small_fs, unmount_small_fs

CONF = """\
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Bind_addr = 127.0.0.1;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
{exports}
"""
EXPORT = """\
EXPORT {{
    Export_Id = {id};
    Path = {path};
    Pseudo = {path};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    FSAL {{ Name = VFS; }}
    CLIENT {{ Clients = 127.0.0.1; Access_Type = RW; }}
}}
"""


def _wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


class NfsServer:
    def __init__(self, root: Path | None = None, *, small_bytes: int = 48 << 20):
        self.root = Path(root or tempfile.mkdtemp(prefix="bf-nfs-", dir="/tmp"))
        self.export = self.root / "export"
        self.small = self.root / "small"
        self.nfs_port = free_port()
        self.mount_port = free_port()
        self.small_bytes = small_bytes
        self.proc: subprocess.Popen | None = None
        self.rpcbind: subprocess.Popen | None = None
        self.loop: str | None = None

    def start(self) -> NfsServer:
        self.export.mkdir(parents=True, exist_ok=True)
        self.small.mkdir(exist_ok=True)
        if self.loop is None:
            self.loop = mount_small_fs(self.root / "small.img", self.small, self.small_bytes)
        if subprocess.run(["pgrep", "-x", "rpcbind"], capture_output=True).returncode != 0:
            self.rpcbind = subprocess.Popen(["rpcbind", "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_port(111)
        exports = EXPORT.format(id=77, path=self.export) + EXPORT.format(id=78, path=self.small)
        (self.root / "ganesha.conf").write_text(
            CONF.format(nfs_port=self.nfs_port, mount_port=self.mount_port, exports=exports)
        )
        self.proc = subprocess.Popen(
            [
                "ganesha.nfsd",
                "-F",
                "-f",
                str(self.root / "ganesha.conf"),
                "-L",
                str(self.root / "ganesha.log"),
                "-p",
                str(self.root / "ganesha.pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.nfs_port)
        _wait_port(self.mount_port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        if self.rpcbind is not None:
            self.rpcbind.terminate()
            self.rpcbind.wait()
            self.rpcbind = None
        if self.loop:
            unmount_small_fs(self.small, self.loop)
            self.loop = None
        shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and _alive(self.proc.pid)

    def url(self, export: Path, path: str = "") -> str:
        """An nfs:// URL for libnfs-utils (nfs-ls, nfs-cat), ports given."""
        return (
            f"nfs://127.0.0.1{export}/{path.lstrip('/')}?nfsport={self.nfs_port}&mountport={self.mount_port}&version=3"
        )

    def section(self, uuid: str, export: Path | None = None, sub_dir: str = "repo", extra: str = "") -> str:
        return (
            f'[backup_points.{uuid}]\ntype = "nfs"\nip = "127.0.0.1"\nport = {self.nfs_port}\n'
            f'mount_port = {self.mount_port}\nroot_dir = "{export or self.export}"\nsub_dir = "{sub_dir}"\n'
            f"chunk_size = 1048576\ntimeout = 5.0\n{extra}"
        )
