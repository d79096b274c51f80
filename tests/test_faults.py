"""The fault suite: what must hold when things go wrong, against real
servers (tgtd, smbd, nfs-ganesha), real agents and a real controller.

- credentials: every backup point authenticates with its own, also when
  another backup point already has a session to the same target;
- transport: a server restarted between two calls is transparent (the
  dropped connection is made again and the call retried once), and a
  transport error is never reported as corrupt data;
- space: a backup point that fills up fails the backup with NO_SPACE, lists
  nothing, and has its space back at once (no pack left for a GC);
"""
from __future__ import annotations

import os
import uuid

import pytest

from agent.config import BackupPointSection
from agent.errors import AuthFailed, FailedPrecondition, NoSpace, StorageIOError, TargetUnreachable
from agent.repo.backup import backup
from agent.repo.catalog import latest_for_volume
from agent.repo.repository import Repository
from agent.repo.verify import verify
from agent.targets.registry import BackupPoint
from test_backup import CS, MiB, nid
from test_qcow2 import write
from test_nfs_pool import nfs_agent  # noqa: F401 - fixture
from test_targets import DiskTarget, IscsiTarget, NfsTarget, SmbTarget, iscsi_lun, loop, pool, \
    restore_to_qcow2, snapshot  # noqa: F401 - fixtures

# ---- credentials ----


def _iscsi_point(t, user: str, secret: str) -> BackupPoint:
    section = BackupPointSection(type="iscsi", ip="127.0.0.1", port=t.srv.port, target=t.lun.iqn, lun=1,
                                 username=user, secret=secret, format_lun=True, chunk_size=CS, timeout=5.0)
    return BackupPoint(str(uuid.uuid4()), section)


def test_iscsi_chap_is_checked_per_backup_point_on_a_shared_target(iscsi_lun, pool, short_tmp):
    """Backup points of one CHAP target: once one has sessions open, a
    wrong secret, an empty one or an unknown user still gets AUTH_FAILED
    (no backup, no listing); the same credentials share the sessions; a
    second valid account is refused while the first serves the LUN, and
    served once it let go."""
    t = iscsi_lun(128 * MiB, chap=True)
    t.srv._adm("--op", "new", "--mode", "account", "--user", "bfother", "--password", "other-secret-42",
               input=None)
    t.srv._adm("--op", "bind", "--mode", "account", "--tid", str(t.lun.tid), "--user", "bfother")
    owner = _iscsi_point(t, t.lun.user, t.lun.secret)
    vol = pool.create_volume(nid(), "src", 8 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(2 * MiB)}, short_tmp)
    m = backup(pool, vol, snapshot(pool, vol), owner.repository())
    assert owner.check().status == "healthy"
    strangers = [_iscsi_point(t, t.lun.user, "wrong-secret-0815"), _iscsi_point(t, t.lun.user, ""),
                 _iscsi_point(t, "nobody", t.lun.secret)]
    for bp in strangers:
        with pytest.raises(AuthFailed) as e:
            bp.repository()
        assert "0815" not in str(e.value) and t.lun.secret not in str(e.value)
        health = bp.check()
        assert health.status == "auth_failed" and health.error_code == "AUTH_FAILED"
    twin = _iscsi_point(t, t.lun.user, t.lun.secret)  # the same credentials: the same sessions
    assert latest_for_volume(twin.repository(), vol).backup_id == m.backup_id
    other = _iscsi_point(t, "bfother", "other-secret-42")
    with pytest.raises(FailedPrecondition, match="other credentials"):
        other.repository()
    owner.reset()
    assert latest_for_volume(twin.repository(), vol).backup_id == m.backup_id  # the twin's store is still open
    twin.reset()
    assert latest_for_volume(other.repository(), vol).backup_id == m.backup_id
    other.reset()


# ---- transport: servers restarted between calls ----

def _restartable(kind: str, request, short_tmp):
    """(target, server) of a remote backup point type."""
    if kind == "nfs":
        srv = request.getfixturevalue("nfs_server")
        return NfsTarget(srv), srv
    if kind == "smb":
        srv = request.getfixturevalue("smb_server")
        return SmbTarget(srv, short_tmp), srv
    srv = request.getfixturevalue("tgt_server")
    return IscsiTarget(srv, srv.add_lun(128 * MiB, chap=True)), srv


