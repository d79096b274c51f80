"""Volumes on a shared LUN pool (qcow2 layers in slices), through real
agents on one loop device: every operation a directory pool's volumes have,
checked by digests and qemu-img compare; a second agent on the same LUN
reads what the owner wrote, is refused changes while the owner lives, and
takes over after the owner is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.errors import FailedPrecondition, HasDependents, TargetUnreachable
from agent.stores.blockdev import LocalBlockDevice
from agent.volumes.lun.table import PoolLun, SliceTable

from support.backups import OK, Bk, three_generations
from support.volumes import MiB, new_id, ref_digest_of, rpc_error

LUN_POOL = "5d3c2b1a-0f9e-4d8c-b7a6-958473625140"


def lun_section(dev: str, host: str, *, fmt: bool = True) -> str:
    return (
        f'[controller]\nhost_uuid = "{host}"\n'
        f'[pools.{LUN_POOL}]\ntype = "lun"\ndevice = "{dev}"\nformat_lun = {"true" if fmt else "false"}\n'
        "lease_timeout = 2.0\nlease_io_timeout = 0.1\n"
    )


FLEET_TOKEN = "fleet-token-for-the-lun-hosts"


def fleet_agent(make_agent, section: str, pki, name: str, *, initiator: str = "", own_pids: bool = False):
    """A configured (not started) agent on a pool section, as a fleet host:
    a TCP listener with mutual TLS and the fleet's token, advertised in its
    leases (the hosts of a pool ask each other which VMs use a volume, and
    pass changes to the owner); initiator: its iSCSI initiator name;
    own_pids: run it in a PID namespace of its own, so it sees only its own
    processes (VMs started by the test belong to another host)."""
    from support.agents import REPO
    from support.cephcluster import free_port

    port = free_port()
    tls = (
        f'tcp_listen = "127.0.0.1:{port}"\ntls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server.key"\n'
        f'tls_client_ca = "{pki}/ca.pem"\nauth_token = "{FLEET_TOKEN}"\n'
    )
    section = section.replace("[controller]\n", f'[controller]\nadvertise = "localhost:{port}"\n', 1)
    a = make_agent(tls + section, name=name)
    if initiator:
        a.config.write_text(
            a.config.read_text().replace('log_level = "debug"', f'log_level = "debug"\niscsi_initiator = "{initiator}"')
        )
    a.config.chmod(0o600)
    if own_pids:
        a.prefix = [sys.executable, str(REPO / "tests" / "support" / "pidns.py")]
    return a


def iscsi_section(host: str, tgt_server, lun, *, fmt: bool, extra: str = "") -> str:
    """The pool on a tgtd LUN (LUN 1 of lun's target), for host `host`."""
    return (
        f'[controller]\nhost_uuid = "{host}"\n[pools.{LUN_POOL}]\ntype = "lun"\nip = "127.0.0.1"\n'
        f'port = {tgt_server.port}\ntarget = "{lun.iqn}"\nlun = 1\nformat_lun = {str(fmt).lower()}\n'
        f"lease_timeout = 2.0\nlease_io_timeout = 0.1\n{extra}"
    )


def eventually_lapsed(bk: Bk, host: str, timeout: float = 15.0):
    """The pool's status once it reports host's lease as lapsed (twice its timeout old)."""
    deadline = time.monotonic() + timeout
    while True:
        st = bk.c.get_pool_status(v.PoolRef(pool_uuid=bk.pool))
        if host in st.lapsed_hosts or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def owned(bk: Bk, timeout: float = 10.0) -> None:
    """Wait until the agent holds the pool's owner lease (it creates a probe volume)."""
    deadline = time.monotonic() + timeout
    vid = ""
    while True:
        try:
            vid = vid or bk.create(capacity=MiB, name="probe").uuid
            bk.call("DeleteVolume", volume_uuid=vid)
            return
        except (FailedPrecondition, TargetUnreachable):  # not the owner yet; a dead owner's host lease lapsing
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def table_of(dev: str) -> SliceTable:
    return SliceTable(PoolLun(LocalBlockDevice(dev, exclusive=False), LUN_POOL))


def open_pool(lo, tmp):
    """The pool driven in this process (no agent): formatted on lo, short
    leases; the caller waits for the owner lease and closes it."""
    from agent.volumes.lun.driver import LunPool

    return LunPool.open(
        LUN_POOL,
        LocalBlockDevice(lo.dev, exclusive=False),
        {"driver": "host_device", "filename": lo.dev},
        host_uuid=str(uuid.uuid4()),
        run_dir=str(tmp / "run"),
        format_lun=True,
        lease_timeout=2.0,
        lease_io_timeout=0.1,
    )


@pytest.fixture
def lun_agent(make_agent, loop):
    lo = loop(256 * MiB)
    a = make_agent(lun_section(lo.dev, str(uuid.uuid4()))).start()
    with a.client() as c:
        bk = Bk(a, c)
        bk.pool = LUN_POOL
        bk.lo = lo
        owned(bk)
        yield bk
    assert a.stop() == 0, a.log_text()


def test_volumes_snapshots_clones_on_a_lun(lun_agent):
    n = lun_agent
    st = n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool))
    assert st.type == "lun" and st.status == "healthy" and st.total_bytes == 253 * MiB
    vid = n.create(capacity=32 * MiB, name="on-lun").uuid
    head = n.call("GetVolume", volume_uuid=vid).access_path
    node = json.loads(head[len("json:") :])
    assert node["file"]["file"]["filename"] == n.lo.dev and node["file"]["file"]["locking"] == "off"
    first = {0: os.urandom(2 * MiB), 17 * MiB + 4096: os.urandom(70000)}
    n.write(vid, first)
    s1 = n.snap(vid, "s1")
    d1 = n.digest(vid, s1.uuid)
    assert [s.name for s in n.call("ListSnapshots", volume_uuid=vid).snapshots] == ["s1"]
    n.write(vid, {8 * MiB: os.urandom(MiB)})
    s2 = n.snap(vid, "s2")
    d2 = n.digest(vid, s2.uuid)
    assert d1 != d2
    # change tracking: each layer's persistent bitmap, read straight from its slice
    assert n.changed(vid, s2.uuid, s1.uuid) == [(8 * MiB, MiB)]
    assert n.changed(vid, s1.uuid) == [(0, 2 * MiB), (17 * MiB, 128 << 10)]
    # an independent read of each snapshot's chain, opened from the table
    t = table_of(n.lo.dev)
    recs = t.records()
    by_layer = {r.layer: r for r in recs if r.used}
    assert by_layer[s2.uuid].parent == s1.uuid and by_layer[vid].parent == s2.uuid
    assert {r.volume for r in recs if r.used} == {vid}
    assert ref_digest_of(n.call("GetVolume", volume_uuid=vid).access_path, n.agent.workdir) == d2

    # linked clone of s1, then flattened: its data stays s1's
    cid = new_id()
    assert n.clone(vid, s1.uuid, cid, name="linked").state == OK
    assert n.digest(cid) == d1
    with pytest.raises(HasDependents):
        n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert n.c.run(f"flat-{cid}", flatten=jobs_pb2.FlattenSpec(pool_uuid=n.pool, volume_uuid=cid)).state == OK
    assert n.digest(cid) == d1
    assert table_of(n.lo.dev).find(cid, cid).parent == ""
    # a full clone of s2
    fid = new_id()
    assert n.clone(vid, s2.uuid, fid, name="full", linked=False).state == OK
    assert n.digest(fid) == d2

    # deleting the middle snapshot keeps s2 and the head as they were
    n.write(vid, {4 * MiB: os.urandom(MiB)})
    head_digest = n.digest(vid)
    n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1.uuid)
    assert n.digest(vid, s2.uuid) == d2 and n.digest(vid) == head_digest
    assert table_of(n.lo.dev).find(vid, s2.uuid).parent == ""
    # rollback to s2: the head reads as s2 again
    n.call("RollbackSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    assert n.digest(vid) == d2
    tree = n.call("GetSnapshotTree", volume_uuid=vid)
    assert dict(tree.parents) == {"s2": "", "head": "s2"}
    # resize grows the head's slice in place when it can
    info = n.call("ResizeVolume", volume_uuid=fid, capacity=48 * MiB)
    assert info.capacity == 48 * MiB and n.digest(fid) != d2  # longer: more zeros hashed
    # delete: every slice of the volume is released, the table stays sound
    n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2.uuid)
    for vol in (vid, cid, fid):
        n.call("DeleteVolume", volume_uuid=vol)
    assert [r for r in table_of(n.lo.dev).records() if r.used] == []
    assert n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).used_bytes == 0


