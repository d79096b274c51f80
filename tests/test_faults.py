"""The fault suite: what must hold when things go wrong, against real
servers (tgtd, smbd, nfs-ganesha), real agents and a real controller.

- credentials: every backup point authenticates with its own, also when
  another backup point already has a session to the same target;
- transport: a server restarted between two calls is transparent (the
  dropped connection is made again and the call retried once), and a
  transport error is never reported as corrupt data;
- space: a backup point that fills up fails the backup with NO_SPACE, lists
  nothing, and has its space back at once (no pack left for a GC);
- corruption: verify (of a backup, or of the whole repository) names every
  damaged chunk, pack and backup, through the agent, the CLI and REST;
- input: paths, RBD images to adopt, the controller's database mode;
- tracking: a fallback and degraded RBD tracking say why;
- crashes: kill -9 of the agent at random points of backups, restores and
  GC on every backup point type (seeded, the seed printed), and of the
  controller mid-task.

Servers stopped in the middle of a backup are in tests/test_targets.py
(outage_then_retry, for NFS, SMB and iSCSI).

docs/reliability.md states the guarantees these tests hold to.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

from agent.backup_points import BackupPoint
from agent.config import BackupPointSection
from agent.errors import AuthFailed, DataCorrupt, FailedPrecondition, NoSpace, StorageIOError, TargetUnreachable
from agent.repo.backup import backup
from agent.repo.catalog import latest_for_volume
from agent.repo.repository import Repository
from agent.repo.verify import verify

from support.agents import BP_UUID
from support.backups import CS, nid, restore_to_qcow2
from support.stores import DiskTarget, IscsiTarget, NfsTarget, SmbTarget, snapshot
from support.volumes import MiB, write

# ---- credentials ----


def _iscsi_point(t, user: str, secret: str) -> BackupPoint:
    section = BackupPointSection(
        type="iscsi",
        ip="127.0.0.1",
        port=t.srv.port,
        target=t.lun.iqn,
        lun=1,
        username=user,
        secret=secret,
        format_lun=True,
        chunk_size=CS,
        timeout=5.0,
    )
    return BackupPoint(str(uuid.uuid4()), section)


def test_iscsi_chap_is_checked_per_backup_point_on_a_shared_target(iscsi_lun, pool, short_tmp):
    """Backup points of one CHAP target: once one has sessions open, a
    wrong secret, an empty one or an unknown user still gets AUTH_FAILED
    (no backup, no listing); the same credentials share the sessions; a
    second valid account is refused while the first serves the LUN, and
    served once it let go."""
    t = iscsi_lun(128 * MiB, chap=True)
    t.srv._adm("--op", "new", "--mode", "account", "--user", "bfother", "--password", "other-secret-42", input=None)
    t.srv._adm("--op", "bind", "--mode", "account", "--tid", str(t.lun.tid), "--user", "bfother")
    owner = _iscsi_point(t, t.lun.user, t.lun.secret)
    vol = pool.create_volume(nid(), "src", 8 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(2 * MiB)}, short_tmp)
    m = backup(pool, vol, snapshot(pool, vol), owner.repository())
    assert owner.check().status == "healthy"
    strangers = [
        _iscsi_point(t, t.lun.user, "wrong-secret-0815"),
        _iscsi_point(t, t.lun.user, ""),
        _iscsi_point(t, "nobody", t.lun.secret),
    ]
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
        verify(repo, m1, deep=True).check()  # every connection of the store has been used
        srv.stop()
        srv.start()
        verify(repo, m1, deep=True).check()
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
        assert m2.mode == "incremental" and m2.stats.chunks_read == 1
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
    with pytest.raises(
        AccessDenied,
        match=rf"denied user '{smb_server.user}' access on share 'backups' "
        r"\(STATUS_ACCESS_DENIED\)",
    ) as e:
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
    from agent.stores.local import LocalStore

    from support.smallfs import mount_small_fs, unmount_small_fs

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
    verify(Repository.open(open_store()), m, deep=True).check()


def test_a_failed_backup_never_reclaims_what_a_running_one_may_use(pool, short_tmp):
    """Two backups of the same data at once: the second is cancelled after
    its packs committed while the first still runs (and may have
    deduplicated against them). Its packs are left for the GC, the first
    backup restores bit for bit, and the GC then removes only garbage."""
    import threading

    from agent.errors import Cancelled
    from agent.jobs.kinds import NullContext
    from agent.repo.gc import gc
    from agent.stores.local import LocalStore

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
    verify(Repository.open(LocalStore(str(short_tmp / "bp"))), m, deep=True).check()


# ---- corruption: verify names every damaged item ----


class _Raw:
    """Where a store's objects are as files, to damage them as a disk or a
    careless admin would (a LUN: its backing file at the catalog's extents)."""

    def __init__(self, kind: str, t, sub: str, store):
        self.kind, self.t, self.sub, self.store = kind, t, sub, store

    def path(self, name: str):
        if self.kind == "local":
            return self.t.root / self.sub / name
        if self.kind == "nfs":
            return self.t.srv.export / self.sub / name
        return self.t.srv.root / "backups" / self.sub / name  # smb

    def flip(self, name: str, offset: int) -> None:
        if self.kind in ("iscsi", "disk"):
            size, extents = self.store.objects[name]
            off = extents[0][0]
            for off, ln in extents:  # noqa: B007 - the extent that holds the offset
                if offset < ln:
                    break
                offset -= ln
            backing = self.t.lun.file if self.kind == "iscsi" else self.t.lo.file
            with open(backing, "r+b") as f:
                f.seek(off + offset)
                b = f.read(1)
                f.seek(off + offset)
                f.write(bytes([b[0] ^ 0xFF]))
            subprocess.run(["sync"], check=True)
            if self.kind == "disk":  # the loop device caches what it read: drop it
                subprocess.run(["blockdev", "--flushbufs", self.t.lo.dev], check=True)
            return
        p = self.path(name)
        data = bytearray(p.read_bytes())
        data[offset] ^= 0xFF
        p.write_bytes(bytes(data))

    def truncate(self, name: str, length: int) -> bool:
        if self.kind in ("iscsi", "disk"):
            return False  # a LUN has no file lengths
        os.truncate(self.path(name), length)
        return True


@pytest.mark.parametrize(
    "kind,password", [("local", ""), ("nfs", "enc-pw"), ("smb", ""), ("iscsi", ""), ("disk", "enc-pw")]
)
def test_verify_names_every_damaged_chunk_pack_and_backup(kind, password, request, pool, short_tmp):
    """Three backups over several packs; then a flipped byte in one pack, a
    truncated second pack, a deleted third pack and the index of a fourth
    deleted. The repository verify names every damaged chunk with its pack
    and the backups it breaks, the orphan pack, and nothing else; the verify
    of one backup names each of its damaged chunks (across several packs),
    not just the first."""
    from agent.repo.verify import verify_repository

    from support.stores import LocalTarget

    if kind == "local":
        t = LocalTarget(short_tmp / "bp")
    elif kind == "disk":
        t = DiskTarget(request.getfixturevalue("loop")(256 * MiB))
    elif kind == "iscsi":
        t = request.getfixturevalue("iscsi_lun")(256 * MiB)
    else:
        t = _restartable(kind, request, short_tmp)[0]
    sub = f"corrupt-{uuid.uuid4().hex[:8]}" if kind in ("local", "nfs", "smb") else ""
    store = t.make(sub)
    store.pack_target = 3 * MiB
    repo = Repository.init(store, chunk_size=CS, compression="none", password=password)
    a = pool.create_volume(nid(), "a", 16 * MiB).uuid
    b = pool.create_volume(nid(), "b", 16 * MiB).uuid
    write(pool.head_path(a), {0: os.urandom(10 * MiB)}, short_tmp)
    write(pool.head_path(b), {0: os.urandom(6 * MiB)}, short_tmp)
    ma = backup(pool, a, snapshot(pool, a), repo)
    mb = backup(pool, b, snapshot(pool, b), repo)
    write(pool.head_path(a), {2 * MiB: os.urandom(2 * MiB)}, short_tmp)
    ma2 = backup(pool, a, snapshot(pool, a), repo, parent=ma)
    manifests = [ma, mb, ma2]
    assert verify_repository(repo, deep=True).check().damage == []

    all_packs = [n for n in repo.store.list("packs") if not n.endswith(".idx")]
    index = {p: repo._read_index(p) for p in all_packs}
    where = {cid.hex(): p for p, entries in index.items() for cid in entries}
    packs = list(dict.fromkeys(where[c] for c in ma.chunks if c))  # the first backup's, in its order
    assert len(packs) == 4 and len(all_packs) > 4, (packs, all_packs)
    raw = _Raw(kind, t, sub, repo.store)
    flipped, truncated, deleted, unindexed = packs
    first = min(index[flipped].items(), key=lambda kv: kv[1].offset)
    raw.flip(flipped, first[1].offset + first[1].length // 2)
    expect = {first[0].hex(): flipped}
    last = max(index[truncated].items(), key=lambda kv: kv[1].offset)
    if raw.truncate(truncated, last[1].offset + 10):
        expect[last[0].hex()] = truncated
    repo.store.delete(deleted)
    expect.update({c.hex(): deleted for c in index[deleted]})
    repo.store.delete(f"{unindexed}.idx")
    expect.update({c.hex(): "" for c in index[unindexed]})  # in no index now

    t.forget()
    fresh = Repository.open(t.make(sub), password=password)
    report = verify_repository(fresh, deep=True)
    got = {d.chunk_id: d for d in report.damage}
    assert set(got) == set(expect) and all(d.chunk_id for d in report.damage), report.summary()
    for cid, pack in expect.items():
        d = got[cid]
        assert d.pack == pack
        assert d.backup_uuids == sorted(m.backup_id for m in manifests if cid in m.chunks), d
    assert report.orphan_packs == [unindexed]
    assert report.damaged_backups == sorted({b for d in report.damage for b in d.backup_uuids})
    assert report.backups_checked == 3 and report.unreferenced_chunks == 0
    with pytest.raises(DataCorrupt, match=f"repository: {len(expect)} damaged item") as e:
        report.check()
    for cid in expect:
        assert cid[:16] in e.value.message

    # one backup: each of its damaged chunks, across every damaged pack it references
    for m in manifests:
        mine = {c: p for c, p in expect.items() if c in m.chunks}
        r = verify(fresh, m, deep=True)
        assert {d.chunk_id: d.pack for d in r.damage} == mine
    assert len(verify(fresh, ma, deep=False).damage) == len([c for c in expect if c in ma.chunks]) > 3


def test_verify_jobs_and_the_cli_list_every_damaged_item(agent):
    """Through a real agent: a corrupted pack fails the repository verify
    job with DATA_CORRUPT, and the failed job (also after an agent restart,
    from its journal) still carries every damaged item; `blockferry verify`
    prints them and exits 1; `blockferry gc` reclaims a deleted backup."""
    import json
    import signal

    from agent.api.v1 import jobs_pb2

    from support.backups import Bk
    from support.cli import cli

    with agent.client() as c:
        bk = Bk(agent, c)
        vol = bk.create(capacity=16 * MiB, name="src").uuid
        bk.write(vol, {0: os.urandom(4 * MiB)})
        first = bk.backup(vol, bk.snap(vol, "s1").uuid)
        bk.write(vol, {8 * MiB: os.urandom(2 * MiB)})
        second = bk.backup(vol, bk.snap(vol, "s2").uuid)
        ok = json.loads(cli(agent, "--json", "verify", BP_UUID, "--deep").stdout.splitlines()[-1])
        # int64 is a string in proto JSON
        assert ok["state"] == "JOB_STATE_SUCCEEDED" and ok["verify_result"]["backups_checked"] == "2"
        packs = sorted(p for p in (agent.workdir / "bp" / "packs").iterdir() if not p.name.endswith(".idx"))
        data = bytearray(packs[0].read_bytes())
        data[100] ^= 0xFF  # inside the first record's data
        packs[0].write_bytes(bytes(data))
        job = c.run("verify-all", verify=jobs_pb2.VerifySpec(backup_point_uuid=BP_UUID, repository=True))
        assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "DATA_CORRUPT"
        (d,) = job.verify_result.damage
        assert d.pack == f"packs/{packs[0].name}" and d.chunk_id[:16] in job.error.message
        assert (
            list(d.backup_uuids) == sorted(b.backup_uuid for b in (first, second) if b.backup_uuid in d.backup_uuids)
            and d.backup_uuids
        )
    assert agent.stop(signal.SIGTERM) == 0
    agent.start()
    with agent.client() as c:
        again = c.get("verify-all")
        assert again.verify_result.damage[0].chunk_id == d.chunk_id  # from the journal
        r = cli(agent, "verify", BP_UUID, check=False)
        assert r.returncode == 1 and f"chunk {d.chunk_id} in packs/{packs[0].name}" in r.stdout
        assert "DAMAGED: 2 backups" in r.stderr
        data[100] ^= 0xFF
        packs[0].write_bytes(bytes(data))
        assert cli(agent, "verify", BP_UUID, second.backup_uuid, "--deep").returncode == 0
        bk = Bk(agent, c)
        bk.delete(second.backup_uuid)
        out = cli(agent, "gc", BP_UUID).stdout
        assert out.startswith("freed ") and "1 packs deleted" in out, out
        r = json.loads(cli(agent, "--json", "verify", BP_UUID).stdout.splitlines()[-1])["verify_result"]
        assert r["backups_checked"] == "1" and "unreferenced_chunks" not in r


def _controller_with_agent(short_tmp, make_agent, extra: str = "", agent_extra: str = ""):
    """A controller (SQLite) with `extra` [controller] settings and one agent
    (with `agent_extra` config) registered with it; returns (controller,
    agent, host uuid)."""
    from support.controller import AGENT_TOKEN, Controller, wait_registered

    c = Controller(short_tmp / "ctl", extra=extra)
    host = str(uuid.uuid4())
    a = make_agent(
        f'{agent_extra}[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
        f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n'
    )
    a.config.chmod(0o600)
    a.start()
    with c.client("op") as op:
        wait_registered(op)
    return c, a, host


def _rest_backup(op, a, host, run, bp_dir, gen: int = 1):
    """A pool, a volume with data, a local backup point and a backup of it,
    through REST: (ids, backup uuid)."""
    from support.controller import check_ok, seed_example, wait_task

    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    pid = check_ok(
        op.post(
            "/v1/pool/share/create",
            json=dict(
                seed_example("002", "/v1/pool/share/create"),
                pool_type=4,
                source=str(a.roots[0] / "p1"),
                avail_host=[host],
            ),
        )
    )["pool"]["UUID"]
    vol = check_ok(
        op.post(
            "/v1/volume/share/create",
            json=dict(
                seed_example("001", "/v1/volume/share/create"),
                pool_uuid=pid,
                cluster_uuid=cluster_uuid,
                capacity=16 << 20,
                backing_file="",
            ),
        )
    )["volume"]
    write(vol["AccessPath"][host], {0: os.urandom(3 << 20)}, run)
    ref = {"tenant": tenant, "cluster_uuid": cluster_uuid, "volume_uuid": vol["UUID"]}
    snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
    bp = check_ok(
        op.post(
            "/v1/volume/internal/backuppoint/add",
            json=dict(
                seed_example("000", "/v1/volume/internal/backuppoint/add"),
                tenant=tenant,
                btype="local",
                cluster_uuid=cluster_uuid,
                root_dir=str(bp_dir),
                sub_dir="",
                env={"chunk_size": 1 << 20},
            ),
        )
    )["uuid"]
    started = check_ok(
        op.post(
            "/v1/volume/share/backup/add",
            json=dict(
                seed_example("001", "/v1/volume/share/backup/add"),
                cluster_uuid=cluster_uuid,
                volume_uuid=vol["UUID"],
                snapshot_uuid=snap["UUID"],
                backup_point_uuid=bp,
            ),
        )
    )
    assert wait_task(op, started["task_id"])["status"] == "success"
    return {"cluster_uuid": cluster_uuid, "tenant": tenant, "bp": bp}, started["backup"]["UUID"]


def test_verify_and_gc_through_rest(short_tmp, make_agent):
    """backuppoint/verify (the repository, or one backup) and backuppoint/gc
    are tasks with progress; a failed verify task's result names every
    damaged chunk and the backups it breaks; deleting a backup queues the
    backup point's GC by itself (gc_after_delete), which frees its space."""
    from support.controller import check_ok, wait_task

    c, a, host = _controller_with_agent(
        short_tmp, make_agent, "gc_after_delete = 0\ngc_interval = 0\nscheduler_interval = 1\n"
    )
    run = short_tmp / "run-test"
    run.mkdir()
    bp_dir = a.roots[0] / "backups"
    try:
        with c.client("op") as op:
            ids, backup_uuid = _rest_backup(op, a, host, run, bp_dir)
            point = {"cluster_uuid": ids["cluster_uuid"], "uuid": ids["bp"]}
            deadline = time.monotonic() + 30  # until the agent's heartbeat reports the backup point it now serves
            while True:
                r = op.post("/v1/volume/internal/backuppoint/verify", json=dict(point, deep=True))
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            t = wait_task(op, check_ok(r)["task_id"])
            assert t["status"] == "success" and t["operation_type"] == "verify" and t["progress"] == 100.0, t
            assert t["result"]["backups_checked"] == "1" and t["host_uuid"] == host
            pack = next(p for p in (bp_dir / "packs").iterdir() if not p.name.endswith(".idx"))
            data = bytearray(pack.read_bytes())
            data[200] ^= 0xFF
            pack.write_bytes(bytes(data))
            for body in (point, dict(point, backup_uuid=backup_uuid)):
                t = wait_task(op, check_ok(op.post("/v1/volume/internal/backuppoint/verify", json=body))["task_id"])
                assert t["status"] == "failed" and t["error_info"]["code"] == "DATA_CORRUPT", t
                (d,) = t["result"]["damage"]
                assert d["pack"] == f"packs/{pack.name}" and d["backup_uuids"] == [backup_uuid], d
            assert check_ok(op.get("/v1/tasks", params={"operation_type": "gc"}))["total_count"] == 0
            check_ok(
                op.post(
                    "/v1/volume/share/backup/delete",
                    json={"cluster_uuid": ids["cluster_uuid"], "tenant": ids["tenant"], "backup_uuid": backup_uuid},
                )
            )
            deadline = time.monotonic() + 30
            while not (gcs := check_ok(op.get("/v1/tasks", params={"operation_type": "gc"}))["tasks"]):
                assert time.monotonic() < deadline, "no GC after the deletion"
                time.sleep(0.2)
            t = wait_task(op, gcs[0]["id"])
            assert t["status"] == "success" and int(t["result"]["bytes_freed"]) >= 3 << 20, t
            assert not list((bp_dir / "packs").iterdir())
            t = wait_task(op, check_ok(op.post("/v1/volume/internal/backuppoint/gc", json=point))["task_id"])
            assert t["status"] == "success" and t["id"] != gcs[0]["id"], t
            time.sleep(2)  # the deletion's GC ran: the scheduler queues no other
            assert check_ok(op.get("/v1/tasks", params={"operation_type": "gc"}))["total_count"] == 2
    finally:
        assert a.stop() == 0
        c.stop()


def test_every_backup_point_is_collected_on_schedule(short_tmp, make_agent):
    """gc_interval: without any deletion, the controller collects every
    backup point a host reports, again and again."""
    from support.controller import check_ok

    c, a, host = _controller_with_agent(short_tmp, make_agent, "gc_interval = 2\nscheduler_interval = 1\n")
    run = short_tmp / "run-test"
    run.mkdir()
    try:
        with c.client("op") as op:
            _rest_backup(op, a, host, run, a.roots[0] / "backups")
            deadline = time.monotonic() + 30
            while (
                len(
                    [
                        t
                        for t in check_ok(op.get("/v1/tasks", params={"operation_type": "gc"}))["tasks"]
                        if t["status"] == "success"
                    ]
                )
                < 2
            ):
                assert time.monotonic() < deadline, "no scheduled GC"
                time.sleep(0.5)
    finally:
        assert a.stop() == 0
        c.stop()


# ---- input: what the API must take, and what it must refuse by name ----


def test_rest_adopts_an_existing_rbd_image_and_backs_it_up(short_tmp, make_agent, ceph):
    """An image made outside blockferry, named as `image` or
    `<rados pool>/image` in backing_file, becomes a volume through REST
    (seed 001 create) and its backup holds exactly the image's bytes; an
    image of another RADOS pool, or a snapshot name, is refused by field."""
    from agent import native

    from support.controller import check_error, check_ok, seed_example, wait_task

    c, a, host = _controller_with_agent(short_tmp, make_agent)
    rados_pool = f"adopt{uuid.uuid4().hex[:8]}"
    ceph.add_pool(rados_pool)
    raw = short_tmp / "legacy.raw"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.write(os.urandom(MiB))
        f.seek(5 * MiB)
        f.write(os.urandom(300_000))
    for image in ("legacy", "legacy2"):
        ceph.rbd("import", str(raw), f"{rados_pool}/{image}")
    want = native.RefImageHash()
    want.update(raw.read_bytes())
    try:
        with c.client("op") as op:
            create = seed_example("002", "/v1/pool/share/create")
            pid = check_ok(
                op.post(
                    "/v1/pool/share/create",
                    json=dict(
                        create,
                        pool_name="ceph",
                        pool_type=6,
                        source=rados_pool,
                        limit_host=False,
                        avail_host=[],
                        attr={"ceph_conf": str(ceph.conf)},
                    ),
                )
            )["pool"]["UUID"]
            body = dict(
                seed_example("001", "/v1/volume/share/create"),
                pool_uuid=pid,
                cluster_uuid=create["cluster_uuid"],
                capacity=0,
            )
            check_error(
                op.post("/v1/volume/share/create", json=dict(body, backing_file="otherpool/legacy")),
                400,
                "backing_file",
            )
            check_error(
                op.post("/v1/volume/share/create", json=dict(body, backing_file="legacy@snap")), 400, "backing_file"
            )
            vols = [
                check_ok(
                    op.post("/v1/volume/share/create", json=dict(body, volume_name=f"adopted-{n}", backing_file=name))
                )["volume"]
                for n, name in enumerate((f"{rados_pool}/legacy", "legacy2"))
            ]
            assert [v["Capacity"] for v in vols] == [8 * MiB] * 2
            assert sorted(ceph.rbd("ls", rados_pool).split()) == sorted(v["UUID"] for v in vols)
            tenant = body["tenant"]
            bp = check_ok(
                op.post(
                    "/v1/volume/internal/backuppoint/add",
                    json=dict(
                        seed_example("000", "/v1/volume/internal/backuppoint/add"),
                        tenant=tenant,
                        btype="local",
                        cluster_uuid=create["cluster_uuid"],
                        root_dir=str(a.roots[0] / "backups"),
                        sub_dir="",
                        env={"chunk_size": 1 << 20},
                    ),
                )
            )["uuid"]
            ref = {"tenant": tenant, "cluster_uuid": create["cluster_uuid"], "volume_uuid": vols[0]["UUID"]}
            snap = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s1")))["snapshot"]
            started = check_ok(
                op.post(
                    "/v1/volume/share/backup/add",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/add"),
                        cluster_uuid=create["cluster_uuid"],
                        volume_uuid=vols[0]["UUID"],
                        snapshot_uuid=snap["UUID"],
                        backup_point_uuid=bp,
                    ),
                )
            )
            t = wait_task(op, started["task_id"])
            assert t["status"] == "success" and t["result"]["image_digest"] == want.digest().hex(), t
    finally:
        assert a.stop() == 0
        c.stop()


def test_paths_outside_the_roots_or_with_control_characters_are_refused_by_field(short_tmp, make_agent):
    """A local backup point outside every host's roots is refused when it
    is added or moved (not at its first backup); newlines and other control
    characters in pool sources and backup point paths are refused naming
    the field; nothing is stored."""
    from support.controller import check_error, check_ok, seed_example

    c, a, host = _controller_with_agent(short_tmp, make_agent)
    try:
        with c.client("op") as op:
            add = dict(
                seed_example("000", "/v1/volume/internal/backuppoint/add"),
                btype="local",
                root_dir=str(a.roots[0] / "backups"),
                sub_dir="",
            )
            for body, status, field in (
                (dict(add, root_dir="/etc/blockferry-backups"), 403, "root_dir"),
                (dict(add, root_dir=str(a.roots[0]) + "-sibling"), 403, "root_dir"),
                (dict(add, root_dir=str(a.roots[0] / "back\nups")), 400, "root_dir"),
                (dict(add, sub_dir="a\tb"), 400, "sub_dir"),
                (dict(add, btype="samba", root_dir="share\r\n"), 400, "root_dir"),
                (dict(add, btype="iscsi", root_dir="iqn.2026-01.x:t\n1"), 400, "root_dir"),
                (dict(add, btype="nfs", root_dir="/exports/a\nb"), 400, "root_dir"),
            ):
                check_error(op.post("/v1/volume/internal/backuppoint/add", json=body), status, field)
            listed = check_ok(
                op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": add["cluster_uuid"]})
            )
            assert listed["total_count"] == 0
            bp = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=add))["uuid"]
            update = dict(
                seed_example("000", "/v1/volume/internal/backuppoint/update"),
                tenant_uuid=add["tenant"],
                cluster_uuid=add["cluster_uuid"],
                backup_point_uuid=bp,
                ip="127.0.0.1",
                sub_dir="",
            )
            check_error(
                op.post(
                    "/v1/volume/internal/backuppoint/update", json=dict(update, root_directory="/var/tmp/elsewhere")
                ),
                403,
                "root_directory",
            )
            check_error(
                op.post(
                    "/v1/volume/internal/backuppoint/update", json=dict(update, root_directory=str(a.roots[0] / "x\ny"))
                ),
                400,
                "root_directory",
            )
            listed = check_ok(
                op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": add["cluster_uuid"]})
            )["list"]
            assert [x["indentify"]["RootDir"] for x in listed] == [add["root_dir"]]
            create = dict(seed_example("002", "/v1/pool/share/create"), pool_type=4, avail_host=[host])
            check_error(
                op.post("/v1/pool/share/create", json=dict(create, source=str(a.roots[0] / "p\n1"))), 400, "source"
            )
            check_error(
                op.post(
                    "/v1/pool/share/create",
                    json=dict(create, pool_type=6, source="rb\td", attr={"ceph_conf": "/etc/ceph/ceph.conf"}),
                ),
                400,
                "source",
            )
            check_error(
                op.post("/v1/pool/share/create", json=dict(create, pool_type=2, ip="127.0.0.1", source="/exp\x7f")),
                400,
                "source",
            )
            assert (
                check_ok(op.post("/v1/pool/share/list", json={"cluster_uuid": create["cluster_uuid"]}))["TotalCount"]
                == 0
            )
    finally:
        assert a.stop() == 0
        c.stop()


