"""A real PostgreSQL 15 server on 127.0.0.1 for the controller's optional
backend. PostgreSQL refuses to run as root: initdb and the server run as the
`postgres` user, in a directory it owns."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from support.cephcluster import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


class PgServer:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="bf-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "blockferry"
        pw = pwd.getpwnam("postgres")
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)

    def _as_postgres(self, *cmd: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, cwd="/")

    def start(self) -> PgServer:
        self._as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user)
        self._as_postgres(
            str(BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "pg.log"),
            "-o",
            f"-k {self.root} -h 127.0.0.1 -p {self.port}",
            "-w",
            "start",
        )
        return self

    def create_database(self, name: str) -> str:
        self._as_postgres(str(BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)