@pytest.mark.parametrize("kind", ["nfs", "smb", "iscsi"])
def test_a_server_restart_between_calls_is_transparent(kind, request, pool, short_tmp):
    """The store's connections are open when the server restarts: the next
    deep verify, listing, incremental backup and restore all succeed at
    their first call (each dropped connection is made again, the call
    retried once), and the data is what the snapshots hold."""
    t, srv = _restartable(kind, request, short_tmp)
    try:
        sub = f"restart-{uuid.uuid4().hex[:8]}"
        repo = Repository.init(t.make(sub), chunk_size=CS, password="restart-pw")
        vol = pool.create_volume(nid(), "src", 16 * MiB).uuid
        write(pool.head_path(vol), {0: os.urandom(3 * MiB), 9 * MiB: os.urandom(MiB)}, short_tmp)
        s1 = snapshot(pool, vol)
        m1 = backup(pool, vol, s1, repo)
        verify(repo, m1, deep=True)  # every connection of the store has been used
        srv.stop()
        srv.start()
        verify(repo, m1, deep=True)
        srv.stop()
        try:  # a server that stays away: unreachable, never "corrupt"
            with pytest.raises((TargetUnreachable, StorageIOError)):
                verify(Repository.open(t.make(sub, timeout=2.0), password="restart-pw"), m1, deep=True)
        finally:
            srv.start()
        assert [m.backup_id for m in repo.manifests()] == [m1.backup_id]
        write(pool.head_path(vol), {MiB: os.urandom(MiB)}, short_tmp)
        s2 = snapshot(pool, vol)
        srv.stop()
        srv.start()
        m2 = backup(pool, vol, s2, repo, parent=m1)
        assert m2.mode == "incremental" and m2.stats["chunks_read"] == 1
        for m, snap in ((m1, s1), (m2, s2)):
            assert restore_to_qcow2(pool, repo, m, short_tmp)[1] == pool.image_digest(vol, snap).image_digest
    finally:
        t.forget()


def test_an_nfs_volume_pool_survives_a_server_restart(nfs_agent, nfs_server):
    """The agent's NFS pool keeps pooled connections; after a server
    restart its next snapshot, listing and checksum succeed at once."""
    n = nfs_agent
    vid = n.create(capacity=16 * MiB).uuid
    n.write(vid, {0: os.urandom(MiB)})
    s1 = n.snap(vid, "s1")
    d1 = n.digest(vid, s1.uuid)
    nfs_server.stop()
    nfs_server.start()
    assert [x.uuid for x in n.call("ListVolumes").volumes] == [vid]
    s2 = n.snap(vid, "s2")
    assert n.digest(vid, s2.uuid) == d1
    assert n.changed(vid, s2.uuid, s1.uuid) == []


def test_smb_access_denied_names_the_share_and_user(smb_server, short_tmp):
    """A directory of the share the SMB user may not write: ACCESS_DENIED
    naming the share and the user (not an I/O error); another backup point
    with a wrong password on the same server is still refused while a good
    one has a session."""
    from agent.errors import AccessDenied

    t = SmbTarget(smb_server, short_tmp)
    good = t.make("granted")
    good.publish("hello", b"fine")
    locked = smb_server.root / "backups" / f"locked-{uuid.uuid4().hex[:8]}"
    locked.mkdir(mode=0o555)  # owned by root: the share's user may not create in it
    with pytest.raises(AccessDenied, match=rf"denied user '{smb_server.user}' access on share 'backups' "
                                           r"\(STATUS_ACCESS_DENIED\)") as e:
        t.make(f"{locked.name}/repo")
    assert e.value.code == "ACCESS_DENIED" and smb_server.password not in str(e.value)
    with pytest.raises(AuthFailed, match="refused user"):
        t.make("granted", password="not-the-password-4711")
    assert bytes(good.get("hello")) == b"fine"


# ---- space ----

@pytest.fixture
def small_store(request, short_tmp):
    """small_store(kind) -> (a store of about 48 MiB, a function that opens
    it again): a small ext4 for local, the NFS server's small export, the
    SMB server's small share, a small iSCSI LUN, a small loop device."""
    from smallfs import mount_small_fs, unmount_small_fs

    from agent.targets.local import LocalStore

    mounted = []

    def make(kind: str):
        sub = f"full-{uuid.uuid4().hex[:8]}"
        if kind == "local":
            mnt = short_tmp / "small"
            mnt.mkdir()
            mounted.append((mnt, mount_small_fs(short_tmp / "small.img", mnt, 48 * MiB)))
            return lambda: LocalStore(str(mnt / sub))
        if kind == "nfs":
            srv = request.getfixturevalue("nfs_server")
            return lambda: NfsTarget(srv).make(sub, export=srv.small)
        if kind == "smb":
            return lambda: SmbTarget(request.getfixturevalue("smb_server"), short_tmp).make(sub, share="small")
        if kind == "iscsi":
            return request.getfixturevalue("iscsi_lun")(48 * MiB).make
        return DiskTarget(request.getfixturevalue("loop")(48 * MiB)).make

    yield make
    for mnt, dev in mounted:
        unmount_small_fs(mnt, dev)


