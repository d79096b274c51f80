"""Backups through a real agent process: backup, restore (to qcow2 and to
RBD), verify, list, delete, gc, encryption, crash safety and bad input. Every
restore is checked against the source snapshot's content."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from agent.api.v1 import jobs_pb2

from support.agents import BP_UUID, POOL2_UUID, POOL_UUID, RBD_POOL_UUID
from support.backups import FINAL, OK, Bk, bp_files, three_generations
from support.volumes import MiB, new_id, ref_digest_of, rpc_error


@pytest.fixture
def bk(agent):
    with agent.client() as c:
        yield Bk(agent, c)


def test_full_incremental_restore_verify_list_stats(bk):
    vol, gens = three_generations(bk)
    assert gens[1][1].chunks_read == 2 and gens[2][1].chunks_read == 2  # only what the bitmaps report
    assert gens[1][1].parent_backup_uuid == gens[0][1].backup_uuid
    for snap, r, digest in gens:
        restored = bk.restore(r.backup_uuid)
        assert restored.image_digest == digest
        assert bk.digest(restored.volume_uuid) == digest  # read back by an independent job
        assert ref_digest_of(restored.access_path, bk.agent.workdir) == digest
        cmp = subprocess.run(["qemu-img", "compare", "-U", bk.layer(vol, snap), restored.access_path])
        assert cmp.returncode == 0
        assert bk.verify(r.backup_uuid, deep=True).state == OK
    listed = bk.list(volume_uuid=vol)
    assert [x.uuid for x in listed] == [g[1].backup_uuid for g in gens]
    assert [x.uuid for x in bk.list(description="GENERATION 1")] == [gens[1][1].backup_uuid]
    t1 = listed[1].created_at
    assert [x.uuid for x in bk.list(created_after=t1)] == [g[1].backup_uuid for g in gens[1:]]
    assert [x.uuid for x in bk.list(created_before=t1)] == [gens[0][1].backup_uuid]
    assert bk.list(volume_uuid=new_id()) == []
    st = bk.stats()
    assert st.backups == 3 and not st.encrypted
    assert st.logical_bytes == sum(x.data_bytes for x in listed)
    assert st.unique_bytes < st.logical_bytes  # shared chunks stored once
    assert 0 < st.stored_bytes


def raw_sha256(cmd: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as p:
        while block := p.stdout.read(1 << 20):
            h.update(block)
    assert p.returncode == 0, cmd
    return h.hexdigest()


def qcow2_raw_sha256(path: str, tmp: Path) -> str:
    raw = tmp / "raw.tmp"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(raw)], check=True)
    try:
        return raw_sha256(["cat", str(raw)])
    finally:
        raw.unlink()


def test_restore_across_formats_qcow2_and_rbd(rbd_agent, ceph):
    with rbd_agent.client() as c:
        bk = Bk(rbd_agent, c)
        vol, gens = three_generations(bk)
        for snap, r, digest in gens:
            restored = bk.restore(r.backup_uuid, pool=RBD_POOL_UUID)
            assert restored.image_digest == digest
            assert bk.digest(restored.volume_uuid, pool=RBD_POOL_UUID) == digest
            # and plain sha256 of the raw bytes, read by the rbd and qemu-img tools themselves
            assert raw_sha256(
                ["rbd", "-c", str(ceph.conf), "export", f"rbd/{restored.volume_uuid}", "-"]
            ) == qcow2_raw_sha256(bk.layer(vol, snap), bk.agent.workdir)
        # and an RBD volume's backups restore into qcow2
        rv = bk.create(capacity=16 * MiB, name="rbd-src", pool_uuid=RBD_POOL_UUID).uuid
        s1 = bk.call(
            "CreateSnapshot", pool_uuid=RBD_POOL_UUID, volume_uuid=rv, snapshot_uuid=new_id(), name="empty"
        ).uuid
        r1 = bk.backup(rv, s1, pool=RBD_POOL_UUID)
        assert r1.mode == "full" and r1.chunks_read == 0
        restored = bk.restore(r1.backup_uuid, pool=POOL2_UUID)
        assert bk.digest(restored.volume_uuid, pool=POOL2_UUID) == r1.image_digest


def test_delete_middle_backup_then_gc_keeps_others_exact(bk):
    vol, gens = three_generations(bk)
    before = bk.stats()
    bk.delete(gens[1][1].backup_uuid)
    assert [x.uuid for x in bk.list()] == [gens[0][1].backup_uuid, gens[2][1].backup_uuid]
    r = bk.gc()
    assert r.chunks_removed >= 1 and r.bytes_freed > 0
    after = bk.stats()
    assert after.backups == 2 and after.stored_bytes < before.stored_bytes
    for _, rr, digest in (gens[0], gens[2]):
        assert bk.verify(rr.backup_uuid, deep=True).state == OK
        assert bk.digest(bk.restore(rr.backup_uuid).volume_uuid) == digest
    e = rpc_error(bk.delete, gens[1][1].backup_uuid)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "backup_uuid" in e.details()
    # a backup after GC deduplicates only against what is still there
    s = bk.snap(vol, "after-gc").uuid
    r4 = bk.backup(vol, s)
    assert bk.digest(bk.restore(r4.backup_uuid).volume_uuid) == bk.digest(vol, s)


def test_tracking_lost_falls_back_and_full_forced(bk):
    vol = bk.create(capacity=8 * MiB).uuid
    bk.write(vol, {0: os.urandom(4 * MiB)})
    r1 = bk.backup(vol, bk.snap(vol, "s1").uuid)
    bk.write(vol, {2 * MiB: b"x" * 10})
    s2 = bk.snap(vol, "s2").uuid
    subprocess.run(["qemu-img", "bitmap", "--remove", bk.layer(vol, s2), "bf-dirty"], check=True)
    r2 = bk.backup(vol, s2)
    assert r2.mode == "fallback" and r2.chunks_read == 4
    assert r2.new_chunks == 1 and r2.changed_chunks == 1  # only the changed chunk was written
    assert bk.digest(bk.restore(r2.backup_uuid).volume_uuid) == bk.digest(vol, s2)
    r3 = bk.backup(vol, bk.snap(vol, "s3").uuid, full=True)
    assert r3.mode == "full" and r3.chunks_read == 4 and r3.new_chunks == 0
    assert r1.backup_uuid != r3.backup_uuid


PATTERN = b"BLOCKFERRY-PLAINTEXT-PATTERN-7d1f"


def encrypted_agent(make_agent, password: str, name: str = "a"):
    a = make_agent(name=name)
    d = a.workdir / "agent.conf.d"
    d.mkdir(exist_ok=True)
    f = d / "bp.toml"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, f'[backup_points.{BP_UUID}]\npassword = "{password}"\n'.encode())
    os.close(fd)
    return a


def test_encrypted_repository(make_agent):
    secret = "correct horse battery staple"
    a = encrypted_agent(make_agent, secret).start()
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=8 * MiB).uuid
        bk.write(vol, {0: PATTERN * (MiB // len(PATTERN)), 3 * MiB: os.urandom(MiB)})
        snap = bk.snap(vol, "s1").uuid
        r = bk.backup(vol, snap, name="secret-name", description="PATTERN-in-description")
        assert bk.stats().encrypted
        assert bk.digest(bk.restore(r.backup_uuid).volume_uuid) == bk.digest(vol, snap)
    assert a.stop() == 0
    files = bp_files(a)
    assert any("packs" in str(p) for p in files)
    for p in files:
        data = p.read_bytes()
        assert PATTERN not in data and b"PATTERN-in-description" not in data and b"secret-name" not in data, p
        assert secret.encode() not in data, p
    assert secret not in a.log_text()
    # the wrong password: a clear error, never garbage, and nothing changes
    (a.workdir / "agent.conf.d" / "bp.toml").write_text(
        f'[backup_points.{BP_UUID}]\npassword = "Not-The-Password-42"\n'
    )
    os.chmod(a.workdir / "agent.conf.d" / "bp.toml", 0o600)
    before = {p: p.stat().st_mtime_ns for p in bp_files(a)}
    a.start()
    with a.client() as c:
        e = rpc_error(Bk(a, c).list)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "pass_word" in e.details()
        assert "Not-The-Password-42" not in e.details()
    assert a.stop() == 0
    assert "Not-The-Password-42" not in a.log_text()
    assert {p: p.stat().st_mtime_ns for p in bp_files(a)} == before


def test_password_in_a_world_readable_file_is_refused(make_agent):
    a = encrypted_agent(make_agent, "pw")
    os.chmod(a.workdir / "agent.conf.d" / "bp.toml", 0o644)
    proc = subprocess.run([*a_cmd(a), "--show-config"], capture_output=True, text=True)
    assert proc.returncode != 0 and "0600" in proc.stderr and 'pw"' not in proc.stderr


def a_cmd(a):
    import sys

    return [sys.executable, "-m", "agent.server", "-c", str(a.config)]


def test_bad_input(bk, agent):
    vol = bk.create(capacity=4 * MiB).uuid
    bk.write(vol, {0: os.urandom(MiB)})
    snap = bk.snap(vol, "s1").uuid
    r = bk.backup(vol, snap)
    files = {p: p.stat().st_mtime_ns for p in bp_files(agent)}

    def refused(code, field, **spec):
        kind, body = next(iter(spec.items()))
        e = rpc_error(bk.c.submit, new_id(), **{kind: body})
        assert e.code() == code, e.details()
        assert field in e.details(), e.details()

    refused(
        grpc.StatusCode.NOT_FOUND,
        "snapshot_uuid",
        backup=jobs_pb2.BackupSpec(
            backup_point_uuid=BP_UUID,
            pool_uuid=POOL_UUID,
            volume_uuid=vol,
            snapshot_uuid=new_id(),
            backup_uuid=new_id(),
        ),
    )
    refused(
        grpc.StatusCode.NOT_FOUND,
        "backup_point_uuid",
        backup=jobs_pb2.BackupSpec(
            backup_point_uuid=new_id(), pool_uuid=POOL_UUID, volume_uuid=vol, snapshot_uuid=snap, backup_uuid=new_id()
        ),
    )
    refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "backup_uuid",
        backup=jobs_pb2.BackupSpec(
            backup_point_uuid=BP_UUID,
            pool_uuid=POOL_UUID,
            volume_uuid=vol,
            snapshot_uuid=snap,
            backup_uuid=r.backup_uuid,
        ),
    )
    refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        "backup_uuid",
        backup=jobs_pb2.BackupSpec(
            backup_point_uuid=BP_UUID, pool_uuid=POOL_UUID, volume_uuid=vol, snapshot_uuid=snap, backup_uuid="x/../y"
        ),
    )
    refused(
        grpc.StatusCode.NOT_FOUND,
        "backup_uuid",
        restore=jobs_pb2.RestoreSpec(
            backup_point_uuid=BP_UUID, backup_uuid=new_id(), pool_uuid=POOL_UUID, volume_uuid=new_id(), name="n"
        ),
    )
    refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "volume_uuid",
        restore=jobs_pb2.RestoreSpec(
            backup_point_uuid=BP_UUID, backup_uuid=r.backup_uuid, pool_uuid=POOL_UUID, volume_uuid=vol, name="n"
        ),
    )
    refused(
        grpc.StatusCode.ALREADY_EXISTS,
        "name",
        restore=jobs_pb2.RestoreSpec(
            backup_point_uuid=BP_UUID, backup_uuid=r.backup_uuid, pool_uuid=POOL_UUID, volume_uuid=new_id(), name="vol"
        ),
    )
    refused(
        grpc.StatusCode.NOT_FOUND,
        "backup_uuid",
        verify=jobs_pb2.VerifySpec(backup_point_uuid=BP_UUID, backup_uuid=new_id()),
    )
    e = rpc_error(bk.list, created_after=10, created_before=5)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "created_before" in e.details()
    assert {p: p.stat().st_mtime_ns for p in bp_files(agent)} == files  # nothing changed
    assert len(bk.call("ListVolumes").volumes) == 1


def test_newer_repository_format_is_refused(make_agent):
    a = make_agent()
    bp = a.workdir / "bp"
    bp.mkdir()
    (bp / "config").write_text('{"format_version": 99, "id": "x", "chunk_size": 4194304}')
    a.start()
    with a.client() as c:
        e = rpc_error(Bk(a, c).list)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "upgrade the agent" in e.details()
    assert a.stop() == 0
    assert sorted(p.name for p in bp.iterdir()) == ["config"]


def test_foreign_directory_is_never_touched(make_agent):
    a = make_agent()
    bp = a.workdir / "bp"
    bp.mkdir()
    (bp / "someone-elses.txt").write_text("keep me")
    a.start()
    with a.client() as c:
        e = rpc_error(Bk(a, c).list)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "never touched" in e.details()
    assert a.stop() == 0
    assert [p.name for p in bp.iterdir()] == ["someone-elses.txt"]


def test_cancelled_backup_and_restore_leave_nothing_that_looks_complete(make_agent):
    a = make_agent("[jobs]\nbandwidth_limit = 20000000\n").start()  # slow enough to cancel mid-way
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=64 * MiB).uuid
        bk.write(vol, {0: os.urandom(32 * MiB)})
        snap = bk.snap(vol, "s1").uuid
        full = bk.backup(vol, snap)  # slow but complete, for the restore below

        def cancel_midway(job_id):
            while bk.c.get(job_id).progress.percent < 20:
                time.sleep(0.01)
            bk.c.cancel(job_id)
            while (job := bk.c.get(job_id)).state not in FINAL:
                time.sleep(0.01)
            return job

        bid = new_id()
        bk.c.submit(
            "b-cancel",
            backup=jobs_pb2.BackupSpec(
                backup_point_uuid=BP_UUID,
                pool_uuid=POOL_UUID,
                volume_uuid=vol,
                snapshot_uuid=snap,
                backup_uuid=bid,
                full=True,
            ),
        )
        assert cancel_midway("b-cancel").state == jobs_pb2.JOB_STATE_CANCELLED
        assert [x.uuid for x in bk.list()] == [full.backup_uuid]
        new_vol = new_id()
        bk.c.submit(
            "r-cancel",
            restore=jobs_pb2.RestoreSpec(
                backup_point_uuid=BP_UUID,
                backup_uuid=full.backup_uuid,
                pool_uuid=POOL_UUID,
                volume_uuid=new_vol,
                name="r",
            ),
        )
        job = cancel_midway("r-cancel")
        assert job.state == jobs_pb2.JOB_STATE_CANCELLED and job.error.code == "CANCELLED"
        assert [v.uuid for v in bk.call("ListVolumes").volumes] == [vol]
        vol_dir = a.workdir / "pool" / f"pool-{POOL_UUID}" / "volume"
        assert not [p for p in vol_dir.iterdir() if new_vol in p.name]  # no temporary copy left either
        assert bk.verify(full.backup_uuid).state == OK
    assert a.stop() == 0


def _restore_in_place(bk: Bk, backup_uuid: str, vol: str, pool: str, keep: bool = False):
    return bk.c.run(
        f"restore-in-place-{new_id()}",
        restore=jobs_pb2.RestoreSpec(
            backup_point_uuid=bk.bp,
            backup_uuid=backup_uuid,
            pool_uuid=pool,
            volume_uuid=vol,
            in_place=True,
            keep_safety_snapshot=keep,
        ),
    )


@pytest.mark.parametrize("kind", ["qcow2", "rbd"])
def test_restore_in_place_overwrites_with_a_safety_snapshot(rbd_agent, ceph, kind):
    """Seed 003's restore to a disk: the live volume becomes the backup
    exactly (data, zero chunks and the larger volume's tail, read back with
    qemu-img / rbd export), after a safety snapshot that a failed restore
    rolls back to; a volume smaller than the backup, or open by a client, is
    refused."""
    import hashlib

    import rados
    import rbd

    pool = RBD_POOL_UUID if kind == "rbd" else POOL_UUID
    cluster = rados.Rados(conffile=str(ceph.conf))
    cluster.connect(timeout=10)
    io = cluster.open_ioctx("rbd")

    def put(bk, vol, writes):
        if kind == "qcow2":
            bk.write(vol, writes)
            return
        with rbd.Image(io, vol) as img:
            for off, data in writes.items():
                img.write(data, off)
            img.flush()

    def raw(bk, vol):
        if kind == "rbd":
            return raw_sha256(["rbd", "-c", str(ceph.conf), "export", f"rbd/{vol}", "-"])
        return qcow2_raw_sha256(bk.head(vol), bk.agent.workdir)

    try:
        with rbd_agent.client() as c:
            bk = Bk(rbd_agent, c)
            src = bk.create(capacity=8 * MiB, name="src", pool_uuid=pool).uuid
            writes = {0: os.urandom(2 * MiB), 5 * MiB: os.urandom(4096)}
            put(bk, src, writes)
            s = bk.call("CreateSnapshot", pool_uuid=pool, volume_uuid=src, snapshot_uuid=new_id(), name="s").uuid
            r = bk.backup(src, s, pool=pool)
            expected = bytearray(12 * MiB)  # the source, then the larger target's tail as zeros
            for off, data in writes.items():
                expected[off : off + len(data)] = data
            # the target: larger, with data everywhere the backup has zeros
            dst = bk.create(capacity=12 * MiB, name="dst", pool_uuid=pool).uuid
            put(bk, dst, {0: os.urandom(12 * MiB)})
            before = bk.digest(dst, pool=pool)
            d0 = bk.call("CreateSnapshot", pool_uuid=pool, volume_uuid=dst, snapshot_uuid=new_id(), name="d0").uuid
            base = bk.backup(dst, d0, pool=pool)
            job = _restore_in_place(bk, r.backup_uuid, dst, pool, keep=True)
            assert job.state == OK, job.error
            res = job.restore_result
            assert res.volume_uuid == dst and res.image_digest == r.image_digest and res.safety_snapshot_uuid
            assert not res.safety_snapshot_deleted
            assert raw(bk, dst) == hashlib.sha256(expected).hexdigest()
            assert bk.digest(dst, res.safety_snapshot_uuid, pool=pool) == before  # the way back
            # change tracking saw the overwrite: an incremental from before it restores to the new content
            d1 = bk.call("CreateSnapshot", pool_uuid=pool, volume_uuid=dst, snapshot_uuid=new_id(), name="d1").uuid
            incr = bk.backup(dst, d1, pool=pool, parent=base.backup_uuid)
            assert incr.mode == "incremental" and incr.image_digest == bk.digest(dst, d1, pool=pool)
            again = bk.restore(incr.backup_uuid, pool=pool)
            assert bk.digest(again.volume_uuid, pool=pool) == bk.digest(dst, d1, pool=pool)
            # by default the safety snapshot goes once the restore has succeeded: they do not pile up
            job = _restore_in_place(bk, incr.backup_uuid, dst, pool)
            assert job.state == OK, job.error
            assert job.restore_result.safety_snapshot_deleted and not job.restore_result.safety_snapshot_uuid
            assert bk.digest(dst, pool=pool) == bk.digest(dst, d1, pool=pool)

            def safety_snapshots() -> list[str]:
                snaps = bk.call("ListSnapshots", pool_uuid=pool, volume_uuid=dst).snapshots
                return [x.uuid for x in snaps if x.name.startswith("pre-restore-")]

            assert safety_snapshots() == [res.safety_snapshot_uuid]  # only the one kept on purpose
            # a smaller volume is refused, naming the field
            small = bk.create(capacity=4 * MiB, name="small", pool_uuid=pool).uuid
            e = rpc_error(_restore_in_place, bk, r.backup_uuid, small, pool)  # refused at submission
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RESTORE_TOO_SMALL" in e.details()
            assert "volume_uuid" in e.details()
            # a volume open by a client is refused
            if kind == "rbd":
                with rbd.Image(io, dst):  # a writable open registers a watch, as a VM's librbd does
                    job = _restore_in_place(bk, r.backup_uuid, dst, pool)
            else:
                from agent.volumes.nbd import QemuNbd

                with QemuNbd(bk.head(dst), readonly=False, run_dir=str(bk.run_dir)):
                    job = _restore_in_place(bk, r.backup_uuid, dst, pool)
            assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "IN_USE", job
            assert safety_snapshots() == [res.safety_snapshot_uuid]  # refused before its own
            # a failure half way (a damaged pack) rolls the volume back to what it was
            put(bk, dst, {3 * MiB: os.urandom(MiB)})
            target_before = raw(bk, dst)
            packs = [
                p
                for p in (bk.agent.workdir / "bp" / "packs").iterdir()
                if not p.name.endswith(".idx") and not p.name.startswith(".")
            ]
            for p in packs:
                with open(p, "r+b") as f:
                    f.seek(p.stat().st_size // 2)
                    f.write(b"\xff" * 64)
            job = _restore_in_place(bk, r.backup_uuid, dst, pool)
            assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "DATA_CORRUPT", job
            assert raw(bk, dst) == target_before
            assert len(safety_snapshots()) == 2  # a failed restore keeps its way back
    finally:
        io.close()
        cluster.shutdown()
