"""qcow2 volume pools on an NFSv3 export (seed 002 pool_type 2), through a
real agent and a real nfs-ganesha: qemu's nfs driver and libnfs, no mount.
The export is also a directory of this machine, so what the agent wrote is
read back from the server's side (qemu-img on the files ganesha serves)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.errors import ConfigError

from support.agents import POOL_UUID, write_config
from support.backups import NFS_POOL, OK, three_generations
from support.volumes import MiB, new_id, ref_digest_of, rpc_error


def server_info(path: Path) -> dict:
    """qemu-img info of a file as the NFS server stores it."""
    return json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)], check=True, capture_output=True, text=True
        ).stdout
    )


def test_volumes_snapshots_rollback_and_changes_on_nfs(nfs_agent):
    n = nfs_agent
    st = n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool))
    assert st.type == "nfs" and st.status == "healthy" and st.total_bytes > 0
    vid = n.create(capacity=32 * MiB, name="on-nfs").uuid
    info = n.call("GetVolume", volume_uuid=vid)
    assert info.access_path == f"{n.url}/volume/{vid}"
    head_on_server = n.server_dir / "volume" / vid
    assert server_info(head_on_server)["format"] == "qcow2"  # a real file in the export

    first = {0: os.urandom(2 * MiB), 17 * MiB + 4096: os.urandom(70000)}
    n.write(vid, first)
    s1 = n.snap(vid, "s1")
    d1 = n.digest(vid, s1.uuid)
    assert ref_digest_of(n.layer(vid, s1.uuid), n.agent.workdir) == d1
    n.write(vid, {8 * MiB: os.urandom(MiB)})
    s2 = n.snap(vid, "s2")
    d2 = n.digest(vid, s2.uuid)
    # the head's backing file is the snapshot's URL, as the server stores it
    assert server_info(head_on_server)["full-backing-filename"] == n.layer(vid, s2.uuid)
    # change tracking: the persistent bitmaps, read through libnfs
    assert n.changed(vid, s2.uuid, s1.uuid) == [(8 * MiB, MiB)]
    assert n.changed(vid, s1.uuid) == [(0, 2 * MiB), (17 * MiB, 128 << 10)]
    tree = n.call("GetSnapshotTree", volume_uuid=vid)
    assert tree.root == "s1" and dict(tree.parents) == {"s2": "s1", "head": "s2", "s1": ""}

    n.call("RollbackSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert n.digest(vid) == d1
    n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)  # rebases s2 and the head
    assert n.digest(vid, s2.uuid) == d2 and n.digest(vid) == d1
    assert ref_digest_of(n.layer(vid, s2.uuid), n.agent.workdir) == d2
    assert not (n.server_dir / "snapshot" / vid / s1.uuid).exists()
    assert [x.uuid for x in n.call("ListVolumes").volumes] == [vid]
    n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    n.call("DeleteVolume", volume_uuid=vid)
    assert not head_on_server.exists() and not list((n.server_dir / "meta").iterdir())


def test_clones_within_and_across_nfs_and_dir_pools(nfs_agent):
    n = nfs_agent
    vid = n.create(capacity=32 * MiB).uuid
    n.write(vid, {0: os.urandom(4 * MiB), 20 * MiB: os.urandom(MiB)})
    s1 = n.snap(vid, "base")
    d1 = n.digest(vid, s1.uuid)

    linked = new_id()
    job = n.clone(vid, s1.uuid, linked, name="linked")
    assert job.state == OK, job.error
    assert n.digest(linked) == d1
    assert list(n.call("GetVolume", volume_uuid=vid).children) == [linked]
    n.write(linked, {0: b"diverged" * 512})
    dl = n.digest(linked)
    job = n.c.run(f"flatten-{linked}", flatten=jobs_pb2.FlattenSpec(pool_uuid=n.pool, volume_uuid=linked))
    assert job.state == OK, job.error
    assert n.digest(linked) == dl
    assert "backing-filename" not in server_info(n.server_dir / "volume" / linked)

    # full clones both ways between the NFS pool and a directory pool
    to_dir = new_id()
    job = n.clone(vid, s1.uuid, to_dir, name="to-dir", linked=False, target_pool=POOL_UUID)
    assert job.state == OK and job.progress.percent == 100, job.error
    assert n.digest(to_dir, pool=POOL_UUID) == d1
    sd = n.c.create_snapshot(
        v.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=to_dir, snapshot_uuid=new_id(), name="sd")
    )
    back = new_id()
    job = n.c.run(
        f"clone-{back}",
        clone=jobs_pb2.CloneSpec(
            pool_uuid=POOL_UUID,
            volume_uuid=to_dir,
            snapshot_uuid=sd.uuid,
            target_pool_uuid=n.pool,
            target_volume_uuid=back,
            target_name="back",
            linked=False,
        ),
    )
    assert job.state == OK, job.error
    assert n.digest(back) == d1
    assert ref_digest_of(f"{n.url}/volume/{back}", n.agent.workdir) == d1

    # a linked clone cannot cross: its backing file would be out of the other pool's reach
    e = rpc_error(
        n.c.run,
        "cross-linked",
        clone=jobs_pb2.CloneSpec(
            pool_uuid=n.pool,
            volume_uuid=vid,
            snapshot_uuid=s1.uuid,
            target_pool_uuid=POOL_UUID,
            target_volume_uuid=new_id(),
            target_name="x",
            linked=True,
        ),
    )
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e.details()
    assert "target_pool_uuid" in e.details() and "full clone" in e.details()
    # nor can a volume adopt a file of this host as its base
    e = rpc_error(n.create, backing_file=str(n.agent.roots[0] / "x.qcow2"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "backing_file" in e.details()


def test_backup_incremental_and_restore_into_nfs_pool(nfs_agent):
    n = nfs_agent
    vid, gens = three_generations(n)  # on the NFS pool: n.pool
    assert gens[1][1].chunks_read == 2 and gens[2][1].chunks_read == 2  # the bitmaps, read over NFS
    for snap, r, _ in gens:
        for pool in (n.pool, POOL_UUID):  # into the NFS pool and into a directory pool
            restored = n.restore(r.backup_uuid, pool=pool)
            assert restored.image_digest == r.image_digest
            assert n.digest(restored.volume_uuid, pool=pool) == r.image_digest
            cmp = subprocess.run(
                ["qemu-img", "compare", "-U", n.layer(vid, snap), restored.access_path], capture_output=True, text=True
            )
            assert cmp.returncode == 0, cmp.stdout
        assert n.verify(r.backup_uuid, deep=True).state == OK


def test_agents_sharing_an_nfs_pool_take_turns(nfs_server, short_tmp):
    """Two hosts' drivers on one pool: a volume's metadata changes wait for
    the other host's lock; a lock left by a dead process is broken."""
    from agent.stores.locks import LockRecord, _boot_id
    from agent.volumes.qcow2 import Qcow2Pool
    from agent.volumes.qcow2.poolfs import NfsFiles

    pool = str(uuid.uuid4())

    def host():
        fs = NfsFiles("127.0.0.1", str(nfs_server.export), label=pool)
        return Qcow2Pool(pool, fs.url(""), run_dir=str(short_tmp / "run"), allowed_roots=[], fs=fs)

    a, b = host(), host()
    vid = new_id()
    a.create_volume(vid, "shared", 16 * MiB)
    assert [x.uuid for x in b.list_volumes()] == [vid]
    events = []

    def hold():
        with a._locked(vid):
            events.append("a locked")
            time.sleep(1.5)
            events.append("a unlocks")

    t = threading.Thread(target=hold)
    t.start()
    while not events:
        time.sleep(0.01)
    s = b.create_snapshot(vid, new_id(), "by-b")
    events.append("b snapshotted")
    t.join()
    assert events == ["a locked", "a unlocks", "b snapshotted"]
    assert [x.uuid for x in a.list_snapshots(vid)] == [s.uuid]

    # a lock whose holder died (a pid of this host that is gone) is stale
    dead = subprocess.Popen(["true"])
    dead.wait()
    rec = LockRecord(
        "deadbeef", "exclusive", "test", os.uname().nodename, _boot_id(), dead.pid, time.time(), time.time()
    )
    lock_dir = Path(nfs_server.export) / f"pool-{pool}" / "locks" / vid
    (lock_dir / "deadbeef").write_text(json.dumps(rec.__dict__))
    t0 = time.monotonic()
    b.create_snapshot(vid, new_id(), "after-stale")
    assert time.monotonic() - t0 < 10 and not (lock_dir / "deadbeef").exists()
    assert list(lock_dir.iterdir()) == []  # released


