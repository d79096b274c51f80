"""A real samba smbd on 127.0.0.1 with a real Unix user, for the SMB backup
point tests and the targets bench. Every samba directory lives under the
server's temp root; the port is fixed per instance so a stopped server comes
back on it. Shares: `backups` (a directory) and `small` (a 48 MiB ext4 loop
mount, for a full share)."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from support.cephcluster import free_port
from support.nfsserver import _wait_port
from support.smallfs import mount_small_fs, unmount_small_fs

CONF = """\
[global]
    server role = standalone server
    workgroup = BFTEST
    interfaces = {ip}
    bind interfaces only = yes
    smb ports = {port}
    disable netbios = yes
    server min protocol = SMB2_10
    server signing = mandatory
    map to guest = never
    private dir = {root}/private
    lock directory = {root}/lock
    state directory = {root}/state
    cache directory = {root}/cache
    pid directory = {root}/pid
    ncalrpc dir = {root}/ncalrpc
    log file = {root}/log/smbd.log
    passdb backend = tdbsam:{root}/private/passdb.tdb
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
[backups]
    path = {root}/backups
    read only = no
    valid users = {user}
    force user = {user}
[small]
    path = {root}/small
    read only = no
    valid users = {user}
    force user = {user}
"""


class SmbServer:
    def __init__(
        self,
        root: Path | None = None,
        *,
        user: str = "bfsmbtest",
        small_bytes: int = 48 << 20,
        ip: str = "127.0.0.1",
        prefix: list[str] | None = None,
    ):
        """ip and prefix put it elsewhere: the multi-host test runs it in its
        own network namespace (prefix `ip netns exec NS`) on that one's address."""
        self.ip = ip
        self.prefix = prefix or []
        self.root = Path(root or tempfile.mkdtemp(prefix="bf-smb-", dir="/tmp"))
        self.port = free_port()
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self.small_bytes = small_bytes
        self.proc: subprocess.Popen | None = None
        self.loop: str | None = None
        self.conf = self.root / "smb.conf"

    def _smbpasswd(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", self.user], check=True)
        # the password goes through stdin, never argv
        subprocess.run(
            ["smbpasswd", "-c", str(self.conf), "-s", "-a", self.user],
            input=f"{self.password}\n{self.password}\n",
            text=True,
            check=True,
            capture_output=True,
        )

    def start(self) -> SmbServer:
        for d in ("private", "lock", "state", "cache", "pid", "ncalrpc", "log", "backups", "small"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(port=self.port, root=self.root, user=self.user, ip=self.ip))
        if self.loop is None:
            self.loop = mount_small_fs(self.root / "small.img", self.root / "small", self.small_bytes)
            self._smbpasswd()
            uid = pwd.getpwnam(self.user).pw_uid
            self.root.chmod(0o711)  # the share user must reach its directories
            for share in ("backups", "small"):
                shutil.chown(self.root / share, uid)
        self.proc = subprocess.Popen(
            [*self.prefix, "smbd", "--foreground", "--no-process-group", "--debug-stdout", f"--configfile={self.conf}"],
            stdout=open(self.root / "log" / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # smbd signals its whole process group on exit
        _wait_port(self.port, host=self.ip)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            try:  # smbd's helper children outlive the parent for a moment
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        if self.loop:
            unmount_small_fs(self.root / "small", self.loop)
            self.loop = None
        subprocess.run(["userdel", self.user], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def smbclient(self, share: str, command: str) -> subprocess.CompletedProcess:
        """Run smbclient (samba's own client) with the password in an
        authentication file, not argv."""
        auth = self.root / "private" / "client.auth"
        auth.write_text(f"username = {self.user}\npassword = {self.password}\n")
        auth.chmod(0o600)
        return subprocess.run(
            ["smbclient", f"//{self.ip}/{share}", "-p", str(self.port), "-A", str(auth), "-m", "SMB3", "-c", command],
            capture_output=True,
        )

    def section(self, uuid: str, share: str = "backups", sub_dir: str = "repo", extra: str = "") -> str:
        return (
            f'[backup_points.{uuid}]\ntype = "samba"\nip = "{self.ip}"\nport = {self.port}\n'
            f'root_dir = "{share}"\nsub_dir = "{sub_dir}"\nusername = "{self.user}"\n'
            f'secret = "{self.password}"\nchunk_size = 1048576\ntimeout = 5.0\n{extra}'
        )
