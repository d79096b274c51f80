"""qcow2 volumes through a real agent, with real qemu-img, qemu-nbd and libnbd."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from agent import native
from agent.api.v1 import jobs_pb2
from agent.volumes.nbd import NbdClient, QemuNbd

from support.agents import POOL2_UUID, POOL_UUID
from support.volumes import CAP, MiB, Vol, new_id, ref_digest_of, rpc_error


@pytest.fixture
def vol(agent):
    with agent.client() as c:
        yield Vol(agent, c)


def no_qemu_nbd_left(workdir: Path) -> bool:
    out = subprocess.run(["pgrep", "-af", "qemu-nbd"], capture_output=True, text=True).stdout
    return str(workdir) not in out


def test_create_info_delete(vol, agent):
    info = vol.create(name="disk-1")
    assert info.capacity == CAP and info.format == "qcow2" and info.tracking == "ok"
    assert info.access_path == str(agent.pool_root / f"pool-{POOL_UUID}" / "volume" / info.uuid)
    out = subprocess.run(["qemu-img", "info", "-U", info.access_path], capture_output=True, text=True).stdout
    assert "qcow2" in out and "bf-dirty" in out
    vol.write(info.uuid, {0: b"a" * MiB})
    assert vol.call("GetVolume", volume_uuid=info.uuid).used == MiB
    assert [x.uuid for x in vol.call("ListVolumes").volumes] == [info.uuid]
    e = rpc_error(vol.create, volume_uuid=info.uuid)
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "volume_uuid" in e.details()
    vol.call("DeleteVolume", volume_uuid=info.uuid)
    assert not Path(info.access_path).exists()
    e = rpc_error(vol.call, "GetVolume", volume_uuid=info.uuid)
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_adopt_backing_file(vol, agent):
    raw = agent.roots[0] / "base.raw"
    data = os.urandom(MiB)
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(data)
    info = vol.create(capacity=0, backing_file=str(raw))
    assert info.capacity == 8 * MiB  # detected
    r = native.RefImageHash()
    r.update(raw.read_bytes())
    assert vol.digest(info.uuid) == r.digest().hex()
    bigger = vol.create(capacity=16 * MiB, backing_file=str(raw))
    assert bigger.capacity == 16 * MiB
    e = rpc_error(vol.create, capacity=MiB, backing_file=str(raw))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "capacity" in e.details()
    e = rpc_error(vol.create, capacity=0, backing_file="/etc/hostname")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "backing_file" in e.details()
    e = rpc_error(vol.create, capacity=0)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "capacity" in e.details()


def test_snapshots_rollback_and_tree(vol, tmp_path):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(MiB), 10 * MiB: b"A" * 4096})
    s1 = vol.snap(vid, "s1")
    assert s1.children == ["head"] and s1.parent == "" and s1.tracking == "ok"
    vol.write(vid, {MiB: os.urandom(2 * MiB)}, zeros={10 * MiB: 65536})
    s2 = vol.snap(vid, "s2")
    vol.write(vid, {40 * MiB: os.urandom(MiB)})
    d1, d2, dh = vol.digest(vid, s1.uuid), vol.digest(vid, s2.uuid), vol.digest(vid)
    assert len({d1, d2, dh}) == 3
    assert d1 == ref_digest_of(vol.layer(vid, s1.uuid), tmp_path)
    assert d2 == ref_digest_of(vol.layer(vid, s2.uuid), tmp_path)
    assert dh == ref_digest_of(vol.head(vid), tmp_path)

    vol.call("RollbackSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert vol.digest(vid) == d1  # exactly the snapshot's content
    assert vol.digest(vid, s2.uuid) == d2  # the later snapshot survives, on another branch
    tree = vol.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s1": "", "s2": "s1", "head": "s1"}
    assert {k: list(x.names) for k, x in tree.children.items()} == {"": ["s1"], "s1": ["s2", "head"]}
    assert tree.root == "s1"
    s3 = vol.snap(vid, "s3")
    tree = vol.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s1": "", "s2": "s1", "s3": "s1", "head": "s3"}
    snaps = {s.name: s for s in vol.call("ListSnapshots", volume_uuid=vid).snapshots}
    assert set(snaps) == {"s1", "s2", "s3"}
    assert set(snaps["s1"].children) == {s2.uuid, s3.uuid}
    assert snaps["s1"].size > MiB  # the layer holds the first MiB of data
    e = rpc_error(vol.snap, vid, "s1")
    assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "snapshot_name" in e.details()
    info = vol.call("GetVolume", volume_uuid=vid)
    assert info.snapshot_bytes >= sum(s.size for s in snaps.values())


def test_delete_middle_snapshot_keeps_every_other_exact(vol, tmp_path):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(2 * MiB)})
    s1 = vol.snap(vid, "s1")
    vol.write(vid, {MiB: os.urandom(2 * MiB), 20 * MiB: os.urandom(MiB)})
    s2 = vol.snap(vid, "s2")
    vol.write(vid, {20 * MiB + 4096: b"x" * 100})
    s3 = vol.snap(vid, "s3")
    vol.write(vid, {60 * MiB: b"head" * 1024})
    before = {s: vol.digest(vid, s) for s in (s1.uuid, s3.uuid)} | {"head": vol.digest(vid)}
    vol.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    after = {s: vol.digest(vid, s) for s in (s1.uuid, s3.uuid)} | {"head": vol.digest(vid)}
    assert after == before
    assert not Path(vol.layer(vid, s2.uuid)).exists()
    tree = vol.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s1": "", "s3": "s1", "head": "s3"}
    for layer in (vol.layer(vid, s1.uuid), vol.layer(vid, s3.uuid), vol.head(vid)):
        assert subprocess.run(["qemu-img", "check", "-U", layer], capture_output=True).returncode == 0
    # deleting the root snapshot keeps the rest exact too
    vol.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert vol.digest(vid, s3.uuid) == before[s3.uuid] and vol.digest(vid) == before["head"]
    assert vol.digest(vid, s3.uuid) == ref_digest_of(vol.layer(vid, s3.uuid), tmp_path)


G = 65536  # bitmap granularity


def test_changed_extents_are_exactly_what_was_written(vol):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(4 * MiB)})
    s1 = vol.snap(vid, "s1")
    # data, a zero write and a write spanning a granule boundary
    vol.write(vid, {8 * MiB: b"1" * G, 20 * MiB + G - 10: b"2" * 20}, zeros={30 * MiB: 2 * G})
    s2 = vol.snap(vid, "s2")
    assert vol.changed(vid, s2.uuid, s1.uuid) == [(8 * MiB, G), (20 * MiB, 2 * G), (30 * MiB, 2 * G)]
    vol.write(vid, {50 * MiB: b"3" * 3 * G})
    s3 = vol.snap(vid, "s3")
    assert vol.changed(vid, s3.uuid, s2.uuid) == [(50 * MiB, 3 * G)]
    # across two layers: the union
    assert vol.changed(vid, s3.uuid, s1.uuid) == [(8 * MiB, G), (20 * MiB, 2 * G), (30 * MiB, 2 * G), (50 * MiB, 3 * G)]
    # after deleting the middle snapshot, its changes move into its child
    vol.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    assert vol.changed(vid, s3.uuid, s1.uuid) == [(8 * MiB, G), (20 * MiB, 2 * G), (30 * MiB, 2 * G), (50 * MiB, 3 * G)]
    # from nothing: every data extent
    assert vol.changed(vid, s1.uuid) == [(0, 4 * MiB)]
    # applying the changed extents of s3 onto s1's content reproduces s3
    e = rpc_error(vol.changed, vid, s1.uuid, s3.uuid)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "not an ancestor" in e.details()
    extents = vol.call("GetExtents", volume_uuid=vid, snapshot_uuid=s3.uuid).extents
    data = [(x.start, x.length) for x in extents if not x.zero]
    assert (0, 4 * MiB) in data and any(s <= 50 * MiB < s + n for s, n in data)


def test_killed_qemu_nbd_means_tracking_lost_never_silently_wrong(vol, agent):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(MiB)})
    s1 = vol.snap(vid, "s1")
    srv = QemuNbd(vol.head(vid), readonly=False, run_dir=str(vol.run_dir)).start()
    with NbdClient(srv.socket) as c:
        c.pwrite(b"k" * G, 5 * MiB)
        c.flush()
    os.kill(srv.child.pid, signal.SIGKILL)
    srv.child.proc.wait()
    srv.stop()
    s2 = vol.snap(vid, "s2")
    assert s2.tracking == "lost"
    e = rpc_error(vol.changed, vid, s2.uuid, s1.uuid)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CHANGE_TRACKING_LOST" in e.details() and "s2" in e.details()
    # the data itself is intact, and tracking resumes with the next layer
    vol.write(vid, {9 * MiB: b"n" * G})
    s3 = vol.snap(vid, "s3")
    assert s3.tracking == "ok"
    assert vol.changed(vid, s3.uuid, s2.uuid) == [(9 * MiB, G)]
    e = rpc_error(vol.changed, vid, s3.uuid, s1.uuid)  # spans the lost layer
    assert "CHANGE_TRACKING_LOST" in e.details()


def test_linked_clone_dependents_and_flatten(vol, agent):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(8 * MiB)})
    s1 = vol.snap(vid, "base")
    d1 = vol.digest(vid, s1.uuid)
    clone_id = new_id()
    t0 = time.monotonic()
    job = vol.c.run(
        f"clone-{clone_id}",
        clone=jobs_pb2.CloneSpec(
            pool_uuid=POOL_UUID,
            volume_uuid=vid,
            snapshot_uuid=s1.uuid,
            target_pool_uuid=POOL_UUID,
            target_volume_uuid=clone_id,
            target_name="linked",
            linked=True,
        ),
    )
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert time.monotonic() - t0 < 5 and job.clone_result.copied_bytes == 0
    info = vol.call("GetVolume", volume_uuid=clone_id)
    assert info.parent_volume == vid and info.parent_snapshot == s1.uuid
    assert vol.digest(clone_id) == d1
    origin = vol.call("GetVolume", volume_uuid=vid)
    assert list(origin.children) == [clone_id]
    snap = {s.uuid: s for s in vol.call("ListSnapshots", volume_uuid=vid).snapshots}[s1.uuid]
    assert list(snap.clones) == [clone_id]

    e = rpc_error(vol.call, "DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and clone_id in e.details()
    assert "HAS_DEPENDENTS" in e.details()
    e = rpc_error(vol.call, "DeleteVolume", volume_uuid=vid)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and clone_id in e.details()

    vol.write(clone_id, {0: b"clone" * 1000})  # the clone diverges; the origin does not
    assert vol.digest(vid, s1.uuid) == d1
    dc = vol.digest(clone_id)
    job = vol.c.run(f"flatten-{clone_id}", flatten=jobs_pb2.FlattenSpec(pool_uuid=POOL_UUID, volume_uuid=clone_id))
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.progress.percent == 100
    assert vol.digest(clone_id) == dc
    out = subprocess.run(["qemu-img", "info", "-U", vol.head(clone_id)], capture_output=True, text=True).stdout
    assert "backing file" not in out
    assert vol.call("GetVolume", volume_uuid=clone_id).parent_volume == ""
    vol.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)  # no longer a dependent
    assert vol.digest(clone_id) == dc
    e = rpc_error(vol.c.run, "flatten-again", flatten=jobs_pb2.FlattenSpec(pool_uuid=POOL_UUID, volume_uuid=clone_id))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "not a linked clone" in e.details()


def test_force_delete_flattens_clones_in_another_pool(vol):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(MiB)})
    s1 = vol.snap(vid, "base")
    clone_id = new_id()
    job = vol.c.run(
        "x-pool-clone",
        clone=jobs_pb2.CloneSpec(
            pool_uuid=POOL_UUID,
            volume_uuid=vid,
            snapshot_uuid=s1.uuid,
            target_pool_uuid=POOL2_UUID,
            target_volume_uuid=clone_id,
            target_name="other-pool",
            linked=True,
        ),
    )
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    d = vol.digest(clone_id, pool=POOL2_UUID)
    vol.call("DeleteVolume", volume_uuid=vid, force=True)
    assert vol.digest(clone_id, pool=POOL2_UUID) == d
    assert vol.call("GetVolume", volume_uuid=clone_id, pool_uuid=POOL2_UUID).parent_volume == ""


def test_full_clone_with_progress(vol, tmp_path):
    vid = vol.create().uuid
    vol.write(vid, {0: os.urandom(8 * MiB), 32 * MiB: os.urandom(4 * MiB), 50 * MiB: bytes(MiB)})
    s1 = vol.snap(vid, "s1")
    clone_id = new_id()
    vol.c.submit(
        "full-1",
        clone=jobs_pb2.CloneSpec(
            pool_uuid=POOL_UUID,
            volume_uuid=vid,
            snapshot_uuid=s1.uuid,
            target_pool_uuid=POOL2_UUID,
            target_volume_uuid=clone_id,
            target_name="full",
            linked=False,
        ),
    )
    events = list(vol.c.watch("full-1"))
    job = events[-1]
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
    assert job.progress.percent == 100 and job.progress.bytes_total >= 12 * MiB
    dones = [e.progress.bytes_done for e in events]
    assert dones == sorted(dones)
    info = vol.call("GetVolume", volume_uuid=clone_id, pool_uuid=POOL2_UUID)
    assert info.parent_volume == "" and info.capacity == CAP
    assert vol.digest(clone_id, pool=POOL2_UUID) == vol.digest(vid, s1.uuid)
    cmp = subprocess.run(
        ["qemu-img", "compare", "-U", vol.layer(vid, s1.uuid), info.access_path], capture_output=True, text=True
    )
    assert cmp.returncode == 0, cmp.stdout
    out = subprocess.run(["qemu-img", "info", "-U", info.access_path], capture_output=True, text=True).stdout
    assert "backing file" not in out
    # zero blocks were not written: the copy holds only the 12 MiB of data
    assert info.used == 12 * MiB
    assert no_qemu_nbd_left(vol.agent.workdir)


def test_full_clone_cancelled_leaves_nothing(make_agent):
    a = make_agent(f"[jobs]\nbandwidth_limit = {8 * MiB}\n").start()
    with a.client() as c:
        vol = Vol(a, c)
        vid = vol.create().uuid
        vol.write(vid, {0: os.urandom(48 * MiB)})
        s1 = vol.snap(vid, "s1")
        clone_id = new_id()
        vol.c.submit(
            "full-cancel",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=POOL_UUID,
                volume_uuid=vid,
                snapshot_uuid=s1.uuid,
                target_pool_uuid=POOL_UUID,
                target_volume_uuid=clone_id,
                target_name="doomed",
                linked=False,
            ),
        )
        while c.get("full-cancel").progress.bytes_done < 8 * MiB:
            time.sleep(0.05)
        # while it runs, the source is busy for changes
        e = rpc_error(vol.call, "DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "RESOURCE_BUSY" in e.details()
        c.cancel("full-cancel")
        job = list(c.watch("full-cancel"))[-1]
        assert job.state == jobs_pb2.JOB_STATE_CANCELLED
        e = rpc_error(vol.call, "GetVolume", volume_uuid=clone_id)
        assert e.code() == grpc.StatusCode.NOT_FOUND
        leftovers = [p for p in (a.pool_root / f"pool-{POOL_UUID}" / "volume").iterdir() if clone_id in p.name]
        assert leftovers == []
        assert no_qemu_nbd_left(a.workdir)
        vol.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)  # free again
    assert a.stop() == 0


@pytest.mark.parametrize(
    "field,kw,code",
    [
        ("volume_uuid", dict(volume_uuid="../../etc"), grpc.StatusCode.INVALID_ARGUMENT),
        ("volume_uuid", dict(volume_uuid="a/b"), grpc.StatusCode.INVALID_ARGUMENT),
        ("name", dict(name="x/y"), grpc.StatusCode.INVALID_ARGUMENT),
        ("name", dict(name=".."), grpc.StatusCode.INVALID_ARGUMENT),
        ("name", dict(name=""), grpc.StatusCode.INVALID_ARGUMENT),
        ("capacity", dict(capacity=-512), grpc.StatusCode.INVALID_ARGUMENT),
        ("capacity", dict(capacity=1000), grpc.StatusCode.INVALID_ARGUMENT),
        ("capacity", dict(capacity=1 << 60), grpc.StatusCode.OUT_OF_RANGE),
        ("pool_uuid", dict(pool_uuid=str(uuid.UUID(int=1))), grpc.StatusCode.NOT_FOUND),
        ("pool_uuid", dict(pool_uuid="../pool"), grpc.StatusCode.INVALID_ARGUMENT),
        ("backing_file", dict(capacity=0, backing_file="/work/../etc/passwd"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_bad_volume_input(vol, agent, field, kw, code):
    e = rpc_error(vol.create, **kw)
    assert e.code() == code and field in e.details(), e.details()
    # nothing was created anywhere
    assert vol.call("ListVolumes").volumes == []
    assert not list((agent.pool_root / f"pool-{POOL_UUID}" / "volume").iterdir())


def test_bad_snapshot_input(vol):
    vid = vol.create().uuid
    for name in ("a/b", "..", "head", ""):
        e = rpc_error(vol.call, "CreateSnapshot", volume_uuid=vid, snapshot_uuid=new_id(), name=name)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "snapshot_name" in e.details()
    e = rpc_error(vol.call, "CreateSnapshot", volume_uuid=vid, snapshot_uuid="../x", name="ok")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "snapshot_uuid" in e.details()
    e = rpc_error(vol.call, "RollbackSnapshot", volume_uuid=vid, snapshot_uuid=new_id())
    assert e.code() == grpc.StatusCode.NOT_FOUND and "snapshot_uuid" in e.details()
    assert vol.call("ListSnapshots", volume_uuid=vid).snapshots == []


def test_resize_grows_only(vol):
    vid = vol.create().uuid
    vol.write(vid, {0: b"keep" * 1024})
    d = vol.digest(vid)
    assert vol.call("ResizeVolume", volume_uuid=vid, capacity=2 * CAP).capacity == 2 * CAP
    e = rpc_error(vol.call, "ResizeVolume", volume_uuid=vid, capacity=CAP)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "capacity" in e.details()
    assert vol.digest(vid) != d  # longer now, same leading bytes
    vol.write(vid, {2 * CAP - MiB: b"end" * 100})


def test_volume_in_use_by_another_process_is_refused(vol):
    vid = vol.create().uuid
    with QemuNbd(vol.head(vid), readonly=False, run_dir=str(vol.run_dir)):
        e = rpc_error(vol.snap, vid, "while-served")
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "IN_USE" in e.details()
    assert vol.snap(vid, "after").tracking == "ok"


def test_qemu_nbd_stopped_right_after_start_closes_its_bitmap(vol):
    """qemu-nbd 7.2 loses a SIGTERM that arrives while it starts; stopping
    sends it again, so a writable server stopped at once still exits
    cleanly (not killed after the timeout, which leaves its dirty bitmap
    inconsistent and change tracking lost)."""
    from agent.volumes.qcow2 import qemu_img

    vid = vol.create().uuid
    head = vol.head(vid)
    for _ in range(10):
        srv = QemuNbd(head, readonly=False, run_dir=str(vol.run_dir)).start()
        t0 = time.monotonic()
        assert srv.child.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        bm = qemu_img.info(head).bitmap("bf-dirty")
        assert bm is not None and bm.consistent
    assert vol.snap(vid, "after").tracking == "ok"


def test_snapshot_interrupted_by_a_crash_is_repaired_at_start(make_agent):
    a = make_agent().start()
    with a.client() as c:
        vol = Vol(a, c)
        vid = vol.create().uuid
        vol.write(vid, {0: os.urandom(MiB)})
        d = vol.digest(vid)
        head = vol.head(vid)
    assert a.stop() == 0
    # what a crash right after the first rename of a snapshot leaves behind
    layer_dir = a.pool_root / f"pool-{POOL_UUID}" / "snapshot" / vid
    layer_dir.mkdir(parents=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", head, "bf-dirty"], check=True)
    os.rename(head, layer_dir / new_id())
    a.start()
    with a.client() as c:
        vol = Vol(a, c)
        assert vol.digest(vid) == d
        assert vol.snap(vid, "after-repair").tracking == "ok"
    assert a.stop() == 0


def test_bitmap_missing_in_a_layer_is_never_taken_from_its_backing(vol):
    """qemu-nbd --bitmap would export a same-named bitmap of a backing layer."""
    vid = vol.create().uuid
    s1 = vol.snap(vid, "s1")
    vol.write(vid, {3 * MiB: b"z" * G})
    s2 = vol.snap(vid, "s2")
    subprocess.run(["qemu-img", "bitmap", "--remove", vol.layer(vid, s2.uuid), "bf-dirty"], check=True)
    e = rpc_error(vol.changed, vid, s2.uuid, s1.uuid)
    assert "CHANGE_TRACKING_LOST" in e.details() and s2.uuid in e.details()


def test_bitmap_reader_matches_qemu_nbd_and_refuses_untrustworthy_bitmaps(tmp_path):
    """agent/volumes/qcow2/bitmap.py reads bf-dirty from the file; qemu-nbd's
    export of the same bitmap is the reference."""
    import random

    from agent.errors import TrackingLost
    from agent.extents import merge_extents
    from agent.volumes.qcow2.bitmap import dirty_extents

    rnd = random.Random(7)
    cases = [(CAP, G), (CAP + 3 * 512, 4096), ((5 << 30) + 512, G), (CAP, 512 * 1024)]
    for k, (size, gran) in enumerate(cases):
        img = str(tmp_path / f"b{k}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(size)], check=True)
        for name in ("another", "bf-dirty"):  # the reader skips the other one
            subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(gran), img, name], check=True)
        cmds = []
        for _ in range(40):
            off = rnd.randrange(0, size - 4096) // 512 * 512
            cmds += ["-c", f"write {off} {min(rnd.choice([512, 4096, 69632, 3 << 20]), size - off)}"]
        cmds += ["-c", f"write {size - 512} 512"]  # the last, partial granule
        if k == 1:
            cmds += ["-c", f"write 0 {size}"]  # all of it
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True, capture_output=True)
        mine = dirty_extents(img, "bf-dirty")
        with (
            QemuNbd(img, readonly=True, bitmap="bf-dirty", run_dir=str(tmp_path)) as srv,
            srv.connect(bitmap_context=True) as c,
        ):
            assert mine == merge_extents(list(c.dirty("bf-dirty"))), (size, gran)
        assert mine and mine[-1].end == size
    with pytest.raises(TrackingLost, match="bf-other .* is missing"):
        dirty_extents(img, "bf-other")
    # qemu killed while the bitmap was in use: the in_use flag stays set
    srv = QemuNbd(img, readonly=False, run_dir=str(tmp_path)).start()
    with NbdClient(srv.socket) as c:
        c.pwrite(b"k" * G, 0)
        c.flush()
    os.kill(srv.child.pid, signal.SIGKILL)
    srv.child.proc.wait()
    srv.stop()
    with pytest.raises(TrackingLost, match="in use"):
        dirty_extents(img, "bf-dirty", "snapshot s9")
    # an image written by a program that does not keep bitmaps clears autoclear bit 0
    img = str(tmp_path / "b0.qcow2")
    with open(img, "r+b") as f:
        f.seek(88)
        autoclear = int.from_bytes(f.read(8), "big")
        f.seek(88)
        f.write((autoclear & ~1).to_bytes(8, "big"))
    with pytest.raises(TrackingLost, match="inconsistent"):
        dirty_extents(img, "bf-dirty")
    with pytest.raises(TrackingLost, match="cannot be read"):
        dirty_extents(str(tmp_path / "nothing.qcow2"), "bf-dirty")


def test_partial_map_reads_exactly_what_qemu_reads(tmp_path):
    """agent/volumes/qcow2/map.py maps chosen guest ranges from the layers'
    L2 tables (an incremental backup's changed chunks): the data read through
    it equals `qemu-img convert` of the same chain, over qcow2 layers with
    data, zero and discarded clusters, a raw base shorter than the image, a
    layer with another cluster size, and ranges that are not cluster-aligned."""
    import random

    from agent.volumes.qcow2.direct import open_mapped
    from agent.volumes.qcow2.map import map_ranges

    rnd = random.Random(11)
    size = 48 * MiB + 3 * 512
    base = tmp_path / "base.raw"
    base.write_bytes(os.urandom(20 * MiB + 4096))  # shorter than the image: zeros past it
    layers = [str(base)]
    for k, cluster in enumerate((65536, 4096, 65536)):
        img = str(tmp_path / f"l{k}.qcow2")
        fmt = "raw" if k == 0 else "qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                f"cluster_size={cluster}",
                "-b",
                layers[-1],
                "-F",
                fmt,
                img,
                str(size),
            ],
            check=True,
        )
        cmds = []
        for _ in range(25):
            off = rnd.randrange(0, size - 1) // 512 * 512
            n = min(rnd.choice([512, 4096, 65536, 300 * 1024, 2 * MiB]), size - off)
            op = rnd.choice(["write", "write", "write -z", "discard"])
            cmds += ["-c", f"{op} {off} {n}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, img], check=True, capture_output=True)
        layers.append(img)
    top = layers[-1]
    ref = tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, str(ref)], check=True)
    want = ref.read_bytes()
    ranges = sorted(
        {(rnd.randrange(0, size // 4096) * 4096, rnd.choice([4096, 65536, MiB, 3 * MiB + 512])) for _ in range(40)}
    )
    merged = []  # the reader takes sorted, non-overlapping ranges
    for start, n in ranges:
        n = min(n, size - start)
        if merged and start < merged[-1][0] + merged[-1][1]:
            continue
        merged.append((start, n))
    merged.append((size - 1000, 1000))  # the image's last, partial cluster
    r = open_mapped(top, (size, merged))
    assert r is not None and r._partial
    with r:
        for start, n in merged:
            got = bytes(r._fill(start, n))
            assert got == want[start : start + n], (start, n)
        with pytest.raises(Exception, match="only the ranges"):
            r.extents()
    entries, paths, fds = map_ranges(top, size, merged)
    for fd in fds.values():
        os.close(fd)
    assert paths == [top, *reversed(layers[1:-1]), str(base)]
    assert {e.depth for e in entries} >= {0, 3}  # data from the top and from the raw base
    # not what the caller expects, or compressed clusters: left to qemu-img map
    assert map_ranges(top, size + 512, merged) is None
    packed = str(tmp_path / "compressed.qcow2")
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", top, packed], check=True)
    assert map_ranges(packed, size, [(0, 4 * MiB)]) is None


def test_nbd_copy_path_keeps_content_and_holes(tmp_path):
    """The NBD data path (two real qemu-nbd servers, libnbd, buffers in flight)
    that copies across formats and that restores write through."""
    from agent.jobs.kinds import NullContext
    from agent.volumes.copy import copy_image
    from agent.volumes.qcow2 import qemu_img

    src, dst = str(tmp_path / "src.raw"), str(tmp_path / "dst.qcow2")
    with open(src, "wb") as f:  # raw, with 2 MiB of zeros written as data
        f.truncate(CAP)
        f.write(os.urandom(5 * MiB + 7))
        f.seek(40 * MiB)
        f.write(bytes(2 * MiB) + b"q" * 10)
    qemu_img.create(dst, CAP)
    stats = copy_image(src, dst, run_dir=str(tmp_path), ctx=NullContext(), src_format="raw")
    assert subprocess.run(["qemu-img", "compare", src, dst], capture_output=True).returncode == 0
    assert ref_digest_of(src, tmp_path) == ref_digest_of(dst, tmp_path)
    # the written zeros did not become data in the copy
    assert stats.written_bytes < stats.data_bytes
    assert qemu_img.allocated_data(dst) <= 6 * MiB + 2 * 65536
    with QemuNbd(dst, run_dir=str(tmp_path)) as srv, srv.connect() as c:
        ext = c.allocation()
    assert any(e.zero and e.start <= 20 * MiB < e.end for e in ext)
    assert any(e.zero and e.start <= 40 * MiB < e.end for e in ext)


def test_leftover_sweep_spares_files_another_agent_may_be_writing(short_tmp):
    """On shared storage another agent may be writing a temporary file when
    this one opens the pool: only files nobody wrote for LEFTOVER_AGE go."""
    from agent.volumes.qcow2 import Qcow2Pool
    from agent.volumes.qcow2.driver import LEFTOVER_AGE

    pool_uuid = new_id()
    Qcow2Pool(pool_uuid, str(short_tmp / "p"), run_dir=str(short_tmp), allowed_roots=[str(short_tmp)])
    vols = short_tmp / "p" / f"pool-{pool_uuid}" / "volume"
    old, fresh = vols / f".{new_id()}.x.copy", vols / f".{new_id()}.new"
    old.write_bytes(b"abandoned")
    fresh.write_bytes(b"being written")
    past = time.time() - LEFTOVER_AGE - 60
    os.utime(old, (past, past))
    Qcow2Pool(pool_uuid, str(short_tmp / "p"), run_dir=str(short_tmp), allowed_roots=[str(short_tmp)])
    assert not old.exists() and fresh.exists()
