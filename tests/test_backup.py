"""Backup repository and engine as a library, on a local directory backup
point, with real qcow2 volumes (qemu-img, qemu-nbd) and a real Ceph cluster."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from agent.errors import Cancelled, DataCorrupt
from agent.repo.backup import backup
from agent.repo.repository import Repository
from agent.repo.restore import restore
from agent.repo.verify import verify
from agent.stores.local import LocalStore
from agent.volumes.qcow2 import Qcow2Pool

from support.backups import CS, nid, restore_to_qcow2
from support.volumes import write

MiB = 1 << 20


@pytest.fixture
def env(short_tmp):
    pool = Qcow2Pool(nid(), str(short_tmp / "pool"), run_dir=str(short_tmp / "run"), allowed_roots=[str(short_tmp)])
    repo = Repository.init(LocalStore(str(short_tmp / "bp")), chunk_size=CS)
    return pool, repo, short_tmp


def test_full_incremental_restore_bit_exact(env):
    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 32 * MiB).uuid
    head = pool.head_path(vol)
    write(head, {0: os.urandom(3 * MiB), 10 * MiB: os.urandom(MiB), 20 * MiB: bytes(MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m1 = backup(pool, vol, s1, repo, name="full")
    assert m1.parent is None and m1.stats.chunks_read == 4
    assert m1.chunks.count("") == 28  # zero chunks are never stored
    write(head, {MiB + 5: b"changed" * 100, 25 * MiB: os.urandom(4096)}, tmp)
    s2 = nid()
    pool.create_snapshot(vol, s2, "s2")
    m2 = backup(pool, vol, s2, repo, parent=m1)
    assert m2.stats.chunks_read == 2 and not m2.fell_back  # only what the bitmaps report
    write(head, {10 * MiB: os.urandom(MiB)}, tmp)
    s3 = nid()
    pool.create_snapshot(vol, s3, "s3")
    m3 = backup(pool, vol, s3, repo, parent=m2)
    assert m3.stats.chunks_read == 1
    assert [m.backup_id for m in repo.manifests()] == [m1.backup_id, m2.backup_id, m3.backup_id]
    for m, snap in ((m1, s1), (m2, s2), (m3, s3)):
        new_vol, written = restore_to_qcow2(pool, repo, m, tmp)
        assert written == m.image_digest == pool.image_digest(vol, snap).image_digest
        assert pool.image_digest(new_vol, None).image_digest == m.image_digest
        cmp = subprocess.run(
            ["qemu-img", "compare", "-U", pool.snap_path(vol, snap), pool.head_path(new_vol)], capture_output=True
        )
        assert cmp.returncode == 0
        verify(repo, m, deep=True).check()
    # a fresh open of the repository finds everything again
    again = Repository.open(LocalStore(str(tmp / "bp")))
    verify(again, m3, deep=True).check()


def test_tracking_lost_falls_back_to_digests(env):
    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 16 * MiB).uuid
    head = pool.head_path(vol)
    write(head, {0: os.urandom(8 * MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m1 = backup(pool, vol, s1, repo)
    write(head, {3 * MiB: b"x" * 10}, tmp)
    s2 = nid()
    pool.create_snapshot(vol, s2, "s2")
    subprocess.run(["qemu-img", "bitmap", "--remove", pool.snap_path(vol, s2), "bf-dirty"], check=True)
    m2 = backup(pool, vol, s2, repo, parent=m1)
    assert m2.fell_back and m2.stats.chunks_read == 8
    assert m2.stats.new_chunks == 1  # only the changed chunk was written
    assert restore_to_qcow2(pool, repo, m2, tmp)[1] == pool.image_digest(vol, s2).image_digest


def test_verify_finds_injected_corruption(env):
    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 8 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(3 * MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m = backup(pool, vol, s1, repo)
    packs = [p for p in (tmp / "bp" / "packs").iterdir() if not p.name.endswith(".idx")]
    assert len(packs) == 1
    good = packs[0].read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # a flipped byte in chunk data
    packs[0].write_bytes(bytes(bad))

    def damage(deep=False):
        return verify(Repository.open(LocalStore(str(tmp / "bp"))), m, deep=deep).damage

    (d,) = damage()
    assert d.pack == f"packs/{packs[0].name}" and d.backup_uuids == [m.backup_id]
    assert d.reason in ("checksum mismatch", "compressed data is damaged")
    assert m.chunks[d.first_chunk_index] == d.chunk_id
    with pytest.raises(
        DataCorrupt, match=f"chunk {d.chunk_id[:16]} in packs/{packs[0].name} \\(position {d.first_chunk_index}\\)"
    ) as e:
        verify(Repository.open(LocalStore(str(tmp / "bp"))), m, deep=False).check()
    assert e.value.result.damage == [d]
    packs[0].write_bytes(good[: len(good) - 100])  # a truncated pack: its last chunk
    (d,) = damage()
    assert d.reason == "record is truncated" and d.first_chunk_index == 2
    idx = packs[0].with_name(packs[0].name + ".idx")
    saved_idx = idx.read_bytes()
    packs[0].write_bytes(good)
    entries = json.loads(saved_idx)
    gone = next(iter(entries))
    idx.write_text(json.dumps({k: v for k, v in entries.items() if k != gone}))  # a chunk missing from the index
    (d,) = damage()
    assert d.chunk_id == gone and d.reason == "in no pack index" and d.pack == ""
    idx.write_bytes(saved_idx)
    assert damage(deep=True) == []  # repaired: all good again
    packs[0].unlink()  # a missing pack: every chunk in it
    assert sorted(d.first_chunk_index for d in damage()) == [0, 1, 2]
    assert {d.reason for d in damage()} == {"its pack is missing"}
    manifest = tmp / "bp" / "manifests" / m.backup_id
    manifest.write_bytes(manifest.read_bytes()[:-10])  # a tampered manifest
    with pytest.raises(DataCorrupt, match=m.backup_id):
        Repository.open(LocalStore(str(tmp / "bp"))).manifest(m.backup_id)


def test_interrupted_backup_is_never_listed(env):
    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 16 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(8 * MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")

    class Stop:
        job_id, bandwidth_limit, n = "x", 0, 0

        def checkpoint(self):
            self.n += 1
            if self.n > 3:
                raise Cancelled("stopped half-way")

        def throttle(self, n):
            pass

        def progress(self, *a, **k):
            pass

    with pytest.raises(Cancelled):
        backup(pool, vol, s1, repo, ctx=Stop())
    assert repo.manifests() == []
    m = backup(pool, vol, s1, repo)  # and the next one succeeds
    verify(repo, m, deep=True).check()


def test_rbd_backup_restores_into_qcow2(env, ceph):
    import rbd

    pool, repo, tmp = env
    rp = ceph.rbd_pool()
    vol = rp.create_volume(nid(), "rbd-src", 16 * MiB).uuid
    try:
        with rp.ioctx() as io, rbd.Image(io, vol) as img:
            img.write(os.urandom(5 * MiB), 0)
        s1 = nid()
        rp.create_snapshot(vol, s1, "s1")
        m1 = backup(rp, vol, s1, repo)
        with rp.ioctx() as io, rbd.Image(io, vol) as img:
            img.write(b"y" * 100, 12 * MiB)
        s2 = nid()
        rp.create_snapshot(vol, s2, "s2")
        m2 = backup(rp, vol, s2, repo, parent=m1)
        assert m2.stats.chunks_read <= 4  # the touched 4 MiB object, in 1 MiB chunks
        for m, snap in ((m1, s1), (m2, s2)):
            _, written = restore_to_qcow2(pool, repo, m, tmp)
            assert written == rp.image_digest(vol, snap).image_digest
    finally:
        rp.delete_volume(vol, force=True)


def test_gc_is_refused_while_a_backup_runs_and_never_breaks_it(env):
    """The locking scheme: a backup holds the shared lock; gc needs the
    exclusive one and is refused while the backup runs; the backup completes
    and restores bit for bit; then gc runs and keeps it intact."""
    import threading

    from agent.errors import RepositoryLocked
    from agent.repo.gc import gc

    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 16 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(8 * MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    old = backup(pool, vol, s1, repo)
    repo.delete_backup(old.backup_id)  # its chunks are garbage now, and the next backup deduplicates to them
    halfway, go_on = threading.Event(), threading.Event()

    class Pause:
        job_id, bandwidth_limit, n = "x", 0, 0

        def checkpoint(self):
            self.n += 1
            if self.n == 4:
                halfway.set()
                go_on.wait(30)

        def throttle(self, n):
            pass

        def progress(self, *a, **k):
            pass

    result = {}
    t = threading.Thread(target=lambda: result.update(m=backup(pool, vol, s1, repo, ctx=Pause())))
    t.start()
    assert halfway.wait(30)
    other = Repository.open(LocalStore(str(tmp / "bp")))  # as another agent on the same backup point would
    with pytest.raises(RepositoryLocked, match="backup"):
        gc(other)
    go_on.set()
    t.join(30)
    m = result["m"]
    assert gc(other).chunks_removed == 0  # the new backup references the old chunks again
    again = Repository.open(LocalStore(str(tmp / "bp")))
    verify(again, m, deep=True).check()
    assert restore_to_qcow2(pool, again, m, tmp)[1] == m.image_digest


def test_stale_lock_of_a_dead_process_is_removed(env):
    import json
    import subprocess as sp

    from agent.repo.gc import gc
    from agent.stores.locks import EXCLUSIVE, RepoLock

    _, repo, tmp = env
    dead = sp.Popen(["true"])
    dead.wait()
    lock = RepoLock(repo.store, EXCLUSIVE, "gc")
    lock.record.pid = dead.pid  # a gc of an agent that was killed -9
    lock._write()
    gc(repo)  # not refused: the holder is gone
    assert repo.store.list("locks") == []
    live = RepoLock(repo.store, EXCLUSIVE, "gc").acquire()
    try:
        from agent.errors import RepositoryLocked

        with pytest.raises(RepositoryLocked, match="gc"):
            gc(repo)
        rec = json.loads(repo.store.get(live.name))
        assert rec["pid"] == os.getpid() and rec["mode"] == "exclusive"
    finally:
        live.release()


def test_large_chunks_restore_through_the_pool_target(short_tmp):
    """64 MiB chunks (the largest; more than one 32 MiB NBD request) back up
    and restore through the driver's restore target into a new qcow2 volume."""
    pool = Qcow2Pool(nid(), str(short_tmp / "pool"), run_dir=str(short_tmp / "run"), allowed_roots=[str(short_tmp)])
    repo = Repository.init(LocalStore(str(short_tmp / "bp")), chunk_size=64 * MiB)
    vol = pool.create_volume(nid(), "src", 80 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(40 * MiB), 70 * MiB: os.urandom(MiB)}, short_tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m = backup(pool, vol, s1, repo)
    target = pool.open_restore_target(nid(), "restored", m.size, "job")
    digest = restore(repo, m, target.write)
    info = target.commit()
    assert digest == m.image_digest == pool.image_digest(info.uuid, None).image_digest