@pytest.mark.parametrize("kind", ["local", "nfs", "smb", "iscsi", "disk"])
def test_no_space_fails_cleanly_and_gives_the_space_back_at_once(kind, small_store, pool, short_tmp):
    """80 MiB of random data to a 48 MiB backup point, in 2 MiB packs so
    that many commit before the space runs out: NO_SPACE naming the backup
    point, nothing listed, no pack or index left behind (before any GC),
    the free space as before, and a smaller backup fits at once."""
    opener = small_store(kind)

    def open_store():
        store = opener() if kind in ("local", "nfs", "smb") else opener("")
        store.pack_target = 2 * MiB
        return store

    repo = Repository.init(open_store(), chunk_size=CS, compression="none")
    free0 = repo.store.stats().available_bytes
    vol = pool.create_volume(nid(), "src", 96 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(80 * MiB)}, short_tmp)
    with pytest.raises(NoSpace, match="backup point|LUN"):
        backup(pool, vol, snapshot(pool, vol), repo)
    assert repo.store.list("packs") == [] and repo.manifests() == []
    assert Repository.open(open_store()).manifests() == []
    assert repo.store.stats().available_bytes >= free0 - 2 * MiB
    small = pool.create_volume(nid(), "small", 16 * MiB).uuid
    write(pool.head_path(small), {0: os.urandom(12 * MiB)}, short_tmp)
    m = backup(pool, small, snapshot(pool, small), repo)
    verify(Repository.open(open_store()), m, deep=True)


def test_a_failed_backup_never_reclaims_what_a_running_one_may_use(pool, short_tmp):
    """Two backups of the same data at once: the second is cancelled after
    its packs committed while the first still runs (and may have
    deduplicated against them). Its packs are left for the GC, the first
    backup restores bit for bit, and the GC then removes only garbage."""
    import threading

    from agent.errors import Cancelled
    from agent.jobs.kinds import NullContext
    from agent.repo.gc import gc
    from agent.targets.local import LocalStore

    store = LocalStore(str(short_tmp / "bp"))
    store.pack_target = 2 * MiB
    repo = Repository.init(store, chunk_size=CS, compression="none")
    a_vol = pool.create_volume(nid(), "a", 16 * MiB).uuid
    b_vol = pool.create_volume(nid(), "b", 16 * MiB).uuid
    shared = os.urandom(8 * MiB)
    write(pool.head_path(a_vol), {0: shared}, short_tmp)
    write(pool.head_path(b_vol), {0: shared, 8 * MiB: os.urandom(6 * MiB)}, short_tmp)
    a_snap, b_snap = snapshot(pool, a_vol), snapshot(pool, b_vol)
    b_done, results = threading.Event(), {}

    class Slow(NullContext):  # A waits at its third chunk until B has failed
        n = 0

        def checkpoint(self):
            self.n += 1
            if self.n == 3:
                b_done.wait(60)

    class CancelLate(NullContext):
        n = 0

        def checkpoint(self):
            self.n += 1
            if self.n == 14:  # after most of its chunks were read and packs committed
                raise Cancelled("cancelled by the test")

    def run_a():
        results["a"] = backup(pool, a_vol, a_snap, repo, ctx=Slow())

    t = threading.Thread(target=run_a)
    t.start()
    try:
        with pytest.raises(Cancelled):
            backup(pool, b_vol, b_snap, repo, ctx=CancelLate())
        left = set(store.list("packs"))
        assert left, "the busy repository kept the failed backup's packs"
    finally:
        b_done.set()
        t.join(60)
    m = results["a"]
    assert restore_to_qcow2(pool, repo, m, short_tmp)[1] == pool.image_digest(a_vol, a_snap).image_digest
    gc(repo)
    verify(Repository.open(LocalStore(str(short_tmp / "bp"))), m, deep=True)
