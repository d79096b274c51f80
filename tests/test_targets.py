"""Every backup point type runs the same backup engine suite against a real
server: full, incremental, restore bit for bit, delete and GC, verify; then
each type's own failures (server stopped mid-backup, a full export, bad
credentials) and a read-back of what we wrote with an independent tool."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import pytest

from agent.errors import BackupLocked, NoSpace, NotFound, TargetUnreachable, WrongPassword
from agent.repo import holds
from agent.repo.backup import backup
from agent.repo.gc import gc
from agent.repo.repository import Repository
from agent.repo.verify import verify

from support.backups import CS, nid, restore_to_qcow2
from support.stores import DiskTarget, LocalTarget, NfsTarget, S3Target, SmbTarget, Target, snapshot
from support.volumes import MiB, write


@pytest.fixture(params=["local", "nfs", "smb", "disk", "iscsi", "s3"])
def target(request, short_tmp):
    if request.param == "local":
        return LocalTarget(short_tmp / "bp")
    if request.param == "s3":
        return S3Target(request.getfixturevalue("rgw"), short_tmp)
    if request.param == "iscsi":
        return request.getfixturevalue("iscsi_lun")(chap=True)
    if request.param == "disk":
        return DiskTarget(request.getfixturevalue("loop")())
    if request.param == "smb":
        return SmbTarget(request.getfixturevalue("smb_server"), short_tmp)
    return NfsTarget(request.getfixturevalue("nfs_server"))


def test_engine_suite(target, pool, short_tmp):
    sub = f"repo-{uuid.uuid4().hex[:8]}"
    repo = Repository.init(target.make(sub), chunk_size=CS, password="engine-suite-pw")
    vol = pool.create_volume(nid(), "src", 32 * MiB).uuid
    head = pool.head_path(vol)
    write(head, {0: os.urandom(3 * MiB), 10 * MiB: os.urandom(MiB), 20 * MiB: bytes(MiB)}, short_tmp)
    s1 = snapshot(pool, vol)
    m1 = backup(pool, vol, s1, repo, name="full")
    write(head, {MiB + 5: b"changed" * 100, 25 * MiB: os.urandom(4096)}, short_tmp)
    s2 = snapshot(pool, vol)
    m2 = backup(pool, vol, s2, repo, parent=m1)
    assert m2.stats.chunks_read == 2 and not m2.fell_back
    # the third backup overwrites everything only the second holds, so
    # deleting the second leaves its pack all garbage
    write(head, {10 * MiB: os.urandom(MiB), MiB + 5: b"third" * 100, 25 * MiB: os.urandom(4096)}, short_tmp)
    s3 = snapshot(pool, vol)
    m3 = backup(pool, vol, s3, repo, parent=m2)
    assert m3.stats.chunks_read == 3
    expected = {m.backup_id: pool.image_digest(vol, s).image_digest for m, s in ((m1, s1), (m2, s2), (m3, s3))}
    for m, snap in ((m1, s1), (m2, s2), (m3, s3)):
        new_vol, written = restore_to_qcow2(pool, repo, m, short_tmp)
        assert written == m.image_digest == expected[m.backup_id]
        assert (
            subprocess.run(
                ["qemu-img", "compare", "-U", pool.snap_path(vol, snap), pool.head_path(new_vol)], capture_output=True
            ).returncode
            == 0
        )
    # what we wrote reads back the same through another client
    assert target.read_back(sub, "config") == bytes(repo.store.get("config"))
    manifest_names = repo.store.list("manifests")
    assert manifest_names and target.read_back(sub, manifest_names[0]) == bytes(repo.store.get(manifest_names[0]))
    # one write of an odd length larger than a WRITE the server takes (NFS: 1 MiB), read back by another client
    big = os.urandom(5 * MiB + 123)
    w = repo.store.open_writer("packs/big-test")
    w.write(big)
    w.commit()
    assert target.read_back(sub, "packs/big-test") == big
    repo.store.delete("packs/big-test")
    # a read into the caller's buffer (a restore's recycled ones): the same bytes, short at the object's end
    config = bytes(repo.store.get("config"))
    buf = bytearray(len(config) + 100)
    assert repo.store.read_into("config", 3, buf) == len(config) - 3 and buf[: len(config) - 3] == config[3:]
    assert bytes(repo.store.get("config", 3, 5)) == config[3:8]
    with pytest.raises(NotFound):
        repo.store.read_into("manifests/missing", 0, buf)
    # a lock (immutable.md) on every type: the delete refused, the lock object read back by another client
    lock = holds.extend(repo, m1.backup_id, time.time() + 3600)
    with pytest.raises(BackupLocked):
        holds.check_delete(repo, m1.backup_id)
    name = f"holds/{m1.backup_id}.{int(lock.until)}"
    assert repo.store.list("holds") == [name] and target.read_back(sub, name) == bytes(repo.store.get(name))
    # delete the middle backup, collect garbage: the others still restore bit for bit
    repo.delete_backup(m2.backup_id)
    result = gc(repo)
    assert result.packs_deleted == 1 and result.chunks_removed == 2 and result.bytes_freed > 0
    assert result.packs_locked >= 1  # m1's, kept as they are
    with pytest.raises(WrongPassword):
        Repository.open(target.make(sub), password="not-it")
    fresh = Repository.open(target.make(sub), password="engine-suite-pw")
    assert [m.backup_id for m in fresh.manifests()] == [m1.backup_id, m3.backup_id]
    for m in (m1, m3):
        # deep: the image digest too
        assert verify(fresh, m, deep=True).check().chunks_checked == len(m.chunks) - m.chunks.count("")
        assert restore_to_qcow2(pool, fresh, m, short_tmp)[1] == expected[m.backup_id]
    stats = fresh.store.stats()
    assert stats.total_bytes > 0 and stats.available_bytes > 0


def outage_then_retry(server, t: Target, sub: str, pool, short_tmp, match: str, **store) -> None:
    """The server stops in the middle of a backup: the job fails with
    TARGET_UNREACHABLE naming the backup point; once the server is back,
    nothing half-done is listed, and a new backup (through the same store,
    which connects again by itself) verifies deeply."""
    repo = Repository.init(t.make(sub, **(store or {"timeout": 2.0})), chunk_size=CS)
    vol = pool.create_volume(nid(), "src", 48 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(40 * MiB)}, short_tmp)
    s1 = snapshot(pool, vol)

    class StopServer:
        job_id, bandwidth_limit, n = "x", 0, 0

        def checkpoint(self):
            self.n += 1
            if self.n == 6:
                server.stop()

        def throttle(self, n):
            pass

        def progress(self, *a, **k):
            pass

    try:
        with pytest.raises(TargetUnreachable, match=match):
            backup(pool, vol, s1, repo, ctx=StopServer())
    finally:
        server.start()
    again = Repository.open(t.make(sub))
    assert again.manifests() == []  # nothing half-visible
    m = backup(pool, vol, s1, again)
    t.forget()
    verify(Repository.open(t.make(sub)), m, deep=True).check()  # deep: raises unless the image digest matches


def test_nfs_server_stopped_mid_backup_fails_cleanly_then_retry_succeeds(nfs_server, pool, short_tmp):
    outage_then_retry(
        nfs_server,
        NfsTarget(nfs_server),
        f"outage-{uuid.uuid4().hex[:8]}",
        pool,
        short_tmp,
        r"backup point nfs://127\.0\.0\.1",
    )


def test_nfs_full_export_fails_cleanly(nfs_server, pool, short_tmp):
    t = NfsTarget(nfs_server)
    sub = f"full-{uuid.uuid4().hex[:8]}"
    repo = Repository.init(t.make(sub, export=nfs_server.small), chunk_size=CS, compression="none")
    vol = pool.create_volume(nid(), "src", 96 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(80 * MiB)}, short_tmp)  # more than the 48 MiB export holds
    s1 = snapshot(pool, vol)
    with pytest.raises(NoSpace, match="backup point nfs://.*No space"):
        backup(pool, vol, s1, repo)
    fresh = Repository.open(t.make(sub, export=nfs_server.small))
    assert fresh.manifests() == []
    leftovers = [n for n in os.listdir(nfs_server.small / sub / "packs") if n.startswith(".part-")]
    assert leftovers == []  # the writer removed its partial pack


def test_nfs_unreachable_server_and_bad_paths(nfs_server):
    from agent.errors import InvalidArgument
    from agent.stores.nfs import NfsStore

    from support.cephcluster import free_port

    port = free_port()
    with pytest.raises(TargetUnreachable, match="backup point nfs://127.0.0.1/nope"):
        NfsStore("127.0.0.1", "/nope", "x", nfs_port=port, mount_port=port, timeout=2.0)
    with pytest.raises(TargetUnreachable, match="mount failed"):
        NfsStore(
            "127.0.0.1",
            "/not/exported",
            "x",
            nfs_port=nfs_server.nfs_port,
            mount_port=nfs_server.mount_port,
            timeout=2.0,
        )
    for bad in ("../escape", "a/../../b", "/abs"):
        with pytest.raises(InvalidArgument, match="sub_dir"):
            NfsStore(
                "127.0.0.1", str(nfs_server.export), bad, nfs_port=nfs_server.nfs_port, mount_port=nfs_server.mount_port
            )
    store = NfsTarget(nfs_server).make("names")
    with pytest.raises(NotFound):
        store.get("missing")
    from agent.errors import InvalidArgument as IA

    with pytest.raises(IA):
        store.get("../../etc/passwd")


def test_nfs_through_the_portmapper(nfs_server):
    """No ports configured: libnfs asks rpcbind, as on a stock NFS server."""
    from agent.stores.nfs import NfsStore

    store = NfsStore("127.0.0.1", str(nfs_server.export), "pmap", timeout=5.0)
    store.publish("hello", b"world")
    assert (nfs_server.export / "pmap" / "hello").read_bytes() == b"world"
    out = subprocess.run(
        ["nfs-ls", nfs_server.url(nfs_server.export, "pmap")], capture_output=True, text=True, check=True
    ).stdout
    assert "hello" in out


def test_smb_server_stopped_mid_backup_fails_cleanly_then_retry_succeeds(smb_server, pool, short_tmp):
    outage_then_retry(
        smb_server,
        SmbTarget(smb_server, short_tmp),
        f"outage-{uuid.uuid4().hex[:8]}",
        pool,
        short_tmp,
        r"backup point smb://127\.0\.0\.1/backups",
    )


def test_smb_full_share_fails_cleanly(smb_server, pool, short_tmp):
    t = SmbTarget(smb_server, short_tmp)
    sub = f"full-{uuid.uuid4().hex[:8]}"
    repo = Repository.init(t.make(sub, share="small"), chunk_size=CS, compression="none")
    vol = pool.create_volume(nid(), "src", 96 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(80 * MiB)}, short_tmp)
    s1 = snapshot(pool, vol)
    with pytest.raises(NoSpace, match="backup point smb://.*space"):
        backup(pool, vol, s1, repo)
    assert Repository.open(t.make(sub, share="small")).manifests() == []
    assert [n for n in os.listdir(smb_server.root / "small" / sub / "packs") if n.startswith(".part-")] == []


def test_smb_wrong_password_is_a_clear_error_without_the_secret(smb_server, short_tmp):
    from agent.errors import AuthFailed

    t = SmbTarget(smb_server, short_tmp)
    with pytest.raises(AuthFailed, match="refused user") as e:
        t.make("x", password="not-the-password-4711")
    assert "4711" not in str(e.value)
    store = t.make("enc", encrypt=True)  # SMB3 encryption on
    store.publish("hello", b"encrypted transport")
    assert t.read_back("enc", "hello") == b"encrypted transport"


def test_smb_zero_copy_writes_match_smbprotocols_and_the_server_checks_their_signatures(
    smb_server, short_tmp, monkeypatch
):
    """agent/stores/smb_write.py packs and signs WRITEs itself: the server
    gets the same bytes as through smbprotocol's own path, and refuses a
    WRITE whose signature is wrong (so it really checks ours)."""
    from agent.errors import BlockferryError
    from agent.stores import smb_write

    t = SmbTarget(smb_server, short_tmp)
    sent = []
    real = smb_write.send_write
    monkeypatch.setattr(
        smb_write, "send_write", lambda fd, data, off, cr: sent.append(len(data)) or real(fd, data, off, cr)
    )
    pieces = [os.urandom(n) for n in (1000, 70_000, 4 * MiB, 9 * MiB + 123, 200_000, 5)]
    want = b"".join(pieces)
    for zero_copy in (True, False):
        store = t.make(f"zc-{zero_copy}")
        store.zero_copy = zero_copy
        w = store.open_writer("obj")
        for p in pieces:
            w.write(p)
        w.commit()
        assert t.read_back(f"zc-{zero_copy}", "obj") == want
        assert store.get("obj") == want
        store.close()
        if zero_copy:
            assert sum(sent) == len(want) and len(sent) >= 3, sent
            sent.clear()
    assert sent == []  # smbprotocol's own path did the second one

    # three writers on one session from three threads (jobs sharing a backup point): the
    # calls are serialized, the credits go round, and each object holds exactly its own bytes
    import threading

    store = t.make("zc-two")
    data = {name: os.urandom(24 * MiB + 4321) for name in ("a", "b", "c")}
    errors = []

    def put(name):
        try:
            w = store.open_writer(name)
            view = memoryview(data[name])
            for off in range(0, len(view), 3 * MiB):
                w.write(view[off : off + 3 * MiB])
            w.commit()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=put, args=(n,)) for n in data]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    for name, want in data.items():
        assert t.read_back("zc-two", name) == want
    store.close()

    store = t.make("zc-bad")
    monkeypatch.setattr(smb_write, "signature", lambda *a: b"\x01" * 16)
    w = store.open_writer("obj")
    with pytest.raises(BlockferryError, match="backup point smb://127.0.0.1/backups/zc-bad") as e:
        w.write(os.urandom(4 * MiB))
        w.commit()
    assert "ACCESS_DENIED" in e.value.message  # smbd: "Bad SMB2 signature"
    monkeypatch.undo()
    assert "obj" not in t.make("zc-bad").list("")


# ---- raw LUN repositories (disk/fc here; iSCSI uses the same layout) ----


def test_lun_blank_needs_format_and_foreign_data_is_never_touched(loop):
    from agent.errors import FailedPrecondition
    from agent.stores.blockdev import LocalBlockDevice
    from agent.stores.lun import LunStore

    blank = loop(64 * MiB, "blank.img")
    dev = LocalBlockDevice(blank.dev)
    with pytest.raises(FailedPrecondition, match="blank; set format_lun"):
        LunStore(dev)
    assert not any(blank.file.read_bytes())  # nothing written
    dev.close()
    foreign = loop(64 * MiB, "foreign.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", foreign.dev], check=True)
    before = foreign.file.read_bytes()
    dev = LocalBlockDevice(foreign.dev)
    with pytest.raises(FailedPrecondition, match="holds other data .* never touched"):
        LunStore(dev, format_lun=True)
    dev.close()
    assert foreign.file.read_bytes() == before


def _lun_store(lo, **kw):
    from agent.stores.blockdev import LocalBlockDevice
    from agent.stores.lun import LunStore

    return LunStore(LocalBlockDevice(lo.dev), **kw)


def test_lun_torn_superblock_or_catalog_falls_back_a_generation(loop):
    from agent.stores.lun import CATALOG_OFFSET, SB_OFFSETS

    lo = loop(64 * MiB)
    st = _lun_store(lo, format_lun=True)
    st.publish("a", os.urandom(100_000))
    first = bytes(st.get("a"))
    st.publish("b", b"second")
    gen, slot, cat_size = st.sb.gen, st.sb.slot, st.sb.cat_size
    st.close()
    # a torn write of the newest superblock: its checksum fails
    img = bytearray(lo.file.read_bytes())
    saved = bytes(img)
    img[SB_OFFSETS[gen % 2] + 40] ^= 0xFF
    lo.file.write_bytes(img)
    st = _lun_store(lo)
    assert st.sb.gen == gen - 1 and st.list("") == ["a"] and bytes(st.get("a")) == first
    st.close()
    # a torn write of the newest catalog: its superblock is fine, the catalog is not
    img = bytearray(saved)
    img[CATALOG_OFFSET + slot * cat_size + 10] ^= 0xFF
    lo.file.write_bytes(img)
    st = _lun_store(lo)
    assert st.sb.gen == gen - 1 and st.list("") == ["a"]
    st.close()
    lo.file.write_bytes(saved)
    st = _lun_store(lo)
    assert st.sb.gen == gen and st.list("") == ["a", "b"]
    st.close()


def test_lun_written_by_another_host_is_refused(loop, short_tmp):
    from agent.errors import FailedPrecondition

    lo = loop(64 * MiB)
    a = _lun_store(lo, format_lun=True)
    a.publish("x", b"1")
    # another "host": a second loop device over the same file
    other = subprocess.run(
        ["losetup", "-f", "--show", str(lo.file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        from agent.stores.blockdev import LocalBlockDevice
        from agent.stores.lun import LunStore

        b = LunStore(LocalBlockDevice(other))
        b.publish("y", b"2")
        b.close()
        with pytest.raises(FailedPrecondition, match="another host wrote this LUN"):
            a.publish("z", b"3")
        a.close()
        c = _lun_store(lo)
        assert c.list("") == ["x", "y"]
        c.close()
    finally:
        subprocess.run(["losetup", "-d", other], check=False)


def test_lun_writers_commit_while_others_write_and_every_byte_lands(loop):
    """Device writes run in the writers' I/O threads (io_depth at once) and
    one writer commits while others write, as the backup's background pack
    commits do: after reopening the LUN every object reads back bit for bit,
    uncommitted and aborted writers leave nothing, and no space leaks."""
    import hashlib
    import threading

    lo = loop(256 * MiB)
    st = _lun_store(lo, format_lun=True)
    assert st.concurrent_writers and st.dev.io_depth > 1
    free0 = st.stats().available_bytes
    seg = st.dev.io_size
    sizes = {"a": 5 * seg + 12345, "b": 3 * seg, "c": seg // 2 + 7, "d": 9 * seg + 4096}
    data = {n: os.urandom(k) for n, k in sizes.items()}
    errors = []

    def write_and_commit(name: str, piece: int) -> None:
        try:
            w = st.open_writer(name)
            for off in range(0, len(data[name]), piece):
                w.write(data[name][off : off + piece])
            w.commit()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [
        threading.Thread(target=write_and_commit, args=(n, p))
        for n, p in (("a", 1 << 20), ("b", 3 << 20), ("c", 4096), ("d", (1 << 20) + 512))
    ]
    for t in threads:
        t.start()
    dropped = st.open_writer("dropped")  # written meanwhile, then given up
    dropped.write(os.urandom(3 * seg))
    for t in threads:
        t.join()
    dropped.abort()
    assert errors == []
    st.close()
    st = _lun_store(lo)
    assert st.list("") == ["a", "b", "c", "d"]
    for name, blob in data.items():
        assert hashlib.sha256(bytes(st.get(name))).digest() == hashlib.sha256(blob).digest(), name
    used = sum((k + (64 << 10) - 1) // (64 << 10) * (64 << 10) for k in sizes.values())
    assert free0 - st.stats().available_bytes == used  # the dropped writer's space came back
    for name in data:
        st.delete(name)
    assert st.stats().available_bytes == free0
    st.close()


def test_lun_paced_flushes_run_while_an_object_is_written(iscsi_lun):
    """With pace_every set (iSCSI: the target caches writes), the device is
    flushed in the background while a large object is written, before its
    commit; the object reads back whole (through the target's backing file)."""
    import hashlib

    t = iscsi_lun(160 * MiB)
    st = t.make("")
    assert st.dev.pace_every == 64 << 20
    flushes = []
    real_flush = st.dev.flush
    st.dev.flush = lambda: (flushes.append(1), real_flush())  # counts, then the real SYNCHRONIZE CACHE
    blob = os.urandom(100 * MiB)
    w = st.open_writer("big")
    for off in range(0, len(blob), 4 * MiB):
        w.write(blob[off : off + 4 * MiB])
    deadline = time.monotonic() + 10
    while not flushes and time.monotonic() < deadline:  # the background flush after the first 64 MiB
        time.sleep(0.01)
    assert flushes, "no background flush before the commit"
    w.commit()
    assert hashlib.sha256(t.read_back("", "big")).digest() == hashlib.sha256(blob).digest()
    t.forget()


def test_lun_full_fails_cleanly_and_space_comes_back(loop, pool, short_tmp):
    lo = loop(40 * MiB)
    t = DiskTarget(lo)
    repo = Repository.init(t.make(""), chunk_size=CS, compression="none")
    vol = pool.create_volume(nid(), "src", 96 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(80 * MiB)}, short_tmp)
    s1 = snapshot(pool, vol)
    free_before = repo.store.stats().available_bytes
    with pytest.raises(NoSpace, match="the LUN is full"):
        backup(pool, vol, s1, repo)
    assert repo.store.stats().available_bytes == free_before  # the aborted writers gave their space back
    assert Repository.open(t.make("")).manifests() == []