def test_backups_and_restores_on_a_lun(lun_agent):
    n = lun_agent
    _, gens = three_generations(n)
    for _, r, digest in gens:
        got = n.restore(r.backup_uuid)
        assert got.image_digest == digest
        assert n.digest(got.volume_uuid, pool=n.pool) == digest  # restored into the LUN pool
    # and into a directory pool from the LUN's backup
    last = gens[-1][1]
    other = n.restore(last.backup_uuid, pool=n.agent.pool_uuid)
    assert n.digest(other.volume_uuid, pool=n.agent.pool_uuid) == gens[-1][2]
    assert n.verify(last.backup_uuid).state == OK


def test_second_host_reads_and_takes_over(make_agent, loop):
    lo = loop(128 * MiB)
    a = make_agent(lun_section(lo.dev, str(uuid.uuid4())), name="a").start()
    with a.client() as ca:
        owner = Bk(a, ca)
        owner.pool = LUN_POOL
        owned(owner)
        vid = owner.create(capacity=16 * MiB, name="shared").uuid
        owner.write(vid, {MiB: os.urandom(3 * MiB)})
        s1 = owner.snap(vid, "s1").uuid
        d1 = owner.digest(vid, s1)
    b = make_agent(lun_section(lo.dev, str(uuid.uuid4()), fmt=False), name="b").start()
    try:
        with b.client() as cb:
            other = Bk(b, cb)
            other.pool = LUN_POOL
            # the other host sees the same volumes and reads the same data
            assert [x.uuid for x in other.call("ListVolumes").volumes] == [vid]
            assert other.digest(vid, s1) == d1
            err = rpc_error(other.create, capacity=MiB, name="refused")
            assert "not the metadata owner" in err.details()
            from support.cli import cli

            shown = cli(b, "pool", "status", LUN_POOL).stdout  # the operator's view from host b
            assert "(lun): healthy" in shown and "metadata owner: " in shown and "(none yet)" not in shown
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            owned(other, timeout=15)  # after the 2 s lease timeout
            # a's host lease still looks live (2 x its timeout by its last stamp), and a gave no
            # address to ask whether its VMs hold the head: the snapshot waits until it lapses
            deadline = time.monotonic() + 10
            while True:
                try:
                    s2 = other.snap(vid, "s2").uuid
                    break
                except TargetUnreachable as e:
                    assert "cannot be asked" in e.message and time.monotonic() < deadline
                    time.sleep(0.2)
            assert other.digest(vid, s2) == d1
            recs = [r for r in table_of(lo.dev).records() if r.used]
            assert {r.layer for r in recs if r.kind == 1} == {vid, s1, s2}
    finally:
        assert b.stop() == 0, b.log_text()


