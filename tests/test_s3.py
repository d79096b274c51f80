"""S3 backup points on a real Ceph RGW (the session's Ceph cluster, a user
made with radosgw-admin; no mocked S3): full and incremental backups,
restore bit for bit, deep verify and gc, an encrypted repository whose
objects s3cmd reads back without any plain data in them, the gateway
restarted while a backup streams, an agent killed with -9 mid-backup (its
incomplete uploads swept), and two agents racing to create one
repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from agent.api.v1 import host_pb2, jobs_pb2
from agent.errors import AuthFailed, InvalidArgument

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


def test_agent_killed_mid_backup_then_gc_aborts_its_uploads(make_agent, rgw, short_tmp):
    """kill -9 while a pack streams as a multipart upload: the upload stays
    incomplete (nothing visible), gc aborts it, and the next backup restores
    bit for bit."""
    bucket = rgw.make_bucket()
    bp = str(uuid.uuid4())
    a = make_agent(rgw.section(bp, bucket, "kill", extra="bandwidth_limit = 4194304\n"))
    a.config.chmod(0o600)
    a.start()
    data = {0: os.urandom(24 * MiB)}
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=32 * MiB, name="kill").uuid
        bk.write(vol, data)
        snap = bk.snap(vol, "s").uuid
        job_id = f"backup-{uuid.uuid4()}"
        c.submit(
            job_id,
            backup=jobs_pb2.BackupSpec(
                backup_point_uuid=bp,
                pool_uuid=bk.pool,
                volume_uuid=vol,
                snapshot_uuid=snap,
                backup_uuid=str(uuid.uuid4()),
            ),
        )
        deadline = time.monotonic() + 60
        while "kill/packs/" not in rgw.s3cmd("multipart", f"s3://{bucket}").stdout:
            assert time.monotonic() < deadline, "no multipart upload started"
            time.sleep(0.2)
    a.stop(signal.SIGKILL)
    assert not [k for k in rgw.s3cmd("ls", f"s3://{bucket}/kill/manifests/").stdout.split() if "manifests/" in k]
    a.start()
    with a.client() as c:
        job = c.run(f"gc-{uuid.uuid4()}", gc=jobs_pb2.GcSpec(backup_point_uuid=bp))
        assert job.state == OK and job.gc_result.partial_removed >= 1, job
        assert "kill/packs/" not in rgw.s3cmd("multipart", f"s3://{bucket}").stdout
        bk = Bk(a, c, bp=bp)
        result = bk.backup(vol, snap)
        restored = bk.restore(result.backup_uuid)
        out = short_tmp / "killed.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", bk.head(restored.volume_uuid), str(out)], check=True)
        assert out.read_bytes() == content(32 * MiB, data)
    assert a.stop() == 0


def test_two_agents_race_to_create_one_repository(make_agent, rgw, short_tmp):
    """Two agents back up into the same new prefix at once: the gateway's
    conditional PUT lets one create the repository, the other opens it;
    both backups land in it and each restores the other's."""
    bucket = rgw.make_bucket()
    bp = str(uuid.uuid4())
    agents = [make_agent(rgw.section(bp, bucket, "shared"), name=n) for n in ("a", "b")]
    datas = [{0: os.urandom(3 * MiB)}, {MiB: os.urandom(2 * MiB)}]
    snaps = []
    for a, data in zip(agents, datas, strict=True):
        a.config.chmod(0o600)
        a.start()
        with a.client() as c:
            bk = Bk(a, c, bp=bp)
            vol = bk.create(capacity=4 * MiB, name="race").uuid
            bk.write(vol, data)
            snaps.append((vol, bk.snap(vol, "s").uuid))
    results: list = [None, None]

    def run(i: int) -> None:
        with agents[i].client() as c:
            results[i] = Bk(agents[i], c, bp=bp).backup(*snaps[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(results), results
    keys = rgw.s3cmd("ls", f"s3://{bucket}/shared/").stdout
    assert keys.count("shared/config") == 1
    for i, a in enumerate(agents):
        other = results[1 - i]
        with a.client() as c:
            bk = Bk(a, c, bp=bp)
            restored = bk.restore(other.backup_uuid)
            out = short_tmp / f"race-{i}.raw"
            subprocess.run(["qemu-img", "convert", "-O", "raw", bk.head(restored.volume_uuid), str(out)], check=True)
            assert out.read_bytes() == content(4 * MiB, datas[1 - i])
        assert a.stop() == 0


def test_s3_health_reports_quota_object_lock_and_read_only_keys(make_agent, rgw, short_tmp):
    """A bucket quota is the backup point's size (RGW's X-RGW-Quota-*
    headers) and its bytes used what the gateway counts; object lock and
    its default retention are reported; keys that may only read make it
    degraded (backups are listed; backups and restores, which write a
    lock record, are refused); a wrong secret is
    auth_failed. The write probe writes nothing."""
    from agent.api.v1 import backups_pb2

    from support.cli import cli

    quota = 64 * MiB
    plain, locked = rgw.make_bucket(), rgw.make_bucket(lock=True)
    rgw.set_quota(plain, quota)
    rgw.boto().put_object_lock_configuration(
        Bucket=locked,
        ObjectLockConfiguration={
            "ObjectLockEnabled": "Enabled",
            "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
        },
    )
    reader = f"reader-{uuid.uuid4().hex[:6]}"
    reader_keys = rgw.add_user(reader)
    rgw.grant_read(plain, reader, short_tmp)
    bp, ro, lk, bad = (str(uuid.uuid4()) for _ in range(4))
    a = make_agent(
        rgw.section(bp, plain, "h")
        + rgw.section(ro, plain, "h", keys=reader_keys)
        + rgw.section(lk, locked, "h")
        + rgw.section(bad, plain, "h", keys=(rgw.access_key, "not-the-secret"))
    )
    a.config.chmod(0o600)
    a.start()
    data = {0: os.urandom(3 * MiB)}
    with a.client() as c:

        def check(u):
            return c.check_backup_point(backups_pb2.BackupPointRef(backup_point_uuid=u))

        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=4 * MiB, name="health").uuid
        bk.write(vol, data)
        snap = bk.snap(vol, "s").uuid
        result = bk.backup(vol, snap)
        keys = rgw.s3cmd("ls", "--recursive", f"s3://{plain}/h/").stdout
        st = check(bp)
        assert (st.status, st.total_bytes, st.object_lock, st.repository) == ("healthy", quota, "off", True), st
        assert st.used_bytes >= 3 * MiB and st.available_bytes == quota - st.used_bytes, st
        st = check(lk)
        assert (st.status, st.object_lock) == ("healthy", "on, GOVERNANCE 1 days by default"), st
        out = cli(a, "backup-point", "check", lk).stdout
        assert "object lock on, GOVERNANCE 1 days by default" in out, out
        st = check(ro)
        assert st.status == "degraded" and "may read but not write" in st.error, st
        assert st.object_lock.startswith("unknown"), st
        assert rgw.s3cmd("ls", "--recursive", f"s3://{plain}/h/").stdout == keys  # the probe wrote nothing
        listed = c.list_backups(backups_pb2.ListBackupsRequest(backup_point_uuid=ro)).backups
        assert [x.uuid for x in listed] == [result.backup_uuid]
        job = c.run(
            f"backup-{uuid.uuid4()}",
            backup=jobs_pb2.BackupSpec(
                backup_point_uuid=ro,
                pool_uuid=bk.pool,
                volume_uuid=vol,
                snapshot_uuid=snap,
                backup_uuid=str(uuid.uuid4()),
            ),
        )
        assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "ACCESS_DENIED", job
        st = check(bad)
        assert st.status == "auth_failed" and st.error_code == "AUTH_FAILED", st
        assert "not-the-secret" not in st.error
        # discovery: the buckets these keys see, as a backup point on them would report
        env = {**os.environ, "BLOCKFERRY_S3_SECRET": rgw.secret_key}
        run = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--socket", str(a.socket), "--json", "s3-discover", rgw.endpoint]
            + ["--username", rgw.access_key],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        found = {b["name"]: b for b in json.loads(run.stdout)["buckets"]}
        assert found[plain]["total_bytes"] == str(quota) and found[plain]["object_lock"] == "off", found[plain]
        assert int(found[plain]["used_bytes"]) >= 3 * MiB
        assert found[locked]["object_lock"] == "on, GOVERNANCE 1 days by default"
        assert found[locked]["versioning"] == "Enabled"  # object lock turns it on
        with pytest.raises(AuthFailed) as e:
            c.discover_s3(host_pb2.DiscoverS3Request(endpoint=rgw.endpoint, username=rgw.access_key, secret="nope"))
        assert (
            f"S3 endpoint {rgw.endpoint}: cannot list the buckets" in e.value.message and "nope" not in e.value.message
        )
        with pytest.raises(InvalidArgument) as e:
            c.discover_s3(host_pb2.DiscoverS3Request(endpoint="ftp://x", username="k", secret="s"))
        assert e.value.field == "endpoint"
    assert "not-the-secret" not in a.log_text() and reader_keys[1] not in a.log_text()
    assert a.stop() == 0


def test_s3_object_lock_holds_a_locked_backup_at_the_gateway(make_agent, rgw, short_tmp):
    """lock_mode compliance on a bucket with object lock: every object a
    locked backup needs carries the gateway's retention, so the gateway
    itself refuses to delete their versions (an independent client tries);
    the agent refuses first and says until when; a lock is extended on the
    objects too; when it ends the backup is deleted and gc takes every
    version. A bucket without object lock makes such a backup point
    degraded."""
    from botocore.exceptions import ClientError

    from agent.api.v1 import backups_pb2
    from agent.errors import BackupLocked

    locked, plain = rgw.make_bucket(lock=True), rgw.make_bucket()
    bp, nolock = str(uuid.uuid4()), str(uuid.uuid4())
    mode = 'lock_mode = "compliance"\n'
    a = make_agent(rgw.section(bp, locked, "h", extra=mode) + rgw.section(nolock, plain, "h", extra=mode))
    a.config.chmod(0o600)
    a.start()
    s3 = rgw.boto()
    data = {0: os.urandom(3 * MiB)}
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=4 * MiB, name="held").uuid
        bk.write(vol, data)
        snap = bk.snap(vol, "s").uuid
        until = time.time() + 25  # room for the steps below on a loaded CI machine
        r = bk.backup(vol, snap, lock_until=until)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=locked, Prefix="h/")["Contents"]]
        needed = [k for k in keys if k.startswith(("h/packs/", "h/manifests/", "h/blocks/", "h/holds/"))]
        assert f"h/manifests/{r.backup_uuid}" in needed and any(k.endswith(".idx") for k in needed), keys
        for k in needed:
            ret = s3.get_object_retention(Bucket=locked, Key=k)["Retention"]
            assert ret["Mode"] == "COMPLIANCE" and ret["RetainUntilDate"].timestamp() >= int(until), (k, ret)
        with pytest.raises(BackupLocked) as e:
            bk.delete(r.backup_uuid)
        assert "compliance lock" in e.value.message
        # the gateway itself: no version of the manifest can be deleted
        manifest = f"h/manifests/{r.backup_uuid}"
        version = s3.list_object_versions(Bucket=locked, Prefix=manifest)["Versions"][0]["VersionId"]
        with pytest.raises(ClientError) as refused:
            s3.delete_object(Bucket=locked, Key=manifest, VersionId=version)
        assert refused.value.response["Error"]["Code"] == "AccessDenied"
        assert rgw.get(locked, manifest, short_tmp / "m") == s3.get_object(Bucket=locked, Key=manifest)["Body"].read()
        # extended: on the objects too
        until += 3
        b = c.lock_backup(
            backups_pb2.LockBackupRequest(backup_point_uuid=bp, backup_uuid=r.backup_uuid, until=int(until))
        )
        assert (int(b.locked_until), b.lock_mode) == (int(until), "compliance")
        ret = s3.get_object_retention(Bucket=locked, Key=manifest)["Retention"]
        assert ret["RetainUntilDate"].timestamp() >= int(until)
        g = bk.gc()
        assert g.packs_locked == 1 and g.packs_deleted == 0, g
        restored = bk.restore(r.backup_uuid).volume_uuid
        assert bk.digest(restored) == bk.digest(vol, snap) == r.image_digest
        # a backup point asking for object lock on a bucket without it
        st = c.check_backup_point(backups_pb2.BackupPointRef(backup_point_uuid=nolock))
        assert st.status == "degraded" and "needs object lock" in st.error, st
        # the date passes: deleted, and gc leaves no version behind
        time.sleep(max(0.0, until - time.time()) + 1.5)
        bk.delete(r.backup_uuid)
        g = bk.gc()
        assert g.packs_deleted == 1, g
        left = s3.list_object_versions(Bucket=locked, Prefix="h/")
        kept = [v["Key"] for v in left.get("Versions", []) + left.get("DeleteMarkers", [])]
        assert not [k for k in kept if k.startswith(("h/packs/", "h/manifests/", "h/blocks/", "h/holds/"))], kept
    assert a.stop() == 0