def test_packs_commit_in_the_background_and_all_are_durable(env):
    pool, repo, tmp = env
    repo.store.pack_target = 2 * MiB  # a dozen full packs, committed while the next fills
    vol = pool.create_volume(nid(), "src", 32 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(24 * MiB)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m = backup(pool, vol, s1, repo)
    assert repo._committer is None and not repo._committing  # nothing left pending
    again = Repository.open(LocalStore(str(tmp / "bp")))  # what is on disk, not in memory
    assert len(again.stats().__dict__) and again.stats().packs >= 10
    new_vol, written = restore_to_qcow2(pool, again, m, tmp)
    assert written == m.image_digest == pool.image_digest(vol, s1).image_digest
    verify(again, m, deep=True).check()


def test_a_full_backup_point_fails_the_backup_and_lists_nothing(short_tmp):
    from agent.errors import BlockferryError

    from support.smallfs import mount_small_fs, unmount_small_fs

    mnt = short_tmp / "small"
    mnt.mkdir()
    loop = mount_small_fs(short_tmp / "small.img", mnt, 16 * MiB)
    try:
        pool = Qcow2Pool(nid(), str(short_tmp / "pool"), run_dir=str(short_tmp / "run"), allowed_roots=[str(short_tmp)])
        store = LocalStore(str(mnt / "bp"))
        store.pack_target = 2 * MiB
        repo = Repository.init(store, chunk_size=CS, compression="none")
        vol = pool.create_volume(nid(), "src", 32 * MiB).uuid
        write(pool.head_path(vol), {0: os.urandom(32 * MiB)}, short_tmp)
        s1 = nid()
        pool.create_snapshot(vol, s1, "s1")
        with pytest.raises(BlockferryError) as e:
            backup(pool, vol, s1, repo)
        assert e.value.code == "NO_SPACE", e.value
        assert repo.manifests() == [] and Repository.open(LocalStore(str(mnt / "bp"))).manifests() == []
        assert repo._committer is None and not repo._committing  # the committer thread ended
    finally:
        unmount_small_fs(mnt, loop)


def _read_digest(reader, extents=None) -> str:
    """bf-image-sha256-v1 of a snapshot, through one of our readers."""
    from agent.extents import Extent
    from agent.repo.format import ImageDigest, block_digests

    image = ImageDigest()
    reader.read(
        extents or [Extent(0, reader.size())], lambda off, view: image.add(block_digests(view), len(view)), 4 * MiB
    )
    return image.hexdigest()


def test_snapshots_are_read_from_their_layer_files_as_qemu_reads_them(env):
    """The mapped reader (pread at the offsets qemu-img map gives) returns
    what qemu-nbd does, over a chain with a raw base, zero clusters and
    holes; an ancestor deleted (its layer unlinked, the child rebased) in the
    middle of a read changes nothing."""
    from agent.volumes.qcow2.direct import MappedSnapshotReader

    pool, repo, tmp = env
    raw = tmp / "base.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(5 * MiB + 4096))  # ends inside a chunk; the volume is larger
    vol = pool.create_volume(nid(), "src", 24 * MiB, backing_file=str(raw)).uuid
    head = pool.head_path(vol)
    write(head, {MiB: os.urandom(MiB + 512), 9 * MiB: os.urandom(3 * MiB)}, tmp, zeros={2 * MiB + 4096: 64 << 10})
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    write(head, {3 * MiB: os.urandom(2 * MiB), 20 * MiB: os.urandom(MiB)}, tmp, zeros={10 * MiB: MiB})
    s2 = nid()
    pool.create_snapshot(vol, s2, "s2")
    want = {s: pool.image_digest(vol, s).image_digest for s in (s1, s2)}  # through qemu-nbd
    for s in (s1, s2):
        with pool.open_reader(vol, s) as r:
            assert isinstance(r, MappedSnapshotReader)
            assert _read_digest(r) == want[s]
            data = [e for e in r.extents() if not e.zero]
            assert sum(e.length for e in data) < 24 * MiB  # holes are reported, not read
    with pool.open_reader(vol, s2) as r:
        seen = []

        def on_data(off, view):
            if not seen:
                pool.delete_snapshot(vol, s1)  # rewrites s2's layer, unlinks s1's
            seen.append(block_digests(view))

        from agent.extents import Extent
        from agent.repo.format import ImageDigest, block_digests

        r.read([Extent(0, r.size())], on_data, 4 * MiB)
    image = ImageDigest()
    for d in seen:
        image.add(d, 4 * MiB)
    assert image.hexdigest() == want[s2] == pool.image_digest(vol, s2).image_digest


def test_compressed_clusters_are_read_through_qemu_nbd(env):
    from agent.volumes.nbd import NbdSnapshotReader

    pool, repo, tmp = env
    raw = tmp / "src.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(2 * MiB) + b"text " * (MiB // 5))
    packed = tmp / "packed.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(packed)], check=True)
    vol = pool.create_volume(nid(), "src", 8 * MiB, backing_file=str(packed)).uuid
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    with pool.open_reader(vol, s1) as r:
        assert isinstance(r, NbdSnapshotReader)  # compressed clusters have no raw host offset
        assert _read_digest(r) == pool.image_digest(vol, s1).image_digest
    m = backup(pool, vol, s1, repo)
    _, written = restore_to_qcow2(pool, repo, m, tmp)
    assert written == m.image_digest == pool.image_digest(vol, s1).image_digest


def test_restore_writes_straight_into_preallocated_clusters(env):
    """pool.open_restore_target: a clean qcow2 (qemu-img check), the same
    content as the snapshot (qemu-img compare), and a later backup of it
    reads only the chunks that hold data."""
    from agent.volumes.qcow2.direct import DirectRestoreTarget

    pool, repo, tmp = env
    vol = pool.create_volume(nid(), "src", 40 * MiB).uuid
    write(
        pool.head_path(vol),
        {0: os.urandom(2 * MiB + 4096), 17 * MiB: os.urandom(MiB), 30 * MiB: bytes(200 << 10) + os.urandom(100 << 10)},
        tmp,
    )
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m = backup(pool, vol, s1, repo)
    new = nid()
    target = pool.open_restore_target(new, "restored", m.size, "job-1")
    assert isinstance(target, DirectRestoreTarget)
    assert restore(repo, m, target.write, concurrent=True) == m.image_digest  # workers write in any order
    info = target.commit()
    assert info.uuid == new and pool.image_digest(new, None).image_digest == m.image_digest
    head = pool.head_path(new)
    assert subprocess.run(["qemu-img", "compare", "-U", pool.snap_path(vol, s1), head]).returncode == 0
    check = json.loads(
        subprocess.run(
            ["qemu-img", "check", "-U", "--output=json", head], check=True, capture_output=True, text=True
        ).stdout
    )
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0
    s2 = nid()
    pool.create_snapshot(new, s2, "again")
    again = backup(pool, new, s2, repo)
    assert again.stats.chunks_read == m.stats.chunks_read == 5
    assert again.chunks == m.chunks  # same content, same chunks: all deduplicated


def test_an_aborted_restore_leaves_no_volume(env):
    pool, repo, tmp = env
    new = nid()
    target = pool.open_restore_target(new, "restored", 8 * MiB, "job-2")
    target.write(0, os.urandom(MiB))
    target.abort()
    assert not pool.volume_exists(new)
    assert [n for n in os.listdir(os.path.join(pool.base, "volume")) if new in n] == []


def test_a_pack_committed_while_another_backup_refreshes_stays_indexed(env):
    """refresh() lists the packs, then forgets the ones gone from the list;
    a pack this process commits in between (another backup's) is not gone."""
    from agent.repo.format import block_digests

    pool, repo, tmp = env
    data = os.urandom(CS)
    digests = block_digests(data)
    cid = repo.sealer.chunk_id(digests)
    listing = repo.store.list

    def list_then_commit(prefix):
        out = listing(prefix)
        repo.add(cid, repo.encode(cid, data), len(data))  # another backup commits its pack right now
        repo.flush()
        return out

    repo.store.list = list_then_commit
    repo.refresh()
    repo.store.list = listing
    assert repo.has(cid) and repo.location(cid) is not None
    assert repo.get(cid)[0] == data


def test_large_volumes_restore_through_qemu_nbd(env, monkeypatch):
    """Above DIRECT_RESTORE_MAX (1 TiB: preallocated metadata would cost too
    much) a restore goes through a writable qemu-nbd: the same content."""
    import agent.volumes.qcow2.driver as qcow2
    from agent.volumes.qcow2.driver import Qcow2RestoreTarget

    pool, repo, tmp = env
    monkeypatch.setattr(qcow2, "DIRECT_RESTORE_MAX", 0)  # this small volume stands for a large one
    vol = pool.create_volume(nid(), "src", 16 * MiB).uuid
    write(pool.head_path(vol), {0: os.urandom(2 * MiB), 9 * MiB: bytes(100) + os.urandom(5000)}, tmp)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    m = backup(pool, vol, s1, repo)
    target = pool.open_restore_target(nid(), "restored", m.size, "job-nbd")
    assert isinstance(target, Qcow2RestoreTarget)
    assert restore(repo, m, target.write) == m.image_digest
    info = target.commit()
    assert pool.image_digest(info.uuid, None).image_digest == m.image_digest == pool.image_digest(vol, s1).image_digest
    assert (
        subprocess.run(["qemu-img", "compare", "-U", pool.snap_path(vol, s1), pool.head_path(info.uuid)]).returncode
        == 0
    )