def test_volumes_and_backups_on_an_iscsi_lun(make_agent, iscsi_lun, tgt_server, pki):
    """The same pool on a tgtd LUN: the table and leases through libiscsi,
    the layers through qemu's iscsi driver (user space, no kernel session).
    A second host on the same LUN reads the same data, and its snapshot is
    passed on to the owner."""
    t = iscsi_lun(128 * MiB)

    def host(name: str, fmt: bool):
        return fleet_agent(make_agent, iscsi_section(str(uuid.uuid4()), tgt_server, t.lun, fmt=fmt), pki, name)

    a = host("a", True).start()
    b = None
    try:
        with a.client() as c:
            n = Bk(a, c)
            n.pool = LUN_POOL
            owned(n)
            vol = n.create(capacity=16 * MiB, name="on-iscsi").uuid
            head = n.call("GetVolume", volume_uuid=vol).access_path
            assert json.loads(head[5:])["file"]["file"]["driver"] == "iscsi"
            n.write(vol, {0: os.urandom(2 * MiB), 9 * MiB: os.urandom(4096)})
            s1 = n.snap(vol, "s1").uuid
            full = n.backup(vol, s1)
            n.write(vol, {5 * MiB: os.urandom(MiB)})
            s2 = n.snap(vol, "s2").uuid
            assert n.changed(vol, s2, s1) == [(5 * MiB, MiB)]
            inc = n.backup(vol, s2)
            assert inc.mode == "incremental" and inc.image_digest == n.digest(vol, s2)
            back = n.restore(inc.backup_uuid)
            assert n.digest(back.volume_uuid) == inc.image_digest == back.image_digest
            assert ref_digest_of(n.call("GetVolume", volume_uuid=back.volume_uuid).access_path, a.workdir) == (
                inc.image_digest
            )
            assert full.image_digest == n.digest(vol, s1)
            with open(t.lun.file, "rb") as f:
                assert f.read(8) == b"BFSHPOOL"  # the target's own file holds the pool
            b = host("b", False).start()
            with b.client() as cb:
                other = Bk(b, cb)
                other.pool = LUN_POOL
                assert other.digest(vol, s2) == inc.image_digest  # its own iSCSI sessions, the same bytes
                s3 = other.snap(vol, "s3").uuid  # passed on to the owner
                assert other.digest(vol, s3) == n.digest(vol, s3) == n.digest(vol)
    finally:
        if b is not None:
            assert b.stop() == 0, b.log_text()
        assert a.stop() == 0, a.log_text()


def test_lun_pool_refuses_a_lun_with_other_data(make_agent, loop):
    lo = loop(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", lo.dev], check=True)
    a = make_agent(lun_section(lo.dev, str(uuid.uuid4()))).start(wait=False)
    deadline = time.monotonic() + 20
    while a.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.proc.returncode not in (None, 0)
    assert "holds other data" in a.log_text()


def test_thin_slices_grow_or_move_under_a_running_vm(make_agent, loop, short_tmp):
    """Thin heads start in small slices; a running qemu-system writes into
    them past the write threshold the agent set. One has free space after
    it: its slice grows in place and qemu's raw node is reopened with the
    new size. The other is boxed in by a neighbour: the running layer is
    mirrored into a larger slice elsewhere (sync=top, its dirty bitmap
    carried over) and the old slice released. Checked after the VM quits:
    qemu-img check, the data read back, the neighbour untouched."""
    from agent import native

    from support.vms import Vm

    lo = loop(256 * MiB)
    section = lun_section(lo.dev, str(uuid.uuid4())) + f"thin = true\nthin_step = {4 * MiB}\n"
    a = make_agent(section).start()
    vm = None
    try:
        with a.client() as c:
            n = Bk(a, c)
            n.pool = LUN_POOL
            owned(n)
            boxed = n.create(capacity=64 * MiB, name="boxed").uuid
            neighbour = n.create(capacity=8 * MiB, name="neighbour").uuid
            n.write(neighbour, {0: os.urandom(MiB)})
            before = n.digest(neighbour)
            grows = n.create(capacity=64 * MiB, name="grows").uuid
            start = {r.volume: r for r in table_of(lo.dev).used() if r.kind == 1}
            assert start[grows].size < 8 * MiB and start[boxed].size == start[grows].size  # thin
            assert start[neighbour].offset == start[boxed].end  # boxed in
            paths = [n.call("GetVolume", volume_uuid=v_).access_path for v_ in (grows, boxed)]
            vm = Vm(short_tmp, paths, name="thin", werror="enospc")
            for disk, vol, pattern in ((0, grows, 0x40), (1, boxed, 0x60)):
                for i in range(12):  # 12 MiB into slices that began under 6 MiB
                    vm.write(disk, pattern + i, i * MiB, MiB)
                    deadline = time.monotonic() + 10
                    while head_size(lo.dev, vol) < (i + 1) * MiB + 2 * MiB:
                        assert time.monotonic() < deadline, ("the slice did not grow", a.log_text()[-2000:])
                        time.sleep(0.1)
            # the VM holds the heads: no offline snapshot or delete under it
            assert "IN_USE" in rpc_error(n.call, "DeleteVolume", volume_uuid=grows).details()
            vm.flush(0)
            vm.flush(1)
            vm.quit()
            vm = None
            end = {r.volume: r for r in table_of(lo.dev).used() if r.kind == 1}
            assert end[grows].offset == start[grows].offset and end[grows].size >= 13 * MiB  # in place
            assert end[boxed].offset != start[boxed].offset and end[boxed].size >= 13 * MiB  # moved
            assert end[neighbour] == start[neighbour]
            for vol, pattern in ((grows, 0x40), (boxed, 0x60)):
                head = n.call("GetVolume", volume_uuid=vol).access_path
                check = json.loads(
                    subprocess.run(["qemu-img", "check", "--output=json", head], capture_output=True, text=True).stdout
                )
                assert check.get("corruptions", 0) == 0 and check.get("check-errors", 0) == 0, check
                ref = native.RefImageHash()
                ref.update(b"".join(bytes([pattern + i]) * MiB for i in range(12)) + bytes(52 * MiB))
                assert n.digest(vol) == ref.digest().hex()
            assert n.digest(neighbour) == before
            # the moved layer kept its changes since the last snapshot: a snapshot now tracks them
            s1 = n.snap(boxed, "after-move").uuid
            assert n.changed(boxed, s1) == [(0, 12 * MiB)]
    finally:
        if vm is not None:
            vm.kill()
        assert a.stop() == 0, a.log_text()


def test_a_full_thin_slice_never_touches_its_neighbour(make_agent, loop, short_tmp):
    """No room to grow or move: the VM's writes past the slice's end fail
    (ENOSPC from the raw driver) and the next slice reads as before."""
    from support.vms import Vm

    lo = loop(48 * MiB)
    section = lun_section(lo.dev, str(uuid.uuid4())) + f"thin = true\nthin_step = {4 * MiB}\n"
    a = make_agent(section).start()
    vm = None
    try:
        with a.client() as c:
            n = Bk(a, c)
            n.pool = LUN_POOL
            owned(n)
            full = n.create(capacity=32 * MiB, name="full").uuid
            free = n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).available_bytes
            neighbour = n.create(capacity=free - 16 * MiB, name="neighbour").uuid  # thin, right after it
            n.write(neighbour, {0: os.urandom(MiB)})
            s = n.snap(neighbour, "s").uuid
            before = n.digest(neighbour, s)
            # a thick full clone takes the rest: no room to grow in place or to move
            assert n.clone(neighbour, s, new_id(), name="filler", linked=False).state == OK
            assert n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).available_bytes < 8 * MiB
            start = {r.volume: r for r in table_of(lo.dev).used() if r.kind == 1 and r.layer == r.volume}
            assert table_of(lo.dev).find(neighbour, s).offset == start[full].end  # the snapshot's slice follows
            vm = Vm(short_tmp, [n.call("GetVolume", volume_uuid=full).access_path], name="full")
            for i in range(10):
                vm.write(0, 0x70, i * MiB, MiB)
            time.sleep(2)  # a watcher pass or two: nothing to grow into
            vm.quit()
            vm = None
            assert "No space left on device" in vm_log(short_tmp)
            assert table_of(lo.dev).find(full, full) == start[full]
            assert n.digest(neighbour, s) == before
    finally:
        if vm is not None:
            vm.kill()
        assert a.stop() == 0, a.log_text()


