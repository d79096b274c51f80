"""A real tgtd iSCSI target on 127.0.0.1 with sparse-file LUNs, with and
without CHAP, for the iSCSI backup point tests and the targets bench.

tgtd ignores SIGTERM: stop() deletes the targets and the system through
tgtadm. Each instance has its own control number and port; the LUN files
stay, so start() after stop() brings the same LUNs back.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from support.cephcluster import free_port
from support.nfsserver import _wait_port

_CONTROL = [100 + os.getpid() % 800]


@dataclass
class Lun:
    tid: int
    iqn: str
    file: Path
    user: str = ""
    secret: str = ""
    initiators: tuple[str, ...] = ()  # the initiator names let in (none: any initiator from 127.0.0.1)


class TgtServer:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="bf-tgt-", dir="/tmp"))
        _CONTROL[0] += 1
        self.control = _CONTROL[0]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.luns: list[Lun] = []

    def _adm(self, *args: str, input: str | None = None) -> None:
        subprocess.run(
            ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
            check=True,
            capture_output=True,
            text=True,
            input=input,
        )

    def start(self) -> TgtServer:
        os.makedirs("/run/tgtd", exist_ok=True)
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=open(self.root / "tgtd.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_port(self.port)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"/run/tgtd/socket.{self.control}") and time.monotonic() < deadline:
            time.sleep(0.05)
        for lun in self.luns:
            self._configure(lun)
        return self

    def _configure(self, lun: Lun) -> None:
        self._adm("--op", "new", "--mode", "target", "--tid", str(lun.tid), "-T", lun.iqn)
        self._adm(
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            str(lun.tid),
            "--lun",
            "1",
            "-b",
            str(lun.file),
            "--bstype",
            "rdwr",
        )
        if lun.initiators:
            for name in lun.initiators:
                self.allow(lun, name)
        else:
            self._adm("--op", "bind", "--mode", "target", "--tid", str(lun.tid), "-I", "127.0.0.1")
        if lun.user:
            # tgtadm takes the password as an argument: a test-only secret on a test-only target
            self._adm("--op", "new", "--mode", "account", "--user", lun.user, "--password", lun.secret)
            self._adm("--op", "bind", "--mode", "account", "--tid", str(lun.tid), "--user", lun.user)

    def allow(self, lun: Lun, initiator: str) -> None:
        self._adm("--op", "bind", "--mode", "target", "--tid", str(lun.tid), "--initiator-name", initiator)

    def sessions_of(self, lun: Lun) -> dict[str, list[tuple[int, int]]]:
        """Initiator name -> (I_T nexus, connection) of its sessions to the LUN's target."""
        out = subprocess.run(
            ["tgtadm", "-C", str(self.control), "--lld", "iscsi", "--op", "show", "--mode", "target"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        found: dict[str, list[tuple[int, int]]] = {}
        tid, nexus, who = None, None, ""
        for line in out.splitlines():
            key, _, value = line.strip().partition(": ")
            if line.startswith("Target "):
                tid = int(line.split()[1].rstrip(":"))
            elif tid == lun.tid and key == "I_T nexus":
                nexus = int(value)
            elif tid == lun.tid and key == "Initiator":
                who = value.split()[0]
            elif tid == lun.tid and key == "Connection" and nexus is not None:
                found.setdefault(who, []).append((nexus, int(value)))
        return found

    def add_lun(self, size: int, *, chap: bool = False, initiators: tuple[str, ...] = ()) -> Lun:
        tid = len(self.luns) + 1
        f = self.root / f"lun{tid}.img"
        with open(f, "wb") as fh:
            fh.truncate(size)
        lun = Lun(tid, f"iqn.2026-11.io.blockferry.test:lun{tid}", f, initiators=initiators)
        if chap:
            lun.user, lun.secret = f"bfchap{tid}", secrets.token_urlsafe(12)
        self.luns.append(lun)
        if self.proc is not None:
            self._configure(lun)
        return lun

    def connections(self, lun: Lun) -> list[tuple[int, int]]:
        """(session id, connection id) of every initiator connection to the
        LUN's target, as tgtd sees them."""
        out = subprocess.run(
            [
                "tgtadm",
                "-C",
                str(self.control),
                "--lld",
                "iscsi",
                "--op",
                "show",
                "--mode",
                "conn",
                "--tid",
                str(lun.tid),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        found, sid = [], None
        for line in out.splitlines():
            key, _, value = line.strip().partition(": ")
            if key == "Session":
                sid = int(value)
            elif key == "Connection" and sid is not None:
                found.append((sid, int(value)))
        return found

    def drop_connections(self, lun: Lun) -> None:
        """Close every initiator connection to the target from the server
        side, as a target restart or a network cut does."""
        for sid, cid in self.connections(lun):
            self._adm("--op", "delete", "--mode", "conn", "--tid", str(lun.tid), "--sid", str(sid), "--cid", str(cid))

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run(["tgt-admin", "-C", str(self.control), "--delete", "ALL", "-f"], capture_output=True)
        subprocess.run(["tgtadm", "-C", str(self.control), "--op", "delete", "--mode", "system"], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        for f in glob.glob(f"/run/tgtd/socket.{self.control}*"):
            os.unlink(f)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def section(self, uuid: str, lun: Lun, extra: str = "") -> str:
        chap = f'username = "{lun.user}"\nsecret = "{lun.secret}"\n' if lun.user else ""
        return (
            f'[backup_points.{uuid}]\ntype = "iscsi"\nip = "127.0.0.1"\nport = {self.port}\n'
            f'target = "{lun.iqn}"\nlun = 1\nformat_lun = true\n{chap}chunk_size = 1048576\ntimeout = 5.0\n'
            f"{extra}"
        )