def test_the_controller_database_is_private_whatever_the_umask(short_tmp, make_agent):
    """controller.sqlite3 (the inventory and sealed secrets) and its WAL
    files are 0600 under umask 022, and an older, wider file is narrowed."""
    import stat

    from support.controller import Controller

    old = os.umask(0o022)
    try:
        c = Controller(short_tmp / "ctl")
        c.stop()
        db = short_tmp / "ctl" / "controller.sqlite3"
        db.chmod(0o644)
        c = Controller(short_tmp / "ctl")  # the same database, opened again
        try:
            files = [p for p in (short_tmp / "ctl").iterdir() if p.name.startswith("controller.sqlite3")]
            assert {p.name for p in files} >= {"controller.sqlite3", "controller.sqlite3-wal"}
            for p in files:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
        finally:
            c.stop()
    finally:
        os.umask(old)


def test_a_failed_restore_leaves_no_volume_and_no_lock_file(agent):
    """A restore that fails (a damaged chunk) leaves neither the new volume
    nor its lock file in the pool."""
    from agent.api.v1 import jobs_pb2

    from support.backups import Bk

    with agent.client() as c:
        bk = Bk(agent, c)
        vol = bk.create(capacity=8 * MiB, name="src").uuid
        bk.write(vol, {0: os.urandom(2 * MiB)})
        r = bk.backup(vol, bk.snap(vol, "s1").uuid)
        pack = next(p for p in (agent.workdir / "bp" / "packs").iterdir() if not p.name.endswith(".idx"))
        data = bytearray(pack.read_bytes())
        data[300] ^= 0xFF
        pack.write_bytes(bytes(data))
        locks = agent.pool_root / f"pool-{agent.pool_uuid}" / "locks"
        before = sorted(p.name for p in locks.iterdir())
        new = str(uuid.uuid4())
        job = c.run(
            f"restore-{new}",
            restore=jobs_pb2.RestoreSpec(
                backup_point_uuid=BP_UUID,
                backup_uuid=r.backup_uuid,
                pool_uuid=agent.pool_uuid,
                volume_uuid=new,
                name="restored",
            ),
        )
        assert job.state == jobs_pb2.JOB_STATE_FAILED and job.error.code == "DATA_CORRUPT", job
        assert [v.uuid for v in bk.call("ListVolumes").volumes] == [vol]
        assert sorted(p.name for p in locks.iterdir()) == before and f"{new}.lock" not in before
        bk.call("DeleteVolume", volume_uuid=vol, force=True)
        assert f"{vol}.lock" not in [p.name for p in locks.iterdir()]  # a deleted volume's goes too