def head_size(dev: str, vol: str) -> int:
    """The head's slice size; 0 in the millisecond a move renames slices."""
    heads = [r for r in table_of(dev).used() if r.kind == 1 and r.layer == vol]
    return heads[0].size if heads else 0


def vm_log(tmp) -> str:
    return "".join(p.read_text(errors="replace") for p in tmp.glob("*.qmp.log"))


def test_live_snapshots_and_backup_of_a_running_vm(lun_agent, short_tmp):
    """A running qemu-system's disk on a shared LUN pool: each snapshot
    switches the VM to a new layer in a new slice (blockdev-add + a
    blockdev-snapshot transaction), the old head's bitmap stops recording;
    every snapshot holds exactly what was written before it, the changes
    between them are what was written between them, and a backup taken
    while the VM runs restores bit for bit (a real guest's freeze:
    test_a_real_guest_freezes_its_filesystem_for_a_live_snapshot)."""
    from agent import native

    from support.vms import Vm

    n = lun_agent
    vid = n.create(capacity=16 * MiB, name="running").uuid
    vm = Vm(short_tmp, [n.call("GetVolume", volume_uuid=vid).access_path], name="live")
    try:
        vm.write(0, 0x11, 0, 2 * MiB)
        vm.flush(0)
        s1 = n.snap(vid, "s1")
        assert s1.consistency == "crash"  # no guest agent channel: what a power cut leaves
        vm.write(0, 0x22, 4 * MiB, MiB)
        vm.flush(0)
        s2 = n.snap(vid, "s2").uuid
        vm.write(0, 0x33, 8 * MiB, MiB)
        vm.flush(0)
        backup = n.backup(vid, s2)  # while the VM runs
        assert n.changed(vid, s2, s1.uuid) == [(4 * MiB, MiB)]
    finally:
        vm.quit()

    def ref(*pieces):
        img = bytearray(16 * MiB)
        for pattern, off, length in pieces:
            img[off : off + length] = bytes([pattern]) * length
        h = native.RefImageHash()
        h.update(bytes(img))
        return h.digest().hex()

    a, b, c = (0x11, 0, 2 * MiB), (0x22, 4 * MiB, MiB), (0x33, 8 * MiB, MiB)
    assert n.digest(vid, s1.uuid) == ref(a)
    assert n.digest(vid, s2) == ref(a, b) == backup.image_digest
    assert n.digest(vid) == ref(a, b, c)
    assert n.restore(backup.backup_uuid).image_digest == ref(a, b)
    layers = {r.layer: r for r in table_of(n.lo.dev).used() if r.kind == 1}
    assert layers[vid].parent == s2 and layers[s2].parent == s1.uuid


def test_4k_sector_lun_and_a_lun_that_grows(make_agent, loop):
    """A LUN with 4 KiB logical sectors holds volumes like a 512-byte one; a
    LUN resized on the storage (losetup -c) is taken in at the next status
    query: the pool's capacity grows and the new space holds slices."""
    lo = loop(64 * MiB, sector_size=4096)
    a = make_agent(lun_section(lo.dev, str(uuid.uuid4()))).start()
    try:
        with a.client() as c:
            n = Bk(a, c)
            n.pool = LUN_POOL
            owned(n)
            vid = n.create(capacity=16 * MiB, name="4k").uuid
            n.write(vid, {4096: os.urandom(MiB), 15 * MiB: b"end" * 1000})
            s1 = n.snap(vid, "s1").uuid
            d1 = n.digest(vid, s1)
            assert ref_digest_of(n.call("GetVolume", volume_uuid=vid).access_path, a.workdir) == d1
            assert n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).total_bytes == 61 * MiB
            assert "NO_SPACE" in rpc_error(n.create, capacity=48 * MiB, name="too-big").details()
            os.truncate(lo.file, 128 * MiB)
            subprocess.run(["losetup", "-c", lo.dev], check=True)
            assert n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool)).total_bytes == 125 * MiB
            big = n.create(capacity=48 * MiB, name="fits-now").uuid
            assert table_of(lo.dev).find(big, big).end > 64 * MiB
            assert n.digest(vid, s1) == d1
    finally:
        assert a.stop() == 0, a.log_text()


