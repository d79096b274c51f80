"""Pools attached at run time (what the controller does on seed 002
pool/share/create): a directory pool under the agent's roots and an RBD
pool on the real Ceph cluster; they survive a restart; detach rules."""

from __future__ import annotations

import uuid

import grpc
import pytest

from agent.api.v1 import volumes_pb2 as v
from agent.errors import TargetUnreachable

from support.volumes import MiB, rpc_error


def attach(c, **kw):
    return c.attach_pool(v.AttachPoolRequest(**kw))


def test_attach_dir_pool_survives_restart_and_detach_rules(make_agent):
    a = make_agent().start()
    pool = str(uuid.uuid4())
    path = str(a.roots[0] / "attached")
    with a.client() as c:
        st = attach(c, pool_uuid=pool, type="dir", path=path)
        assert st.status == "healthy" and st.total_bytes > 0
        assert attach(c, pool_uuid=pool, type="dir", path=path).status == "healthy"  # idempotent
        err = rpc_error(lambda: attach(c, pool_uuid=pool, type="dir", path=path + "2"))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS
        err = rpc_error(lambda: attach(c, pool_uuid=str(uuid.uuid4()), type="dir", path="/etc"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "PATH_NOT_ALLOWED" in err.details()
        err = rpc_error(lambda: attach(c, pool_uuid=str(uuid.uuid4()), type="ftp", path=path))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "type" in err.details()
        vol = str(uuid.uuid4())
        c.create_volume(v.CreateVolumeRequest(pool_uuid=pool, volume_uuid=vol, name="x", capacity=4 * MiB))
    assert a.stop() == 0
    a.start()  # the attached pool comes back from <state_dir>/pools.d
    with a.client() as c:
        assert c.get_volume(v.VolumeRef(pool_uuid=pool, volume_uuid=vol)).capacity == 4 * MiB
        err = rpc_error(lambda: c.detach_pool(v.DetachPoolRequest(pool_uuid=pool)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "HAS_DEPENDENTS" in err.details()
        err = rpc_error(lambda: c.detach_pool(v.DetachPoolRequest(pool_uuid=a.pool_uuid)))
        assert "config file" in err.details()
        c.detach_pool(v.DetachPoolRequest(pool_uuid=pool, force=True))
        err = rpc_error(lambda: c.get_pool_status(v.PoolRef(pool_uuid=pool)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert a.stop() == 0


def test_attach_rbd_pool(make_agent, ceph):
    a = make_agent().start()
    pool = str(uuid.uuid4())
    with a.client() as c:
        st = attach(c, pool_uuid=pool, type="rbd", ceph_conf=str(ceph.conf), rbd_pool="rbd")
        assert st.status == "healthy" and st.type == "rbd"
        vol = str(uuid.uuid4())
        info = c.create_volume(v.CreateVolumeRequest(pool_uuid=pool, volume_uuid=vol, name="r", capacity=8 * MiB))
        assert info.capacity == 8 * MiB
        c.delete_volume(v.DeleteVolumeRequest(pool_uuid=pool, volume_uuid=vol))
        err = rpc_error(
            lambda: attach(c, pool_uuid=str(uuid.uuid4()), type="rbd", ceph_conf="/nope.conf", rbd_pool="rbd")
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ceph_conf" in err.details()
    assert a.stop() == 0


def test_attach_backup_points_local_and_nfs(make_agent, nfs_server):
    from agent.api.v1 import backups_pb2 as b

    from support.backups import Bk

    a = make_agent().start()
    local, nfs = str(uuid.uuid4()), str(uuid.uuid4())
    with a.client() as c:
        st = c.attach_backup_point(
            b.AttachBackupPointRequest(
                backup_point_uuid=local, type="local", path=str(a.roots[0] / "bp-attached"), password="pw-attach-1"
            )
        )
        assert st.status in ("healthy", "degraded") and st.repository
        st = c.attach_backup_point(
            b.AttachBackupPointRequest(
                backup_point_uuid=nfs,
                type="nfs",
                ip="127.0.0.1",
                port=nfs_server.nfs_port,
                mount_port=nfs_server.mount_port,
                root_dir=str(nfs_server.export),
                sub_dir=f"att-{nfs[:8]}",
                chunk_size=1 << 20,
            )
        )
        assert st.status in ("healthy", "degraded") and st.type == "nfs"
        err = rpc_error(
            lambda: c.attach_backup_point(
                b.AttachBackupPointRequest(backup_point_uuid=str(uuid.uuid4()), type="local", path="/etc")
            )
        )
        assert "PATH_NOT_ALLOWED" in err.details()
        err = rpc_error(
            lambda: c.attach_backup_point(
                b.AttachBackupPointRequest(backup_point_uuid=str(uuid.uuid4()), type="nfs", ip="", root_dir="/x")
            )
        )
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "ip" in err.details()
        k = Bk(a, c, bp=nfs)
        vol = k.create(capacity=8 * MiB, name="src").uuid
        import os

        k.write(vol, {0: os.urandom(2 * MiB)})
        s1 = k.snap(vol, "s1").uuid
        full = k.backup(vol, s1)
    assert a.stop() == 0
    a.start()  # attached backup points come back from <state_dir>/backup_points.d
    with a.client() as c:
        k = Bk(a, c, bp=nfs)
        restored = k.restore(full.backup_uuid)
        assert restored.image_digest == k.digest(vol, s1)
        c.detach_backup_point(b.BackupPointRef(backup_point_uuid=nfs))
        err = rpc_error(lambda: c.check_backup_point(b.BackupPointRef(backup_point_uuid=nfs)))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    stored = a.workdir / "state" / "backup_points.d" / f"{local}.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert "pw-attach-1" not in a.log_text()
    assert a.stop() == 0


def test_a_vanished_repository_is_never_replaced(make_agent):
    """A local backup point whose disk is not mounted (an empty directory,
    or none, where its repository was) is unreachable with the reason: no
    job starts a new, empty repository in its place, not even after a
    restart; another repository there is refused too; the real one back
    is healthy."""
    from agent.api.v1 import backups_pb2 as b
    from agent.api.v1 import jobs_pb2

    a = make_agent().start()
    bp = str(uuid.uuid4())
    where = a.roots[0] / "bp-disk"
    ref = b.BackupPointRef(backup_point_uuid=bp)

    def verify() -> jobs_pb2.Job:
        spec = jobs_pb2.VerifySpec(backup_point_uuid=bp, repository=True)
        return c.run(f"verify-{uuid.uuid4()}", verify=spec)

    with a.client() as c:
        c.attach_backup_point(b.AttachBackupPointRequest(backup_point_uuid=bp, type="local", path=str(where)))
        assert c.check_backup_point(ref).status == "healthy" and verify().state == jobs_pb2.JOB_STATE_SUCCEEDED
        aside = where.with_name("bp-disk-unmounted")
        where.rename(aside)
        st = c.check_backup_point(ref)
        assert st.status == "unreachable" and "held repository" in st.error and "mounted" in st.error, st
        assert not where.exists()  # the check does not recreate it
        where.mkdir()  # the bare mount point
        with pytest.raises(TargetUnreachable, match="held repository"):
            verify()  # refused when submitted
        assert list(where.iterdir()) == []  # no new repository
    assert a.stop() == 0
    a.start()  # the memory of its repository survives a restart
    with a.client() as c:
        assert c.check_backup_point(ref).status == "unreachable"
        assert list(where.iterdir()) == []
        # another repository in its place is refused as well
        other = str(uuid.uuid4())
        c.attach_backup_point(
            b.AttachBackupPointRequest(backup_point_uuid=other, type="local", path=str(a.roots[0] / "other"))
        )
        where.rmdir()
        (a.roots[0] / "other").rename(where)
        st = c.check_backup_point(ref)
        assert st.status == "unreachable" and "now holds repository" in st.error, st
        with pytest.raises(TargetUnreachable, match="now holds repository"):
            verify()
        # the real one back: healthy, and usable
        where.rename(a.roots[0] / "other")
        aside.rename(where)
        assert c.check_backup_point(ref).status == "healthy" and verify().state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert a.stop() == 0
