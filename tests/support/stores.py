"""Object stores of every backup point type, made and read back
independently (another client of the same server, the LUN's backing file)."""

from __future__ import annotations

import subprocess
import uuid

from agent.stores.local import LocalStore

from support.backups import nid


class Target:
    """How a test makes stores of one type and reads them back independently."""

    kind = "local"

    def make(self, sub: str):
        raise NotImplementedError

    def read_back(self, sub: str, name: str) -> bytes:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop a store this process keeps open (raw LUNs), so the next make() opens it afresh."""


class LocalTarget(Target):
    def __init__(self, root):
        self.root = root

    def make(self, sub: str):
        return LocalStore(str(self.root / sub))

    def read_back(self, sub: str, name: str) -> bytes:
        return (self.root / sub / name).read_bytes()


class NfsTarget(Target):
    kind = "nfs"

    def __init__(self, srv):
        self.srv = srv

    def make(self, sub: str, *, export=None, timeout: float = 5.0):
        from agent.stores.nfs import NfsStore

        return NfsStore(
            "127.0.0.1",
            str(export or self.srv.export),
            sub,
            nfs_port=self.srv.nfs_port,
            mount_port=self.srv.mount_port,
            timeout=timeout,
        )

    def read_back(self, sub: str, name: str) -> bytes:
        """nfs-cat from libnfs-utils: another client, the same server."""
        return subprocess.run(
            ["nfs-cat", self.srv.url(self.srv.export, f"{sub}/{name}")], check=True, capture_output=True
        ).stdout


class SmbTarget(Target):
    kind = "smb"

    def __init__(self, srv, tmp):
        self.srv = srv
        self.tmp = tmp

    def make(
        self,
        sub: str,
        *,
        share: str = "backups",
        password: str | None = None,
        encrypt: bool = False,
        timeout: float = 5.0,
    ):
        from agent.stores.smb import SmbStore

        return SmbStore(
            "127.0.0.1",
            share,
            sub,
            username=self.srv.user,
            password=self.srv.password if password is None else password,
            port=self.srv.port,
            encrypt=encrypt,
            timeout=timeout,
        )

    def read_back(self, sub: str, name: str) -> bytes:
        """samba's own smbclient: another client, the same server."""
        out = self.tmp / f"readback-{uuid.uuid4().hex}"
        d, _, base = f"{sub}/{name}".rpartition("/")
        r = self.srv.smbclient("backups", f'cd "{d}"; get "{base}" "{out}"')
        assert r.returncode == 0, r.stdout + r.stderr
        return out.read_bytes()


class S3Target(Target):
    """A prefix of a bucket on the session's Ceph RGW; read back with s3cmd."""

    kind = "s3"

    def __init__(self, gw, tmp):
        self.gw, self.tmp = gw, tmp
        self.bucket = gw.make_bucket()

    def make(self, sub: str, *, timeout: float = 10.0, max_attempts: int = 8):
        from agent.stores.s3 import S3Store

        return S3Store(
            self.gw.endpoint,
            self.bucket,
            sub,
            access_key=self.gw.access_key,
            secret_key=self.gw.secret_key,
            timeout=timeout,
            part_size=5 << 20,
            max_attempts=max_attempts,
        )

    def read_back(self, sub: str, name: str) -> bytes:
        return self.gw.get(self.bucket, f"{sub}/{name}", self.tmp / f"readback-{uuid.uuid4().hex}")


class Loop:
    """A loop device over a sparse file: a LUN the tests may format."""

    def __init__(self, path, size: int, *, direct_io: bool = False, sector_size: int = 0):
        with open(path, "wb") as f:
            f.truncate(size)
        self.file = path
        # direct_io: the loop device writes through to its file like a disk
        # would, instead of into the file's page cache
        self.dev = subprocess.run(
            [
                "losetup",
                "-f",
                "--show",
                *(["--direct-io=on"] if direct_io else []),
                *(["--sector-size", str(sector_size)] if sector_size else []),
                str(path),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def detach(self) -> None:
        from agent.stores.lun import forget_lun

        forget_lun(self.dev)
        subprocess.run(["losetup", "-d", self.dev], check=False)


class DiskTarget(Target):
    kind = "disk"

    def __init__(self, lo: Loop):
        self.lo = lo

    def make(self, sub: str, *, format_lun: bool = True):
        from agent.stores.blockdev import LocalBlockDevice
        from agent.stores.lun import open_lun

        return open_lun(self.lo.dev, lambda: LocalBlockDevice(self.lo.dev), format_lun=format_lun)

    def read_back(self, sub: str, name: str) -> bytes:
        """dd with O_DIRECT over the extents the catalog names."""
        size, where = self.make(sub).objects[name]
        if not isinstance(where, list):
            return where  # kept inline in the catalog
        out = b""
        for off, ln in where:
            out += subprocess.run(
                [
                    "dd",
                    f"if={self.lo.dev}",
                    "iflag=direct,skip_bytes,count_bytes",
                    f"skip={off}",
                    f"count={ln}",
                    "bs=1M",
                    "status=none",
                ],
                check=True,
                capture_output=True,
            ).stdout
        return out[:size]


class IscsiTarget(Target):
    kind = "iscsi"

    def __init__(self, srv, lun):
        self.srv = srv
        self.lun = lun
        self.key = f"test-iscsi-{lun.iqn}"

    def device(self, *, secret: str | None = None, timeout: float = 5.0):
        from agent.stores.iscsi import IscsiBlockDevice

        return IscsiBlockDevice(
            "127.0.0.1",
            self.lun.iqn,
            1,
            port=self.srv.port,
            user=self.lun.user,
            secret=self.lun.secret if secret is None else secret,
            timeout=timeout,
        )

    def make(self, sub: str, *, timeout: float = 5.0):
        from agent.stores.lun import open_lun

        return open_lun(self.key, lambda: self.device(timeout=timeout), format_lun=True)

    def read_back(self, sub: str, name: str) -> bytes:
        """What the target stored: its backing file, at the catalog's extents."""
        size, where = self.make(sub).objects[name]
        if not isinstance(where, list):
            return where
        with open(self.lun.file, "rb") as f:
            out = b""
            for off, ln in where:
                f.seek(off)
                out += f.read(ln)
        return out[:size]

    def forget(self) -> None:
        from agent.stores.lun import forget_lun

        forget_lun(self.key)


def snapshot(pool, vol) -> str:
    s = nid()
    pool.create_snapshot(vol, s, s[:8])
    return s