def test_sweep_spares_copies_in_flight_and_abort_is_safe_twice(loop, short_tmp):
    """The owner's sweep of abandoned slices never takes a restore or copy
    that is still being written (they run for hours), takes one whose
    writer is gone, and an abort called twice releases nothing else; a
    layer's geometry read before its slice grew is refused."""
    lo = loop(64 * MiB)
    pool = open_pool(lo, short_tmp)
    try:
        assert pool.membership.wait_owner(5)
        pool.leftover_age = -1  # every slice counts as old
        vol = str(uuid.uuid4())
        _, commit, abort = pool.new_volume_for_copy(vol, "copying", 8 * MiB)
        assert pool.remove_leftovers() == []  # in flight: kept
        abort()
        other = str(uuid.uuid4())
        _, commit2, _ = pool.new_volume_for_copy(other, "next", 8 * MiB)  # may reuse the slot
        abort()  # again: must not release the next copy's slice
        assert len([r for r in pool.table.used() if r.volume == other]) == 1
        assert commit2().uuid == other
        stale = pool.table.allocate(MiB, kind=1, volume=str(uuid.uuid4()), layer=str(uuid.uuid4()))
        assert pool.remove_leftovers() == [stale.slot]  # nobody writes it: swept
        assert pool.volume_exists(other)
        # the stale-geometry guard: a layer's place read before it grew is refused, not trusted
        head = pool.table.find(other, other)
        pool.table.grow(head.slot, head.size + MiB)
        with pytest.raises(FailedPrecondition, match="moved or grew"):
            pool.check_geometry(head)
        assert pool.check_geometry(pool.table.find(other, other)).size == head.size + MiB
    finally:
        pool.close()


def test_repair_after_a_crash_in_a_live_snapshot(loop, short_tmp):
    """The agent dies in the middle of a live snapshot. Before the VM
    switched to the new layer: the next change of the volume takes the
    snapshot back and frees the new slice, the VM's head untouched. After
    the switch: it finishes the renames. Either way the VM's data is whole
    and no slice a VM has open is freed."""
    from agent.volumes.qcow2.meta import SnapMeta

    from support.vms import Vm

    lo = loop(64 * MiB)
    pool = open_pool(lo, short_tmp)
    vm = None
    try:
        assert pool.membership.wait_owner(5)
        vol = str(uuid.uuid4())
        pool.create_volume(vol, "v", 8 * MiB)
        vm = Vm(short_tmp, [pool.volume_info(vol).access_path], name="crash")
        vm.write(0, 0x5A, 0, MiB)

        def half_snapshot(switch: bool) -> str:
            """create_snapshot's steps up to the crash point."""
            snap = str(uuid.uuid4())
            meta = pool._meta(vol)
            head = pool._rec(pool.table.records(), vol)
            tmp = pool.table.allocate(head.size, kind=1, volume=vol, layer=str(uuid.uuid4()), parent=snap)
            pool._new_layer(tmp, 8 * MiB, head)
            meta.snapshots.append(SnapMeta(snap, "s", "", time.time(), meta.head_parent))
            meta.head_parent = snap
            pool._save(meta)
            if switch:
                from agent.hypervisor.qmp import Qmp

                with Qmp(pool.watcher.slice_users([head.offset])[0][1], timeout=10) as q:
                    pool.watcher.switch_to_overlays(q, [(head, tmp, "bf-dirty")])
            return snap

        gone = half_snapshot(switch=False)
        pool._repair(pool._meta(vol))
        assert pool._meta(vol).snapshot(gone) is None and len(pool.table.used()) == 2  # head + metadata
        kept = half_snapshot(switch=True)
        vm.write(0, 0x6B, MiB, MiB)  # the VM now writes the new slice
        pool._repair(pool._meta(vol))
        layers = {r.layer: r for r in pool.table.used() if r.kind == 1}
        assert set(layers) == {vol, kept} and layers[vol].parent == kept
        assert pool.watcher.slice_users([layers[vol].offset])  # the head the table names is the VM's top
        vm.flush(0)
        vm.quit()
        vm = None
        assert ref_digest_of(pool.volume_info(vol).access_path, short_tmp) == ref_digest_of_bytes(
            bytes([0x5A]) * MiB + bytes([0x6B]) * MiB + bytes(6 * MiB)
        )
    finally:
        if vm is not None:
            vm.kill()
        pool.close()


def ref_digest_of_bytes(data: bytes) -> str:
    from agent import native

    h = native.RefImageHash()
    h.update(data)
    return h.digest().hex()


def test_a_reused_metadata_slice_never_shows_the_old_volume(loop, short_tmp):
    """A volume's metadata slice, released and given to the next volume,
    holds the next volume's tree only: the old document (valid checksum, a
    higher generation) is wiped and would be refused anyway."""
    lo = loop(64 * MiB)
    pool = open_pool(lo, short_tmp)
    try:
        assert pool.membership.wait_owner(5)
        old = str(uuid.uuid4())
        pool.create_volume(old, "old", 4 * MiB)
        for i in range(3):  # generations 2..4 of its metadata, both halves written
            pool.create_snapshot(old, str(uuid.uuid4()), f"s{i}")
        meta_slot = next(r for r in pool.table.used() if r.kind == 2 and r.volume == old)
        pool.delete_volume(old, force=True)
        new = str(uuid.uuid4())
        pool.create_volume(new, "new", 4 * MiB)
        again = next(r for r in pool.table.used() if r.kind == 2 and r.volume == new)
        assert again.offset == meta_slot.offset  # the same range, reused
        assert pool.list_snapshots(new) == [] and pool.volume_info(new).name == "new"
    finally:
        pool.close()