# ---- iSCSI ----


def test_iscsi_discovery_lists_targets_and_lun_sizes(tgt_server, iscsi_lun):
    from agent.stores.iscsi import discover

    t = iscsi_lun(96 * MiB)
    found = {d.iqn: d for d in discover("127.0.0.1", tgt_server.port)}
    assert t.lun.iqn in found
    assert [(x.lun, x.size) for x in found[t.lun.iqn].luns] == [(1, 96 * MiB)]
    locked = iscsi_lun(32 * MiB, chap=True)
    found = {d.iqn: d for d in discover("127.0.0.1", tgt_server.port)}
    assert found[locked.lun.iqn].state == "auth_failed" and found[locked.lun.iqn].luns == []
    found = {d.iqn: d for d in discover("127.0.0.1", tgt_server.port, user=locked.lun.user, secret=locked.lun.secret)}
    assert [(x.lun, x.size) for x in found[locked.lun.iqn].luns] == [(1, 32 * MiB)]
    # the same, seen by libiscsi's own tools
    url = f"iscsi://127.0.0.1:{tgt_server.port}/{t.lun.iqn}/1"
    cap = subprocess.run(["iscsi-readcapacity16", url], capture_output=True, text=True, check=True).stdout
    assert f"Totalsize:{96 * MiB}" in cap.replace(" ", "")
    inq = subprocess.run(["iscsi-inq", url], capture_output=True, text=True, check=True).stdout
    assert "Peripheral Device Type" in inq or "Direct Access" in inq