def test_nfs_server_down_then_back(nfs_agent, nfs_server):
    n = nfs_agent
    vid = n.create(capacity=8 * MiB).uuid
    n.write(vid, {0: os.urandom(MiB)})
    d = n.digest(vid)
    nfs_server.stop()
    try:
        st = n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool))
        assert st.status == "unreachable" and st.error
        e = rpc_error(n.snap, vid, "while-down")
        assert e.code() == grpc.StatusCode.UNAVAILABLE and n.pool in e.details(), e.details()
    finally:
        nfs_server.start()
    assert n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).status == "healthy"
    s = n.snap(vid, "after")
    assert n.digest(vid, s.uuid) == d
    assert [x.name for x in n.call("ListSnapshots", volume_uuid=vid).snapshots] == ["after"]


def test_nfs_pool_config_is_checked(short_tmp):
    from agent.config import load

    for body, field in (
        ('type = "nfs"\nexport = "/x"\n', "ip"),
        ('type = "nfs"\nip = "127.0.0.1"\nexport = "x"\n', "export"),
        ('type = "nfs"\nip = "127.0.0.1"\nexport = "/a/../b"\n', "export"),
        ('type = "nfs"\nip = "127.0.0.1"\nexport = "/a b?c"\n', "export"),
        ('type = "nfs"\nip = "::1"\nexport = "/x"\n', "ip"),
    ):
        a = write_config(short_tmp / field, f"[pools.{NFS_POOL}]\n{body}")
        with pytest.raises(ConfigError) as e:
            load(str(a.config))
        assert e.value.field == f"pools.{NFS_POOL}.{field}", e.value.message