def test_thin_layers_make_room_before_a_merge(make_agent, loop):
    """Deleting a snapshot merges its data into the layer above: a thin head
    grows first (in place, or moved when boxed in), so the merge never runs
    out of slice; a thin snapshot layer that cannot grow where it is
    (others are backed by it there) is refused before anything changes."""
    lo = loop(128 * MiB)
    section = lun_section(lo.dev, str(uuid.uuid4())) + f"thin = true\nthin_step = {4 * MiB}\n"
    a = make_agent(section).start()
    try:
        with a.client() as c:
            n = Bk(a, c)
            n.pool = LUN_POOL
            owned(n)
            vid = n.create(capacity=32 * MiB, name="thin").uuid
            n.write(vid, {0: os.urandom(4 * MiB)})
            s1 = n.snap(vid, "s1").uuid
            n.write(vid, {8 * MiB: os.urandom(4 * MiB)})
            s2 = n.snap(vid, "s2").uuid
            n.write(vid, {16 * MiB: os.urandom(MiB)})
            d2, head = n.digest(vid, s2), n.digest(vid)
            err = rpc_error(n.call, "DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s1)
            assert "NO_SPACE" in err.details() and s2 in err.details()  # s2 is boxed in by the head
            assert n.digest(vid, s2) == d2 and n.digest(vid) == head  # nothing changed
            n.call("DeleteSnapshot", volume_uuid=vid, snapshot_uuid=s2)  # the head grows (or moves) first
            assert n.digest(vid) == head
            grown = table_of(lo.dev).find(vid, vid)
            assert grown.size > 8 * MiB and grown.parent == s1
            # a resize of a thin volume keeps it thin: room for the larger metadata only
            other = n.create(capacity=8 * MiB, name="small").uuid
            before = table_of(lo.dev).find(other, other).size
            assert n.call("ResizeVolume", volume_uuid=other, capacity=64 * MiB).capacity == 64 * MiB
            assert table_of(lo.dev).find(other, other).size < before + 2 * MiB
    finally:
        assert a.stop() == 0, a.log_text()


def test_snapshot_set_of_a_vms_two_disks_at_one_instant(lun_agent, short_tmp):
    """Both disks of a running VM on a shared pool: one CreateSnapshotSet
    switches both to new layers in one QMP transaction, each snapshot holds
    what its disk had, and the later writes stay out of both."""
    from support.vms import Vm

    n = lun_agent
    a = n.create(capacity=8 * MiB, name="sys").uuid
    b = n.create(capacity=8 * MiB, name="data").uuid
    paths = [n.call("GetVolume", volume_uuid=x).access_path for x in (a, b)]
    vm = Vm(short_tmp, paths, name="set")
    try:
        vm.write(0, 0x21, 0, MiB)
        vm.write(1, 0x42, MiB, MiB)
        vm.flush(0)
        vm.flush(1)
        req = v.CreateSnapshotSetRequest(
            snapshots=[
                v.CreateSnapshotRequest(pool_uuid=n.pool, volume_uuid=x, snapshot_uuid=new_id(), name="nightly")
                for x in (a, b)
            ]
        )
        got = n.c.create_snapshot_set(req)
        assert got.consistency == "crash" and got.switch_ms > 0 and len(got.snapshots) == 2
        vm.write(0, 0x77, 0, MiB)  # after the instant: in neither snapshot
        vm.write(1, 0x77, MiB, MiB)
        vm.flush(0)
        vm.flush(1)
    finally:
        vm.quit()
    want_a = ref_digest_of_bytes(bytes([0x21]) * MiB + bytes(7 * MiB))
    want_b = ref_digest_of_bytes(bytes(MiB) + bytes([0x42]) * MiB + bytes(6 * MiB))
    assert n.digest(a, got.snapshots[0].uuid) == want_a
    assert n.digest(b, got.snapshots[1].uuid) == want_b
    assert n.digest(a) != want_a and n.digest(b) != want_b


def test_a_real_guest_freezes_its_filesystem_for_a_live_snapshot(lun_agent, short_tmp):
    """A real guest (Debian's kernel, busybox, qemu-guest-agent; TCG) writes
    to ext4 on a shared-pool volume without pause; the live snapshot is
    taken with its filesystem frozen through its agent: the snapshot's ext4
    is clean as after an unmount (no needs_recovery, e2fsck clean)."""
    from agent.hypervisor.qga import GuestAgent

    from support import guest
    from support.vms import Vm

    n = lun_agent
    kernel, initrd = guest.build()
    vid = n.create(capacity=64 * MiB, name="guestdata").uuid
    raw = short_tmp / "fs.raw"
    subprocess.run(["truncate", "-s", str(64 * MiB), str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    n.write(vid, {0: raw.read_bytes()})
    head = n.call("GetVolume", volume_uuid=vid).access_path
    vm = Vm(short_tmp, [head], name="realguest", qga="server", boot=(kernel, initrd))
    try:
        deadline = time.monotonic() + 120
        while not vm.console.exists() or "GUEST-READY" not in vm.console.read_text(errors="replace"):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.console.read_text(errors="replace")
            time.sleep(0.2)
        while True:  # until qemu-ga in the guest answers on its port
            try:
                with GuestAgent(vm.qga_path, timeout=5) as ga:
                    ga.sync()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, "the guest agent never answered"
                time.sleep(0.5)
        s1 = n.snap(vid, "frozen")
        assert s1.consistency == "application"
        assert "GUEST-NO-DATA" not in vm.console.read_text(errors="replace")
    finally:
        vm.quit()
    out = short_tmp / "snap.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", snapshot_name(n.lo.dev, s1.uuid), str(out)], check=True)
    dump = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True, check=True).stdout
    features = next(x for x in dump.splitlines() if x.startswith("Filesystem features:"))
    assert "has_journal" in features and "needs_recovery" not in features
    assert subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True).returncode == 0