def test_iscsi_chap_wrong_or_missing_secret_is_a_clear_error(iscsi_lun):
    from agent.errors import AuthFailed
    from agent.stores.iscsi import IscsiBlockDevice

    t = iscsi_lun(64 * MiB, chap=True)
    with pytest.raises(AuthFailed, match="refused the CHAP credentials") as e:
        t.device(secret="wrong-secret-0815")
    assert "0815" not in str(e.value) and t.lun.secret not in str(e.value)
    with pytest.raises(AuthFailed):
        IscsiBlockDevice("127.0.0.1", t.lun.iqn, 1, port=t.srv.port, timeout=5)  # no CHAP at all
    dev = t.device()
    assert dev.size == 64 * MiB
    dev.close()


def test_iscsi_second_data_session_takes_a_call_while_the_first_is_busy(iscsi_lun):
    """Two calls at once go out on two sessions (a session serves one call
    at a time); every byte lands in the target's backing file, and a
    session that breaks is replaced by a new login."""
    from concurrent.futures import ThreadPoolExecutor

    t = iscsi_lun(160 * MiB, chap=True)
    dev = t.device()
    try:
        busy = dev._checkout()  # the first session is in a call
        first = os.urandom(4 * MiB)
        dev.write(0, first)  # so this one logs in a second session
        assert dev._open == 2
        dev._checkin(busy)
        pieces = {(1 + k) * 16 * MiB: os.urandom(16 * MiB) for k in range(8)}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda kv: dev.write(*kv), pieces.items()))
        assert dev._open == 2  # never more than io_depth
        dev.flush()
        assert len(t.srv.connections(t.lun)) == 3  # as the target sees it: two data sessions and the flush's
        # broken sessions (closed by the target): the next calls log in anew
        t.srv.drop_connections(t.lun)
        last = os.urandom(MiB)
        dev.write(150 * MiB, last)
        dev.flush()
        assert bytes(dev.read(150 * MiB, MiB)) == last
    finally:
        dev.close()
    with open(t.lun.file, "rb") as f:
        assert f.read(len(first)) == first
        for off, data in {**pieces, 150 * MiB: last}.items():
            f.seek(off)
            assert f.read(len(data)) == data