# ---- change tracking: why a backup read everything ----


def test_a_fallback_says_why_in_the_task_the_backup_record_and_the_log(short_tmp, make_agent):
    """A snapshot layer whose dirty bitmap is gone: the next backup falls
    back to reading every chunk, and the task's result, the backup's record
    (REST list, seed 003's extend_info, gRPC) and the agent's log say which
    snapshot and what was wrong with its bitmap; nothing says "take a full
    backup" (it just did)."""
    from agent.api.v1 import backups_pb2

    from support.controller import check_ok, seed_example, wait_task

    c, a, host = _controller_with_agent(short_tmp, make_agent)
    run = short_tmp / "run-test"
    run.mkdir()
    try:
        with c.client("op") as op:
            ids, first = _rest_backup(op, a, host, run, a.roots[0] / "backups")
            vol_uuid = check_ok(op.get("/v1/volume/share/backup/list", params={"cluster_uuid": ids["cluster_uuid"]}))[
                "list"
            ][0]["VolumeUUID"]
            ref = {"tenant": ids["tenant"], "cluster_uuid": ids["cluster_uuid"], "volume_uuid": vol_uuid}
            vol = check_ok(op.post("/v1/volume/share/get", json=ref))["volume"]
            write(vol["AccessPath"][host], {MiB: os.urandom(4096)}, run)
            s2 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s2")))["snapshot"][
                "UUID"
            ]
            layer = a.roots[0] / "p1" / f"pool-{vol['PoolUUID']}" / "snapshot" / vol_uuid / s2
            subprocess.run(["qemu-img", "bitmap", "--remove", str(layer), "bf-dirty"], check=True)
            started = check_ok(
                op.post(
                    "/v1/volume/share/backup/add",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/add"),
                        cluster_uuid=ids["cluster_uuid"],
                        volume_uuid=vol_uuid,
                        snapshot_uuid=s2,
                        backup_point_uuid=ids["bp"],
                        backup_name="second",
                    ),
                )
            )
            t = wait_task(op, started["task_id"])
            reason = t["result"]["mode_reason"]
            assert t["status"] == "success" and t["result"]["mode"] == "fallback", t
            assert s2 in reason and "bf-dirty" in reason and "missing" in reason, reason
            listed = {
                x["UUID"]: x
                for x in check_ok(op.get("/v1/volume/share/backup/list", params={"cluster_uuid": ids["cluster_uuid"]}))[
                    "list"
                ]
            }
            assert (listed[started["backup"]["UUID"]]["Mode"], listed[started["backup"]["UUID"]]["ModeReason"]) == (
                "fallback",
                reason,
            )
            assert listed[first]["Mode"] == "full" and "no earlier backup" in listed[first]["ModeReason"]
        with a.client() as ac:
            b = ac.get_backup(
                backups_pb2.GetBackupRequest(backup_point_uuid=ids["bp"], backup_uuid=started["backup"]["UUID"])
            )
            assert (b.mode, b.mode_reason) == ("fallback", reason)
        log = a.log_text()
        assert "backup falls back to reading every data chunk" in log and reason in log
        assert "take a full backup" not in log
    finally:
        assert a.stop() == 0
        c.stop()