def snapshot_name(dev: str, snap: str) -> str:
    """What qemu opens for a snapshot layer, built here from the table: its
    slice and the chain under it."""
    layers = {r.layer: r for r in table_of(dev).used() if r.kind == 1}

    def node(rec):
        protocol = {"driver": "host_device", "filename": dev, "locking": "off"}
        raw = {"driver": "raw", "offset": rec.offset, "size": rec.size, "file": protocol}
        return {"driver": "qcow2", "file": raw, "backing": node(layers[rec.parent]) if rec.parent else None}

    return "json:" + json.dumps(node(layers[snap]))


def test_a_vm_on_another_host_is_seen_snapshotted_live_and_grown(make_agent, loop, short_tmp, pki):
    """Two hosts on one LUN, the metadata owner in a PID namespace of its
    own (it sees only its own processes, as on another machine), a running
    qemu-system on the other host. The owner asks that host which VMs hold
    a head: a delete of the VM's volume is refused IN_USE naming the VM and
    its host; live snapshots (asked of the owner, and of the VM's host,
    which passes them on) are switched by the VM's host in one QMP
    transaction; a thin head grows in place through the owner while the
    VM writes, and a boxed-in one moves (the owner's new slice, this host's
    mirror). The VM's host stopping its agent while the VM runs hands its
    lease over: the owner's changes wait until that agent is back. Every
    snapshot holds exactly what was written before it."""
    from agent import native

    from support.vms import Vm

    lo = loop(256 * MiB)

    def host(name: str, fmt: bool):
        section = lun_section(lo.dev, str(uuid.uuid4()), fmt=fmt) + f"thin = true\nthin_step = {4 * MiB}\n"
        return fleet_agent(make_agent, section, pki, name, own_pids=fmt)

    owner = host("owner", True).start()
    other = host("vmhost", False).start()
    vm = None
    try:
        with owner.client() as oc, other.client() as vc:
            n, b = Bk(owner, oc), Bk(other, vc)
            n.pool = b.pool = LUN_POOL
            owned(n)
            boxed = n.create(capacity=32 * MiB, name="boxed").uuid
            neighbour = n.create(capacity=8 * MiB, name="neighbour").uuid
            vid = n.create(capacity=32 * MiB, name="elsewhere").uuid
            heads = {r.volume: r for r in table_of(lo.dev).used() if r.kind == 1}
            start = heads[vid]
            assert start.size < 8 * MiB and heads[neighbour].offset == heads[boxed].end  # thin; boxed in
            paths = [n.call("GetVolume", volume_uuid=x).access_path for x in (vid, boxed)]
            vm = Vm(short_tmp, paths, name="onb", werror="enospc")
            vm.write(0, 0x11, 0, 2 * MiB)
            vm.flush(0)
            # the owner cannot see the VM itself: it asked the other host
            refused = rpc_error(n.call, "DeleteVolume", volume_uuid=vid).details()
            assert "IN_USE" in refused and "onb" in refused and "host " in refused, refused
            s1 = n.snap(vid, "s1")
            assert s1.consistency == "crash"  # switched by the VM's host (no guest agent)
            # the VM writes its new top; past the first slice's end: grown in place by the owner
            for i in range(8):
                vm.write(0, 0x20 + i, 4 * MiB + i * MiB, MiB)
                deadline = time.monotonic() + 20
                while head_size(lo.dev, vid) < (i + 1) * MiB + 2 * MiB:
                    assert time.monotonic() < deadline, ("the slice did not grow", other.log_text()[-3000:])
                    time.sleep(0.1)
            vm.flush(0)
            s2 = b.snap(vid, "s2")  # asked of the VM's host: passed on to the owner, switched back here
            assert s2.consistency == "crash"
            vm.write(0, 0x33, 20 * MiB, MiB)
            vm.flush(0)
            # the boxed-in head: the owner gives a new slice, this host mirrors into it
            for i in range(8):
                vm.write(1, 0x60 + i, i * MiB, MiB)
                deadline = time.monotonic() + 20
                while head_size(lo.dev, boxed) < (i + 1) * MiB + 2 * MiB:
                    assert time.monotonic() < deadline, ("the slice did not move", other.log_text()[-3000:])
                    time.sleep(0.1)
            vm.flush(1)
            layers = {r.layer: r for r in table_of(lo.dev).used() if r.kind == 1}
            assert layers[vid].parent == s2.uuid and layers[s2.uuid].parent == s1.uuid
            assert layers[s1.uuid].offset == start.offset and layers[s2.uuid].size >= 10 * MiB
            assert n.changed(vid, s2.uuid, s1.uuid) == [(4 * MiB, 8 * MiB)]
            # the VM's host stops its agent cleanly while the VM runs: its host lease is handed over,
            # not released, so the owner's changes of heads wait; started again, it takes it back
            assert other.stop() == 0, other.log_text()
            refused = rpc_error(n.call, "ResizeVolume", volume_uuid=vid, capacity=64 * MiB).details()
            assert "TARGET_UNREACHABLE" in refused and "stopped while VMs there" in refused, refused
            other.start()
            deadline = time.monotonic() + 15
            while True:
                try:
                    s3 = n.snap(vid, "s3")  # live again: switched by the agent that came back
                    break
                except TargetUnreachable:
                    assert time.monotonic() < deadline, other.log_text()[-3000:]
                    time.sleep(0.2)
            assert s3.consistency == "crash"
            vm.quit()
            vm = None

            def ref(*pieces):
                img = bytearray(32 * MiB)
                for pattern, off, length in pieces:
                    img[off : off + length] = bytes([pattern]) * length
                h = native.RefImageHash()
                h.update(bytes(img))
                return h.digest().hex()

            first = [(0x11, 0, 2 * MiB)]
            grown = [(0x20 + i, 4 * MiB + i * MiB, MiB) for i in range(8)]
            assert n.digest(vid, s1.uuid) == b.digest(vid, s1.uuid) == ref(*first)
            assert n.digest(vid, s2.uuid) == ref(*first, *grown)
            assert b.digest(vid) == b.digest(vid, s3.uuid) == ref(*first, *grown, (0x33, 20 * MiB, MiB))
            end = {r.volume: r for r in table_of(lo.dev).used() if r.kind == 1 and r.layer == r.volume}
            assert end[boxed].offset != heads[boxed].offset and end[neighbour] == heads[neighbour]  # moved
            assert n.digest(boxed) == ref(*[(0x60 + i, i * MiB, MiB) for i in range(8)])
            n.call("DeleteVolume", volume_uuid=vid, force=True)  # the VM is gone: nothing holds it now
    finally:
        if vm is not None:
            vm.kill()
        assert other.stop() == 0, other.log_text()
        assert owner.stop() == 0, owner.log_text()


