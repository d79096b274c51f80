"""RBD volumes through a real agent against a real single-node Ceph cluster."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import grpc
import pytest
import rados
import rbd

from agent import native
from agent.api.v1 import jobs_pb2

from support.agents import RBD2_POOL_UUID, RBD_POOL_UUID
from support.volumes import Vol, new_id, rpc_error

MiB = 1 << 20
CAP = 64 * MiB
OBJ = 4 * MiB  # RBD object size (order 22)


@pytest.fixture
def ceph_io(ceph):
    cluster = rados.Rados(conffile=str(ceph.conf), conf={"rados_osd_op_timeout": "30", "rados_mon_op_timeout": "30"})
    cluster.connect(timeout=10)
    ios = {name: cluster.open_ioctx(name) for name in ("rbd", "rbd2")}
    yield ios
    _purge(ios)
    for io in ios.values():
        io.close()
    cluster.shutdown()


def _purge(ios) -> None:
    """Remove every image the test left (clones first)."""
    for _ in range(5):
        left = 0
        for io in ios.values():
            for name in rbd.RBD().list(io):
                try:
                    with rbd.Image(io, name) as img:
                        for s in img.list_snaps():
                            if img.is_protected_snap(s["name"]):
                                img.unprotect_snap(s["name"])
                            img.remove_snap(s["name"])
                    rbd.RBD().remove(io, name)
                except rbd.Error:
                    left += 1
        if not left:
            return


@pytest.fixture
def rv(rbd_agent, ceph_io):
    with rbd_agent.client() as c:
        v = Vol(rbd_agent, c, pool=RBD_POOL_UUID)
        v.io = ceph_io
        yield v


def rbd_write(io, vol: str, writes: dict[int, bytes], discards: dict[int, int] | None = None) -> None:
    """Write as a client (a VM through librbd) would."""
    with rbd.Image(io, vol) as img:
        for off, data in writes.items():
            img.write(data, off)
        for off, length in (discards or {}).items():
            img.write_zeroes(off, length)
        img.flush()


def export_sha(ceph, image_spec: str, tmp) -> tuple[str, bytes]:
    """Independent check: `rbd export` and hashlib."""
    out = tmp / f"export-{new_id()}.raw"
    ceph.rbd("export", image_spec, str(out))
    data = out.read_bytes()
    out.unlink()
    return hashlib.sha256(data).hexdigest(), data


def ref_image_digest(data: bytes) -> str:
    r = native.RefImageHash()
    r.update(data)
    return r.digest().hex()


def test_create_info_features_delete(rv, ceph_io):
    info = rv.create(name="rbd-disk")
    assert info.format == "rbd" and info.capacity == CAP and info.access_path == f"rbd:rbd/{info.uuid}"
    with rbd.Image(ceph_io["rbd"], info.uuid) as img:
        assert img.features() & rbd.RBD_FEATURE_FAST_DIFF and img.features() & rbd.RBD_FEATURE_DEEP_FLATTEN
    rbd_write(ceph_io["rbd"], info.uuid, {0: b"x" * MiB, 10 * MiB: b"y" * 4096})
    got = rv.call("GetVolume", volume_uuid=info.uuid)
    # diff_iterate reports a new object from its start: a superset within the touched objects
    assert MiB + 4096 <= got.used <= 2 * OBJ and got.name == "rbd-disk"
    assert info.uuid in [v.uuid for v in rv.call("ListVolumes").volumes]
    st = rv.c.get_pool_status(__import__("agent.api.v1.volumes_pb2", fromlist=["x"]).PoolRef(pool_uuid=RBD_POOL_UUID))
    assert st.status == "healthy" and st.total_bytes > 0 and st.type == "rbd"
    e = rpc_error(rv.create, volume_uuid=info.uuid)
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    rv.call("DeleteVolume", volume_uuid=info.uuid)
    assert info.uuid not in rbd.RBD().list(ceph_io["rbd"])
    assert rpc_error(rv.call, "GetVolume", volume_uuid=info.uuid).code() == grpc.StatusCode.NOT_FOUND


def test_adopt_existing_image(rv, ceph_io, ceph, tmp_path):
    rbd.RBD().create(ceph_io["rbd"], "legacy-disk", 8 * MiB, old_format=False, features=61)
    rbd_write(ceph_io["rbd"], "legacy-disk", {MiB: os.urandom(MiB)})
    _, before = export_sha(ceph, "rbd/legacy-disk", tmp_path)
    info = rv.create(capacity=0, backing_file="legacy-disk", name="adopted")
    assert info.capacity == 8 * MiB and "legacy-disk" not in rbd.RBD().list(ceph_io["rbd"])
    assert rv.digest(info.uuid) == ref_image_digest(before)
    e = rpc_error(rv.create, capacity=0, backing_file="no-such-image")
    assert e.code() == grpc.StatusCode.NOT_FOUND and "backing_file" in e.details()


def test_snapshots_rollback_tree_and_middle_delete(rv, ceph_io, ceph, tmp_path):
    vid = rv.create().uuid
    io = ceph_io["rbd"]
    rbd_write(io, vid, {0: os.urandom(MiB)})
    s1 = rv.snap(vid, "s1")
    rbd_write(io, vid, {MiB: os.urandom(2 * MiB), 20 * MiB: os.urandom(MiB)})
    s2 = rv.snap(vid, "s2")
    rbd_write(io, vid, {40 * MiB: os.urandom(MiB)})
    s3 = rv.snap(vid, "s3")
    rbd_write(io, vid, {60 * MiB: b"head" * 1000})
    want = {s.uuid: export_sha(ceph, f"rbd/{vid}@{s.uuid}", tmp_path)[1] for s in (s1, s2, s3)}
    for s in (s1, s2, s3):
        assert rv.digest(vid, s.uuid) == ref_image_digest(want[s.uuid])
    # deleting the middle snapshot keeps the others exact
    rv.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    for s in (s1, s3):
        assert export_sha(ceph, f"rbd/{vid}@{s.uuid}", tmp_path)[1] == want[s.uuid]
    tree = rv.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s1": "", "s3": "s1", "head": "s3"}
    # rollback restores exactly the snapshot; the tree branches
    rv.call("RollbackSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert rv.digest(vid) == ref_image_digest(want[s1.uuid])
    s4 = rv.snap(vid, "s4")
    tree = rv.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s1": "", "s3": "s1", "s4": "s1", "head": "s4"}
    assert {k: sorted(x.names) for k, x in tree.children.items()} == {"": ["s1"], "s1": ["s3", "s4"], "s4": ["head"]}
    snaps = {s.name: s for s in rv.call("ListSnapshots", volume_uuid=vid).snapshots}
    assert set(snaps) == {"s1", "s3", "s4"} and snaps["s1"].size == OBJ  # du-style, whole objects (fast-diff)
    assert rv.call("GetVolume", volume_uuid=vid).snapshot_bytes >= MiB
    assert s4.parent == s1.uuid


def test_linked_clone_protect_flatten_and_dependents(rv, ceph_io, ceph, tmp_path):
    vid = rv.create().uuid
    rbd_write(ceph_io["rbd"], vid, {0: os.urandom(8 * MiB)})
    s1 = rv.snap(vid, "base")
    d1 = rv.digest(vid, s1.uuid)
    clone = new_id()
    t0 = time.monotonic()
    job = rv.clone(vid, s1.uuid, clone, target_pool=RBD2_POOL_UUID)  # COW child in another pool
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert time.monotonic() - t0 < 10
    with rbd.Image(ceph_io["rbd"], vid) as img:
        assert img.is_protected_snap(s1.uuid)  # protected automatically
    info = rv.call("GetVolume", volume_uuid=clone, pool_uuid=RBD2_POOL_UUID)
    assert info.parent_volume == vid and info.parent_snapshot == s1.uuid
    assert rv.digest(clone, pool=RBD2_POOL_UUID) == d1
    assert list(rv.call("GetVolume", volume_uuid=vid).children) == [clone]
    e = rpc_error(rv.call, "DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and clone in e.details()
    e = rpc_error(rv.call, "DeleteVolume", volume_uuid=vid)
    assert "HAS_DEPENDENTS" in e.details() and clone in e.details()
    # librbd itself refuses to unprotect while children exist
    with rbd.Image(ceph_io["rbd"], vid) as img, pytest.raises(rbd.ImageBusy):
        img.unprotect_snap(s1.uuid)

    rbd_write(ceph_io["rbd2"], clone, {0: b"diverged" * 512})
    dc = rv.digest(clone, pool=RBD2_POOL_UUID)
    job = rv.c.run("flatten-rbd", flatten=jobs_pb2.FlattenSpec(pool_uuid=RBD2_POOL_UUID, volume_uuid=clone))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.progress.percent == 100
    assert rv.digest(clone, pool=RBD2_POOL_UUID) == dc
    assert rv.call("GetVolume", volume_uuid=clone, pool_uuid=RBD2_POOL_UUID).parent_volume == ""
    with rbd.Image(ceph_io["rbd"], vid) as img:
        assert not img.is_protected_snap(s1.uuid)  # unprotected again with its last clone gone
    rv.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert rv.digest(clone, pool=RBD2_POOL_UUID) == dc


def test_flatten_cancelled_leaves_a_working_clone(make_agent, ceph, ceph_io):
    from support.agents import RBD_POOL_UUID as P

    a = make_agent(ceph.pool_section(P)).start()
    with a.client() as c:
        rv = Vol(a, c, pool=P)
        vid = rv.create(capacity=128 * MiB).uuid
        rbd_write(ceph_io["rbd"], vid, {off: os.urandom(OBJ) for off in range(0, 128 * MiB, OBJ)})
        s1 = rv.snap(vid, "s1")
        d1 = rv.digest(vid, s1.uuid)
        clone = new_id()
        assert rv.clone(vid, s1.uuid, clone).state == jobs_pb2.JOB_STATE_SUCCEEDED
        c.submit("flatten-cancel", flatten=jobs_pb2.FlattenSpec(pool_uuid=P, volume_uuid=clone))
        deadline = time.monotonic() + 30
        while c.get("flatten-cancel").state == jobs_pb2.JOB_STATE_WAITING and time.monotonic() < deadline:
            time.sleep(0.01)
        c.cancel("flatten-cancel")
        job = list(c.watch("flatten-cancel"))[-1]
        if job.state == jobs_pb2.JOB_STATE_CANCELLED:
            assert rv.call("GetVolume", volume_uuid=clone).parent_volume == vid  # still a clone
        else:  # a 128 MiB flatten can beat the cancel; it must then be complete
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert rv.digest(clone) == d1
    assert a.stop() == 0


def test_full_clone_progress_and_cancel(make_agent, ceph, ceph_io):
    from support.agents import RBD_POOL_UUID as P

    a = make_agent(ceph.pool_section(P) + f"[jobs]\nbandwidth_limit = {16 * MiB}\n").start()
    with a.client() as c:
        rv = Vol(a, c, pool=P)
        vid = rv.create().uuid
        rbd_write(ceph_io["rbd"], vid, {0: os.urandom(16 * MiB), 40 * MiB: bytes(4 * MiB), 50 * MiB: b"z" * 10})
        s1 = rv.snap(vid, "s1")
        target = new_id()
        c.submit(
            "rbd-full",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=P,
                volume_uuid=vid,
                snapshot_uuid=s1.uuid,
                target_pool_uuid=P,
                target_volume_uuid=target,
                target_name="full",
                linked=False,
            ),
        )
        events = list(c.watch("rbd-full"))
        job = events[-1]
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        assert [e.progress.bytes_done for e in events] == sorted(e.progress.bytes_done for e in events)
        assert job.progress.percent == 100
        assert rv.digest(target) == rv.digest(vid, s1.uuid)
        info = rv.call("GetVolume", volume_uuid=target)
        assert info.parent_volume == "" and info.used <= 16 * MiB + OBJ  # zero blocks were not written
        # cancelled half-way: nothing is left, not even the temporary image
        big = new_id()
        c.submit(
            "rbd-full-cancel",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=P,
                volume_uuid=vid,
                snapshot_uuid=s1.uuid,
                target_pool_uuid=P,
                target_volume_uuid=big,
                target_name="doomed",
                linked=False,
            ),
        )
        while c.get("rbd-full-cancel").progress.bytes_done == 0:
            time.sleep(0.02)
        c.cancel("rbd-full-cancel")
        assert list(c.watch("rbd-full-cancel"))[-1].state == jobs_pb2.JOB_STATE_CANCELLED
        assert not [n for n in rbd.RBD().list(ceph_io["rbd"]) if big in n]
    assert a.stop() == 0


def test_full_clones_across_qcow2_and_rbd(rbd_agent, ceph_io, ceph, tmp_path):
    """Full clones qcow2 -> RBD and back, with progress: the data through the
    drivers' snapshot readers and restore targets; raw sha256 of each image
    read by independent tools (qemu-img, rbd export); linked clones cannot
    cross and say so."""
    from support.agents import POOL_UUID

    with rbd_agent.client() as c:
        qv, rv = Vol(rbd_agent, c, pool=POOL_UUID), Vol(rbd_agent, c, pool=RBD_POOL_UUID)
        src = qv.create(capacity=CAP).uuid
        qv.write(src, {0: os.urandom(5 * MiB), 30 * MiB + 11: os.urandom(70000), 50 * MiB: bytes(MiB)})
        s1 = qv.snap(src, "s1")
        want = qv.digest(src, s1.uuid)
        on_rbd = new_id()
        c.submit(
            "q2r",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=POOL_UUID,
                volume_uuid=src,
                snapshot_uuid=s1.uuid,
                target_pool_uuid=RBD_POOL_UUID,
                target_volume_uuid=on_rbd,
                target_name="from-qcow2",
                linked=False,
            ),
        )
        events = list(c.watch("q2r"))
        assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1].error
        assert events[-1].progress.percent == 100
        assert [e.progress.bytes_done for e in events] == sorted(e.progress.bytes_done for e in events)
        assert rv.digest(on_rbd) == want
        raw_q, raw_r = tmp_path / "q.raw", tmp_path / "r.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", qv.layer(src, s1.uuid), str(raw_q)], check=True)
        ceph.rbd("export", f"rbd/{on_rbd}", str(raw_r))
        assert hashlib.sha256(raw_q.read_bytes()).digest() == hashlib.sha256(raw_r.read_bytes()).digest()
        # and back, from a snapshot of the RBD copy into a new qcow2 volume
        rs = rv.snap(on_rbd, "r1")
        back = new_id()
        job = c.run(
            "r2q",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=RBD_POOL_UUID,
                volume_uuid=on_rbd,
                snapshot_uuid=rs.uuid,
                target_pool_uuid=POOL_UUID,
                target_volume_uuid=back,
                target_name="from-rbd",
                linked=False,
            ),
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        assert qv.digest(back) == want
        cmp = subprocess.run(
            ["qemu-img", "compare", "-U", qv.layer(src, s1.uuid), qv.head(back)], capture_output=True, text=True
        )
        assert cmp.returncode == 0, cmp.stdout
        e = rpc_error(
            c.run,
            "q2r-linked",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=POOL_UUID,
                volume_uuid=src,
                snapshot_uuid=s1.uuid,
                target_pool_uuid=RBD_POOL_UUID,
                target_volume_uuid=new_id(),
                target_name="linked",
                linked=True,
            ),
        )
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "target_pool_uuid" in e.details()


def test_diff_reports_the_changed_objects_and_reproduces_the_snapshot(rv, ceph_io, ceph, tmp_path):
    io = ceph_io["rbd"]
    vid = rv.create().uuid
    rbd_write(io, vid, {0: os.urandom(12 * MiB)})
    s1 = rv.snap(vid, "s1")
    writes = {OBJ + 100: b"a" * 1000, 5 * OBJ: os.urandom(OBJ + 10), 12 * OBJ + OBJ - 5: b"b" * 10}
    rbd_write(io, vid, writes, discards={2 * OBJ: 64 << 10})
    s2 = rv.snap(vid, "s2")
    r = rv.call("GetChangedExtents", volume_uuid=vid, snapshot_uuid=s2.uuid, since_snapshot_uuid=s1.uuid)
    assert not r.exact and r.granularity == OBJ  # fast-diff, whole objects
    touched = {1, 5, 6, 12, 13, 2}
    assert [(e.start, e.length) for e in r.extents] == [(1 * OBJ, 2 * OBJ), (5 * OBJ, 2 * OBJ), (12 * OBJ, 2 * OBJ)]
    assert {e.start // OBJ + i for e in r.extents for i in range(e.length // OBJ)} == touched
    # applying the reported extents read from s2 onto s1 reproduces s2 bit for bit
    _, old = export_sha(ceph, f"rbd/{vid}@{s1.uuid}", tmp_path)
    _, new = export_sha(ceph, f"rbd/{vid}@{s2.uuid}", tmp_path)
    patched = bytearray(old)
    for e in r.extents:
        patched[e.start : e.start + e.length] = new[e.start : e.start + e.length]
    assert bytes(patched) == new
    # from nothing: the data of s1 only
    assert rv.changed(vid, s1.uuid) == [(0, 12 * MiB)]


def test_a_whole_object_zeroed_since_the_snapshot_is_a_change(rv, ceph_io, ceph, tmp_path):
    """diff_iterate reports it as not existing; it changed all the same (an
    incremental that skipped it kept the old data: found by restoring in place)."""
    io = ceph_io["rbd"]
    vid = rv.create().uuid
    rbd_write(io, vid, {0: os.urandom(3 * OBJ)})
    s1 = rv.snap(vid, "s1")
    rbd_write(io, vid, {}, discards={OBJ: OBJ})  # a whole object: removed
    s2 = rv.snap(vid, "s2")
    extents = rv.changed(vid, s2.uuid, s1.uuid)
    assert any(start <= OBJ and start + length >= 2 * OBJ for start, length in extents), extents
    _, old = export_sha(ceph, f"rbd/{vid}@{s1.uuid}", tmp_path)
    _, new = export_sha(ceph, f"rbd/{vid}@{s2.uuid}", tmp_path)
    patched = bytearray(old)
    for start, length in rv.changed(vid, s2.uuid, s1.uuid):
        patched[start : start + length] = new[start : start + length]
    assert bytes(patched) == new and new[OBJ : 2 * OBJ] == bytes(OBJ)


def test_invalid_object_map_takes_the_exact_path(rv, ceph_io, ceph):
    io = ceph_io["rbd"]
    vid = rv.create().uuid
    rbd_write(io, vid, {0: os.urandom(OBJ)})
    s1 = rv.snap(vid, "s1")
    rbd_write(io, vid, {OBJ + 4096: b"c" * 8192})
    s2 = rv.snap(vid, "s2")
    # re-enabling object-map leaves it flagged invalid until rebuilt
    ceph.rbd("feature", "disable", f"rbd/{vid}", "fast-diff", "object-map")
    ceph.rbd("feature", "enable", f"rbd/{vid}", "object-map", "fast-diff")
    with rbd.Image(io, vid) as img:
        assert img.flags() & rbd.RBD_FLAG_OBJECT_MAP_INVALID
    r = rv.call("GetChangedExtents", volume_uuid=vid, snapshot_uuid=s2.uuid, since_snapshot_uuid=s1.uuid)
    assert r.exact
    ext = [(e.start, e.length) for e in r.extents]
    assert all(s <= OBJ + 4096 and OBJ + 4096 + 8192 <= s + n for s, n in ext)  # covers the write
    assert sum(n for _, n in ext) <= OBJ  # a superset from the object start, never more than the object


def test_bad_rbd_input(rv):
    for kw, code, field in [
        (dict(volume_uuid="../x"), grpc.StatusCode.INVALID_ARGUMENT, "volume_uuid"),
        (dict(name="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
        (dict(capacity=-1), grpc.StatusCode.INVALID_ARGUMENT, "capacity"),
        (dict(capacity=0, backing_file="pool/img@snap"), grpc.StatusCode.INVALID_ARGUMENT, "backing_file"),
    ]:
        e = rpc_error(rv.create, **kw)
        assert e.code() == code and field in e.details(), e.details()
    vid = rv.create().uuid
    e = rpc_error(rv.call, "CreateSnapshot", volume_uuid=vid, snapshot_uuid=new_id(), name="..")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = rpc_error(rv.call, "DeleteSnapshot", volume_uuid=vid, snapshot_uuid=new_id())
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_cluster_stopped_mid_operation(make_agent, ceph, ceph_io):
    """The OSD stops during a full clone: the job fails cleanly within the
    pool timeout, the agent stays up, the pool says unreachable, and after the
    OSD is back everything works again."""
    from agent.api.v1 import volumes_pb2

    from support.agents import RBD_POOL_UUID as P

    a = make_agent(ceph.pool_section(P, timeout=5) + f"[jobs]\nbandwidth_limit = {8 * MiB}\n").start()
    try:
        with a.client() as c:
            rv = Vol(a, c, pool=P)
            vid = rv.create().uuid
            rbd_write(ceph_io["rbd"], vid, {0: os.urandom(48 * MiB)})
            s1 = rv.snap(vid, "s1")
            target = new_id()
            c.submit(
                "doomed-copy",
                clone=jobs_pb2.CloneSpec(
                    pool_uuid=P,
                    volume_uuid=vid,
                    snapshot_uuid=s1.uuid,
                    target_pool_uuid=P,
                    target_volume_uuid=target,
                    target_name="x",
                    linked=False,
                ),
            )
            while c.get("doomed-copy").progress.bytes_done == 0:
                time.sleep(0.02)
            ceph.stop_osd()
            t0 = time.monotonic()
            job = list(c.watch("doomed-copy"))[-1]
            assert job.state == jobs_pb2.JOB_STATE_FAILED
            assert job.error.code == "IO_ERROR" and (
                "did not answer" in job.error.message or "failed" in job.error.message
            )
            assert time.monotonic() - t0 < 60
            st = c.get_pool_status(volumes_pb2.PoolRef(pool_uuid=P))
            assert st.status == "unreachable" and st.error
            assert c.host_info().version  # the agent is up
    finally:
        ceph.start_osd()
    with a.client() as c:
        rv = Vol(a, c, pool=P)
        deadline = time.monotonic() + 60
        while True:  # reconnects by itself
            st = c.get_pool_status(volumes_pb2.PoolRef(pool_uuid=P))
            if st.status == "healthy" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert st.status == "healthy"
        assert rv.call("GetVolume", volume_uuid=vid).capacity == CAP
        assert rv.clone(vid, s1.uuid, new_id(), linked=False, job_id="retry-copy").state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert a.stop() == 0


def test_rbd_export_peer_agrees_with_our_reader(rv, ceph_io, ceph, tmp_path):
    vid = rv.create().uuid
    rbd_write(ceph_io["rbd"], vid, {3 * MiB + 1: os.urandom(5 * MiB), 60 * MiB: b"end"})
    s1 = rv.snap(vid, "s1")
    _, data = export_sha(ceph, f"rbd/{vid}@{s1.uuid}", tmp_path)
    assert rv.digest(vid, s1.uuid) == ref_image_digest(data)
    out = subprocess.run(["rbd", "-c", str(ceph.conf), "info", f"rbd/{vid}"], capture_output=True, text=True).stdout
    assert "fast-diff" in out