def test_an_invalid_rbd_object_map_is_degraded_tracking_not_silent(rbd_agent, ceph):
    """An RBD image whose object map is invalid (object-map enabled on an
    image that has data): its volume and snapshots report tracking
    "degraded", the incremental backup says why its changes came the slow
    way, and restores bit for bit; after a rebuild it is "ok" again."""
    import rados
    import rbd

    from support.agents import RBD_POOL_UUID
    from support.backups import Bk

    def rbd_write(image, writes):
        with rados.Rados(conffile=str(ceph.conf)) as cl, cl.open_ioctx("rbd") as io, rbd.Image(io, image) as img:
            for off, data in writes.items():
                img.write(data, off)

    with rbd_agent.client() as c:
        bk = Bk(rbd_agent, c)
        bk.pool = RBD_POOL_UUID
        rv = bk.create(capacity=16 * MiB, name="rbd-src").uuid
        rbd_write(rv, {0: os.urandom(3 * MiB)})
        r1 = bk.backup(rv, bk.snap(rv, "s1").uuid)
        rbd_write(rv, {8 * MiB: os.urandom(MiB)})
        s2 = bk.snap(rv, "s2").uuid
        assert bk.call("GetVolume", volume_uuid=rv).tracking == "ok"
        ceph.rbd("feature", "disable", f"rbd/{rv}", "fast-diff", "object-map")
        ceph.rbd("feature", "enable", f"rbd/{rv}", "object-map", "fast-diff")  # marks every object map invalid
        assert bk.call("GetVolume", volume_uuid=rv).tracking == "degraded"
        tracking = {s.uuid: s.tracking for s in bk.call("ListSnapshots", volume_uuid=rv).snapshots}
        assert tracking[s2] == "degraded", tracking
        r2 = bk.backup(rv, s2)
        assert r2.mode == "incremental" and r2.parent_backup_uuid == r1.backup_uuid
        assert "object map" in r2.mode_reason and "invalid" in r2.mode_reason and s2 in r2.mode_reason
        assert r2.changed_chunks == 1
        assert bk.digest(bk.restore(r2.backup_uuid).volume_uuid) == bk.digest(rv, s2)
        assert "incremental backup with degraded change tracking" in rbd_agent.log_text()
        ceph.rbd("object-map", "rebuild", f"rbd/{rv}")
        ceph.rbd("object-map", "rebuild", f"rbd/{rv}@{s2}")
        assert bk.call("GetVolume", volume_uuid=rv).tracking == "ok"
        assert {s.uuid: s.tracking for s in bk.call("ListSnapshots", volume_uuid=rv).snapshots}[s2] == "ok"