def test_a_lapsed_host_is_fenced_at_the_target(make_agent, iscsi_lun, tgt_server, pki, short_tmp):
    """Two hosts on a tgtd LUN that lets in only their initiator names, the
    owner in a PID namespace of its own; a VM on host b writes its volume
    through b's own iSCSI session. b's agent is SIGKILLed and its VM runs
    on: once b's host lease lapses, the owner runs its fence command. While
    the fence device does not answer, changes of the pool's heads wait
    (TARGET_UNREACHABLE naming b); once it answers, the target refuses b
    (its sessions closed, a new login refused) and the owner goes on."""
    from support.agents import REPO
    from support.vms import Vm

    init = {n: f"iqn.2026-12.io.blockferry.test:host-{n}" for n in ("a", "b")}
    hosts = {n: str(uuid.uuid4()) for n in init}
    t = iscsi_lun(128 * MiB, initiators=tuple(init.values()))
    hostmap = short_tmp / "hostmap.json"
    hostmap.write_text(json.dumps({hosts[n]: init[n] for n in init}))
    gate = short_tmp / "fence-answers"
    fence = [sys.executable, str(REPO / "tests" / "support" / "tgt_fence.py")]
    fence += [str(tgt_server.control), str(t.lun.tid), str(hostmap), str(gate)]
    fence_log = short_tmp / "hostmap.json.log"

    def host(n: str, fmt: bool):
        section = iscsi_section(hosts[n], tgt_server, t.lun, fmt=fmt, extra=f"fence_command = {json.dumps(fence)}\n")
        return fleet_agent(make_agent, section, pki, n, initiator=init[n], own_pids=fmt)

    owner = host("a", True).start()
    b = host("b", False).start()
    vm = None
    try:
        with owner.client() as oc, b.client() as bc:
            n, other = Bk(owner, oc), Bk(b, bc)
            n.pool = other.pool = LUN_POOL
            owned(n)
            vid = n.create(capacity=16 * MiB, name="on-b").uuid
            path = other.call("GetVolume", volume_uuid=vid).access_path
            assert json.loads(path[5:])["file"]["file"]["initiator-name"] == init["b"]  # b's own name
            vm = Vm(short_tmp, [path], name="fenced")
            vm.write(0, 0x11, 0, MiB)
            vm.flush(0)
            assert init["b"] in tgt_server.sessions_of(t.lun)  # b's agent and its VM
            b.proc.send_signal(signal.SIGKILL)
            b.proc.wait()
            # b's lease lapses; the fence device does not answer yet: changes of heads wait
            deadline = time.monotonic() + 20
            while True:
                err = rpc_error(n.call, "DeleteVolume", volume_uuid=vid)
                if "not fenced yet" in err.details():
                    break
                assert "TARGET_UNREACHABLE" in err.details() and time.monotonic() < deadline, err.details()
                time.sleep(0.2)
            assert hosts["b"] in err.details() and f"refused {hosts['b']}" in fence_log.read_text()
            st = n.c.get_pool_status(v.PoolRef(pool_uuid=n.pool))
            assert st.status == "degraded" and "not fenced yet" in st.error  # what the heartbeats report
            gate.touch()  # the fence device answers now
            deadline = time.monotonic() + 20
            while f"fenced {hosts['b']}" not in fence_log.read_text():
                assert time.monotonic() < deadline, owner.log_text()[-3000:]
                time.sleep(0.2)
            assert init["b"] not in tgt_server.sessions_of(t.lun)  # its agent's and its VM's sessions closed
            probe = subprocess.run(
                ["iscsi-inq", "-i", init["b"], f"iscsi://127.0.0.1:{tgt_server.port}/{t.lun.iqn}/1"],
                capture_output=True,
                text=True,
            )
            assert "Login Failed" in probe.stdout + probe.stderr  # the target refuses b
            assert init["a"] in tgt_server.sessions_of(t.lun)  # the owner's own sessions stay
            s1 = n.snap(vid, "after-fence")  # the owner goes on at once: b cannot write, so it is not asked
            lapsed = eventually_lapsed(n, hosts["b"])
            assert lapsed.status == "healthy" and lapsed.lapsed_hosts == [hosts["b"]]  # fenced, reported
            assert n.digest(vid, s1.uuid) == ref_digest_of_bytes(bytes([0x11]) * MiB + bytes(15 * MiB))
    finally:
        if vm is not None:
            vm.kill()
        assert owner.stop() == 0, owner.log_text()