def test_iscsi_target_stopped_mid_backup_fails_cleanly_then_retry_succeeds(tgt_server, iscsi_lun, pool, short_tmp):
    outage_then_retry(tgt_server, iscsi_lun(256 * MiB), "", pool, short_tmp, "iscsi://127.0.0.1")


def test_iscsi_lun_full_fails_cleanly(iscsi_lun, pool, short_tmp):
    t = iscsi_lun(40 * MiB)
    repo = Repository.init(t.make(""), chunk_size=CS, compression="none")
    vol = pool.create_volume(nid(), "src", 96 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(80 * MiB)}, short_tmp)
    s1 = snapshot(pool, vol)
    with pytest.raises(NoSpace, match="the LUN is full"):
        backup(pool, vol, s1, repo)
    t.forget()
    assert Repository.open(t.make("")).manifests() == []


def test_s3_gateway_stopped_mid_backup_fails_cleanly_then_retry_succeeds(rgw, pool, short_tmp):
    outage_then_retry(
        rgw,
        S3Target(rgw, short_tmp),
        f"outage-{uuid.uuid4().hex[:8]}",
        pool,
        short_tmp,
        r"backup point http://127\.0\.0\.1",
        timeout=2.0,
        max_attempts=2,
    )


def test_s3_gateway_restarted_mid_stream_the_backup_goes_on(rgw, pool, short_tmp):
    """The gateway goes away for a second while packs stream: the store's
    retries (with backoff) carry the backup through, and it verifies."""
    t = S3Target(rgw, short_tmp)
    sub = f"restart-{uuid.uuid4().hex[:8]}"
    repo = Repository.init(t.make(sub), chunk_size=CS)
    vol = pool.create_volume(nid(), "src", 48 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(40 * MiB)}, short_tmp)
    s1 = snapshot(pool, vol)

    class Restart:
        job_id, bandwidth_limit, n = "x", 0, 0

        def checkpoint(self):
            self.n += 1
            if self.n == 6:
                rgw.stop()
                threading.Timer(1.0, rgw.start).start()

        def throttle(self, n):
            pass

        def progress(self, *a, **k):
            pass

    ctx = Restart()
    m = backup(pool, vol, s1, repo, ctx=ctx)
    assert ctx.n >= 6 and rgw.proc is not None
    verify(Repository.open(t.make(sub)), m, deep=True).check()
    assert restore_to_qcow2(pool, Repository.open(t.make(sub)), m, short_tmp)[1] == m.image_digest