# ---- crashes: kill -9 of the agent and of the controller ----

KILL_POINTS = 12
ALL_TYPES = ("local", "nfs", "smb", "iscsi", "disk")


@pytest.fixture
def every_type_agent(make_agent, nfs_server, smb_server, tgt_server, short_tmp):
    """One agent with a backup point of every type, two of them encrypted
    (local and SMB), and a slow bandwidth limit so that kills land mid-job;
    yields (agent, {type: backup point uuid}, {type: what holds its files})."""
    from support.stores import Loop

    ids = {kind: str(uuid.uuid4()) for kind in ALL_TYPES}
    lun = tgt_server.add_lun(256 * MiB, chap=True)
    loop = Loop(short_tmp / "disk.img", 256 * MiB)
    sub = f"kill-{uuid.uuid4().hex[:6]}"
    extra = "\n".join(
        [
            "[jobs]\nbandwidth_limit = 150000000\n",
            (
                f'[backup_points.{ids["local"]}]\npath = "{short_tmp}/a/root/bp-local"\nchunk_size = 1048576\n'
                'password = "kill-local-pw"\n'
            ),
            nfs_server.section(ids["nfs"], sub_dir=sub),
            smb_server.section(ids["smb"], sub_dir=sub, extra='password = "kill-smb-pw"\n'),
            tgt_server.section(ids["iscsi"], lun),
            (
                f'[backup_points.{ids["disk"]}]\ntype = "disk"\ndevice = "{loop.dev}"\nformat_lun = true\n'
                "chunk_size = 1048576\n"
            ),
        ]
    )
    a = make_agent(extra)
    a.config.chmod(0o600)  # it holds secrets
    a.start()
    dirs = {
        "local": short_tmp / "a" / "root" / "bp-local",
        "nfs": nfs_server.export / sub,
        "smb": smb_server.root / "backups" / sub,
    }
    yield a, ids, dirs
    if a.proc and a.proc.poll() is None:
        assert a.stop() == 0, a.log_text()
    loop.detach()


