"""Ceph's S3 gateway (radosgw) on the tests' single-node Ceph cluster, a
user made with radosgw-admin, and s3cmd (Debian's, another S3 client than
ours) to read back and to check what the gateway itself enforces. The
recipe and its gotchas: ../shared/notes/facts.md, "Ceph RGW"."""

from __future__ import annotations

import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

from support.cephcluster import CephCluster, free_port


class Rgw:
    def __init__(self, cluster: CephCluster):
        self.cluster = cluster
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "BF" + uuid.uuid4().hex[:18].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.proc: subprocess.Popen | None = None
        self.data = cluster.root / "rgw"
        self.s3cfg = cluster.root / "s3cfg"

    def setup(self) -> Rgw:
        """Configure, start, and make the user and s3cmd's config."""
        c = self.cluster
        # RGW makes 7 pools: 32 PGs each would pass one OSD's 250-PG limit
        c.ceph("config", "set", "global", "osd_pool_default_pg_num", "8")
        c.ceph("config", "set", "global", "osd_pool_default_pgp_num", "8")
        self.data.mkdir(exist_ok=True)
        conf = c.conf.read_text()
        if "[client.rgw.s3]" not in conf:
            c.conf.write_text(
                conf + f"\n[client.rgw.s3]\nms mon client mode = crc\nrgw data = {self.data}\n"
                f"rgw frontends = beast endpoint=127.0.0.1:{self.port}\n"
            )
        self.start()
        self.admin(
            "user", "create", "--uid", "blockferry", "--display-name", "blockferry",
            "--access-key", self.access_key, "--secret", self.secret_key,
        )  # fmt: skip
        self.s3cfg.write_text(
            f"[default]\naccess_key = {self.access_key}\nsecret_key = {self.secret_key}\n"
            f"host_base = 127.0.0.1:{self.port}\nhost_bucket = 127.0.0.1:{self.port}\nuse_https = False\n"
            "signature_v2 = False\n"
        )
        self.s3cfg.chmod(0o600)
        return self

    def start(self) -> None:
        c = self.cluster
        self.proc = subprocess.Popen(
            ["radosgw", "-f", "-c", str(c.conf), "-n", "client.rgw.s3"],
            stdout=subprocess.DEVNULL,
            stderr=open(c.root / "log" / "rgw.out", "ab"),
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.endpoint, timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, "radosgw exited"
                assert time.monotonic() < deadline, "radosgw did not answer"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def admin(self, *args: str) -> str:
        return subprocess.run(
            ["radosgw-admin", "-c", str(self.cluster.conf), *args], check=True, capture_output=True, text=True
        ).stdout

    def s3cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["s3cmd", "-c", str(self.s3cfg), *args], check=check, capture_output=True, text=True, timeout=120
        )

    def make_bucket(self, name: str | None = None, *, lock: bool = False) -> str:
        """A new bucket; with object lock enabled if lock (s3cmd cannot:
        the test's own boto3 client makes that one)."""
        name = name or f"bf-{uuid.uuid4().hex[:12]}"
        if lock:
            self.boto().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            self.s3cmd("mb", f"s3://{name}")
        return name

    def boto(self, access_key: str = "", secret_key: str = ""):
        """A boto3 client of its own, for what s3cmd cannot do."""
        import boto3
        import botocore.config

        cfg = botocore.config.Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name="us-east-1",
            config=cfg,
        )

    def add_user(self, uid: str) -> tuple[str, str]:
        """Another S3 user, with no bucket of its own; its (access, secret) keys."""
        access, secret = "BF" + uuid.uuid4().hex[:18].upper(), uuid.uuid4().hex
        self.admin("user", "create", "--uid", uid, "--display-name", uid, "--access-key", access, "--secret", secret)
        return access, secret

    def grant_read(self, bucket: str, uid: str, tmp: Path) -> None:
        """A bucket policy (set with s3cmd) that lets user uid list and read, not write."""
        import json

        policy = tmp / f"policy-{bucket}.json"
        arn = f"arn:aws:s3:::{bucket}"
        policy.write_text(
            json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"AWS": [f"arn:aws:iam:::user/{uid}"]},
                            "Action": ["s3:GetObject", "s3:ListBucket"],
                            "Resource": [arn, f"{arn}/*"],
                        }
                    ],
                }
            )
        )
        self.s3cmd("setpolicy", str(policy), f"s3://{bucket}")

    def set_quota(self, bucket: str, max_size: int) -> None:
        self.admin("quota", "set", "--quota-scope=bucket", f"--bucket={bucket}", f"--max-size={max_size}")
        self.admin("quota", "enable", "--quota-scope=bucket", f"--bucket={bucket}")

    def section(self, bp_uuid: str, bucket: str, prefix: str = "", extra: str = "", keys: tuple = ()) -> str:
        """An agent's [backup_points.<uuid>] for a bucket of this gateway
        (with the fixture user's keys, or keys=(access, secret))."""
        access, secret = keys or (self.access_key, self.secret_key)
        return (
            f'[backup_points.{bp_uuid}]\ntype = "s3"\nendpoint = "{self.endpoint}"\nbucket = "{bucket}"\n'
            f'sub_dir = "{prefix}"\nusername = "{access}"\nsecret = "{secret}"\n'
            f"chunk_size = 1048576\npart_size = 5242880\ntimeout = 10\n{extra}"
        )

    def get(self, bucket: str, key: str, out: Path) -> bytes:
        self.s3cmd("get", "--force", f"s3://{bucket}/{key}", str(out))
        return out.read_bytes()