def test_kill_9_at_random_points_of_backups_restores_and_gc(every_type_agent):
    """The agent is killed (-9) at KILL_POINTS random points of backups,
    restores and garbage collections on every backup point type, encrypted
    ones included (the seed is printed; BF_FAULT_SEED=<n> runs the same
    points again). After each restart: every backup that completed is
    listed, everything listed verifies, the killed job ended as a whole
    (succeeded, or failed INTERRUPTED), a restore's volume exists only when
    it completed and then holds the backup's data. At the end a GC on
    every type succeeds, every backup verifies deeply, and no partial
    object or lock record is left."""
    import random
    import signal

    from agent.api.v1 import jobs_pb2

    from support.agents import POOL_UUID
    from support.backups import Bk

    a, ids, dirs = every_type_agent
    seed = int(os.environ.get("BF_FAULT_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"kill -9 fault points: seed {seed} (BF_FAULT_SEED={seed} runs the same ones)")
    rng = random.Random(seed)
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=64 * MiB, name="src").uuid
        bk.write(vol, {i * 8 * MiB: os.urandom(4 * MiB) for i in range(8)})
        snaps = [bk.snap(vol, "s0").uuid]
        bk.write(vol, {3 * MiB: os.urandom(2 * MiB)})
        snaps.append(bk.snap(vol, "s1").uuid)
        want = {s: bk.digest(vol, s) for s in snaps}
        completed: dict[str, dict[str, str]] = {k: {} for k in ALL_TYPES}  # type -> backup uuid -> its digest
        for kind in ALL_TYPES:  # something to restore and collect from the start
            r = Bk(a, c, bp=ids[kind]).backup(vol, snaps[0])
            completed[kind][r.backup_uuid] = r.image_digest
    landed = 0
    for n in range(KILL_POINTS):
        kind = ALL_TYPES[n % len(ALL_TYPES)]
        op = rng.choice(("backup", "backup", "restore", "gc"))
        target = rng.uniform(0, 100)
        job_id, new = f"kill-{n}", str(uuid.uuid4())
        with a.client() as c:
            k = Bk(a, c, bp=ids[kind])
            if op == "backup":
                snap = rng.choice(snaps)
                c.submit(
                    job_id,
                    backup=jobs_pb2.BackupSpec(
                        backup_point_uuid=ids[kind],
                        pool_uuid=POOL_UUID,
                        volume_uuid=vol,
                        snapshot_uuid=snap,
                        backup_uuid=new,
                        full=rng.random() < 0.5,
                    ),
                )
            elif op == "restore":
                source = rng.choice(sorted(completed[kind]))
                c.submit(
                    job_id,
                    restore=jobs_pb2.RestoreSpec(
                        backup_point_uuid=ids[kind],
                        backup_uuid=source,
                        pool_uuid=POOL_UUID,
                        volume_uuid=new,
                        name=f"restored-{n}",
                    ),
                )
            else:
                if len(completed[kind]) > 1:  # garbage to collect: a deleted backup's chunks
                    gone = rng.choice(sorted(completed[kind]))
                    k.delete(gone)
                    del completed[kind][gone]
                c.submit(job_id, gc=jobs_pb2.GcSpec(backup_point_uuid=ids[kind], wait_seconds=30))
            while True:
                job = c.get(job_id)
                if (
                    job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED)
                    or job.progress.percent >= target
                ):
                    break
                time.sleep(0.002)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        a.start()
        where = f"seed {seed}, point {n}: {op} on {kind} at {target:.0f} %"
        with a.client() as c:
            k = Bk(a, c, bp=ids[kind])
            job = c.get(job_id)
            assert job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED), (where, job)
            if job.state == jobs_pb2.JOB_STATE_FAILED:
                assert job.error.code == "INTERRUPTED", (where, job.error)
                landed += 1
            listed = {x.uuid: x.image_digest for x in k.list()}
            if op == "backup" and job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
                completed[kind][new] = job.backup_result.image_digest
            assert completed[kind].items() <= listed.items(), where
            assert set(listed) <= set(completed[kind]) | {new}, where
            for bid in listed:
                v = k.verify(bid)
                assert v.state == jobs_pb2.JOB_STATE_SUCCEEDED, (where, bid, v.error)
            completed[kind].update(listed)
            volumes = {x.uuid for x in k.call("ListVolumes").volumes}
            if op == "restore":
                assert (new in volumes) == (job.state == jobs_pb2.JOB_STATE_SUCCEEDED), where
                if new in volumes:
                    assert k.digest(new) == completed[kind][source], where
    print(f"{landed} of {KILL_POINTS} kills landed before their job completed")
    assert landed >= KILL_POINTS // 4, f"seed {seed}: the kills did not land mid-job"
    with a.client() as c:
        for kind in ALL_TYPES:
            k = Bk(a, c, bp=ids[kind])
            job = c.run(f"final-gc-{kind}", gc=jobs_pb2.GcSpec(backup_point_uuid=ids[kind], wait_seconds=30))
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, (seed, kind, job.error)
            listed = {x.uuid for x in k.list()}
            assert listed == set(completed[kind]), (seed, kind)
            for bid in listed:
                v = k.verify(bid, deep=True)
                assert v.state == jobs_pb2.JOB_STATE_SUCCEEDED, (seed, kind, bid, v.error)
            r = k.backup(vol, snaps[1])  # and a new backup still works
            assert r.image_digest == want[snaps[1]]
            if kind in dirs:
                leftovers = [p for p in dirs[kind].rglob("*") if p.name.startswith(".part-")]
                assert leftovers == [], (seed, kind, leftovers)
                assert not list((dirs[kind] / "locks").iterdir()), (seed, kind)


def test_kill_9_of_the_controller_mid_task(short_tmp, make_agent):
    """The controller is killed (-9) while a backup and a restore run on
    the agent; started again on its database, it follows both tasks to
    their end: the backup is listed and verifies, the restored volume holds
    the backup's data."""
    import signal

    from agent.api.v1 import backups_pb2, jobs_pb2

    from support.controller import check_ok, seed_example, wait_task

    c, a, host = _controller_with_agent(
        short_tmp, make_agent, agent_extra="[jobs]\nbandwidth_limit = 8000000\n"
    )  # ~1.7 s a job
    run = short_tmp / "run-test"
    run.mkdir()
    try:
        with c.client("op") as op:
            ids, first = _rest_backup(op, a, host, run, a.roots[0] / "backups")
            listed = check_ok(op.get("/v1/volume/share/backup/list", params={"cluster_uuid": ids["cluster_uuid"]}))
            vol_uuid = listed["list"][0]["VolumeUUID"]
            ref = {"tenant": ids["tenant"], "cluster_uuid": ids["cluster_uuid"], "volume_uuid": vol_uuid}
            vol = check_ok(op.post("/v1/volume/share/get", json=ref))["volume"]
            write(vol["AccessPath"][host], {4 * MiB: os.urandom(10 * MiB)}, run)
            s2 = check_ok(op.post("/v1/volume/share/snapshot/create", json=dict(ref, snapshot_name="s2")))["snapshot"][
                "UUID"
            ]
            backup = check_ok(
                op.post(
                    "/v1/volume/share/backup/add",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/add"),
                        cluster_uuid=ids["cluster_uuid"],
                        volume_uuid=vol_uuid,
                        snapshot_uuid=s2,
                        backup_point_uuid=ids["bp"],
                        backup_name="second",
                    ),
                )
            )
            restore = check_ok(
                op.post(
                    "/v1/volume/share/backup/restore",
                    json=dict(
                        seed_example("001", "/v1/volume/share/backup/restore"),
                        backup_uuid=first,
                        new_volume_name="restored",
                        new_pool_uuid=vol["PoolUUID"],
                        new_volume_tenant=ids["tenant"],
                        cluster_uuid=ids["cluster_uuid"],
                    ),
                )
            )
            deadline = time.monotonic() + 30
            while check_ok(op.get(f"/v1/tasks/{backup['task_id']}"))["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait()
        time.sleep(0.5)
        c.start()
        with c.client("op") as op:
            t = wait_task(op, backup["task_id"], 60)
            assert t["status"] == "success" and t["result"]["mode"] == "incremental", t
            tr = wait_task(op, restore["task_id"], 60)
            assert tr["status"] == "success", tr
            statuses = {
                x["UUID"]: x["Status"]
                for x in check_ok(op.get("/v1/volume/share/backup/list", params={"cluster_uuid": ids["cluster_uuid"]}))[
                    "list"
                ]
            }
            assert statuses == {first: "BackupSucceeded", backup["backup"]["UUID"]: "BackupSucceeded"}
        with a.client() as ac:
            job = ac.run(
                "after-controller-kill",
                verify=jobs_pb2.VerifySpec(
                    backup_point_uuid=ids["bp"], backup_uuid=backup["backup"]["UUID"], deep=True
                ),
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            digest = ac.run(
                "sum-restored",
                checksum=jobs_pb2.ChecksumSpec(pool_uuid=vol["PoolUUID"], volume_uuid=restore["volume"]["UUID"]),
            ).checksum_result.image_digest
            first_digest = ac.get_backup(backups_pb2.GetBackupRequest(backup_point_uuid=ids["bp"], backup_uuid=first))
            assert digest == first_digest.image_digest
    finally:
        assert a.stop() == 0
        c.stop()
