"""Shared block pools, the on-LUN layer: the format's bytes (golden), the
slice table on real loop devices (512-byte and 4 KiB sectors, a torn copy,
a resized LUN) and the delta leases between processes (an owner killed with
SIGKILL and taken over, a live owner never taken over, an owner that cannot
renew writing nothing)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from agent.errors import Busy, DataCorrupt, FailedPrecondition, NoSpace
from agent.stores.blockdev import LocalBlockDevice
from agent.volumes.lun import format as fmt
from agent.volumes.lun.format import LeaseRecord, SliceRecord, Superblock
from agent.volumes.lun.leases import DeltaLease, LeaseLost, host_lease, live_hosts
from agent.volumes.lun.table import PoolLun, SliceTable, format_pool, read_superblock

from support.volumes import MiB

POOL = "6c1b2a8e-4f0d-4b6a-9a43-2f5d8e1c7b90"
VOL = "0f4e3d2c-1b0a-4998-8877-665544332211"
LAYER = "a1b2c3d4-e5f6-4711-8899-aabbccddeeff"
HOST_A = "11111111-1111-4111-8111-111111111111"
HOST_B = "22222222-2222-4222-8222-222222222222"
ROOT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the bytes -------------------------------------------------------------


def test_golden_structures():
    sb = Superblock(
        pool_uuid=POOL, extent_size=MiB, sector_size=512, table_slots=4096, device_size=1 << 30, created=1767225600
    )
    assert sb.data_offset == 3 * MiB and sb.table_b == 2 * MiB + 512 * 1024
    assert sha(sb.pack()) == "c76b380f2b612ceb79a9b2270262a1cf60fcae4aa63699b639313c16afa07b9e"
    assert Superblock.unpack(sb.pack()) == sb
    rec = SliceRecord(
        slot=7,
        state=fmt.USED,
        kind=fmt.LAYER,
        generation=3,
        offset=5 * MiB,
        size=2 * MiB,
        volume=VOL,
        layer=LAYER,
        parent="",
        updated=1767225600,
        owner_gen=2,
    )
    assert len(rec.pack()) == fmt.RECORD
    assert sha(rec.pack()) == "6f48e5b2f20637d941f5c6fadb770e272604c17842d65e4f2c4fa2b67456d1f7"
    assert SliceRecord.unpack(rec.pack(), 7) == rec
    assert SliceRecord.unpack(rec.pack(), 8) is None  # a record in the wrong slot is not that slot's
    lease = LeaseRecord(
        host_id=3,
        owner=HOST_A,
        generation=4,
        counter=9,
        timestamp_ms=1767225600000,
        timeout_ms=60000,
        address="169.254.77.2:9443",
    )
    assert sha(lease.pack()) == "a150bbe8d842a6fecf6c007a920d74309bed4e5ee3a5a26a479d3c8f3ac62085"
    assert LeaseRecord.unpack(lease.pack()) == lease


def test_torn_structures_are_seen():
    sb = Superblock(pool_uuid=POOL, extent_size=MiB, sector_size=512, table_slots=64, device_size=64 * MiB, created=1)
    raw = bytearray(sb.pack())
    raw[20] ^= 1
    with pytest.raises(DataCorrupt, match="checksum"):
        Superblock.unpack(bytes(raw))
    rec = bytearray(SliceRecord(slot=1, state=fmt.USED, kind=fmt.LAYER, offset=MiB, size=MiB, volume=VOL).pack())
    rec[40] ^= 1
    assert SliceRecord.unpack(bytes(rec), 1) is None
    assert SliceRecord.unpack(bytes(fmt.RECORD), 1) == SliceRecord(slot=1)  # never written: empty
    good = SliceRecord(slot=1, state=fmt.USED, generation=2, offset=MiB, size=MiB)
    older = SliceRecord(slot=1, state=fmt.USED, generation=1, offset=MiB, size=MiB // 2)
    assert fmt.resolve(1, good, good) == (good, False)
    assert fmt.resolve(1, None, older) == (older, True)
    assert fmt.resolve(1, good, older) == (good, True)
    with pytest.raises(DataCorrupt, match="both copies"):
        fmt.resolve(1, None, None)


# --- the table on a LUN --------------------------------------------------------


def open_dev(lo) -> LocalBlockDevice:
    return LocalBlockDevice(lo.dev, exclusive=False)


def owner_table(dev, owner: str = HOST_A, **kw) -> tuple[SliceTable, DeltaLease]:
    lun = PoolLun(dev, POOL)
    lease = DeltaLease(lun, fmt.OWNER_LEASE, owner, timeout=kw.get("timeout", 4.0), io_timeout=kw.get("io", 0.2))
    lease.acquire(wait=False)
    return SliceTable(lun, guard=lease.guard), lease


def test_format_golden_layout(loop):
    lo = loop(64 * MiB)
    dev = open_dev(lo)
    sb = format_pool(dev, POOL, slots=256, now=1767225600)
    assert sb.sector_size == 512 and sb.data_offset == 3 * MiB and sb.data_end == 64 * MiB
    assert read_superblock(dev) == sb
    with open(lo.file, "rb") as f:
        meta = f.read(sb.data_offset)
    assert sha(meta) == "b7d88db8a2faeec65294972df39d8de2ea42fde86011a6652484c64a6148ee96"
    with pytest.raises(FailedPrecondition, match="holds a blockferry shared pool"):
        format_pool(dev, str(uuid.uuid4()))
    with pytest.raises(FailedPrecondition, match="holds pool"):
        PoolLun(dev, str(uuid.uuid4()))


def test_format_refuses_other_data(loop):
    lo = loop(64 * MiB)
    with open(lo.file, "r+b") as f:
        f.seek(63 * MiB + 12345)
        f.write(b"a file system's backup superblock")
    before = sha(lo.file.read_bytes())
    with pytest.raises(FailedPrecondition, match="other data"):
        format_pool(open_dev(lo), POOL)
    assert sha(lo.file.read_bytes()) == before


@pytest.mark.parametrize("sector", [512, 4096])
def test_allocate_grow_release(loop, sector):
    lo = loop(64 * MiB, sector_size=sector)
    dev = open_dev(lo)
    assert dev.sector_size == sector
    format_pool(dev, POOL, slots=256)
    table, _ = owner_table(dev)
    a = table.allocate(1, kind=fmt.LAYER, volume=VOL, layer=LAYER)
    assert (a.offset, a.size, a.generation) == (3 * MiB, MiB, 1)
    b = table.allocate(3 * MiB - 1, kind=fmt.LAYER, volume=VOL, layer=str(uuid.uuid4()), parent=LAYER)
    assert (b.offset, b.size) == (4 * MiB, 3 * MiB)
    with pytest.raises(NoSpace, match="in place"):
        table.grow(a.slot, 2 * MiB)  # b follows it
    grown = table.grow(b.slot, 10 * MiB)
    assert (grown.offset, grown.size, grown.generation) == (4 * MiB, 10 * MiB, 2)
    table.release(a.slot)
    c = table.allocate(MiB, kind=fmt.META, volume=VOL, layer=VOL)
    assert c.offset == 3 * MiB and c.slot == a.slot and c.generation == a.generation + 2
    # a reader on another open of the device sees the same table
    other = SliceTable(PoolLun(open_dev(lo), POOL))
    assert other.used() == table.used()
    assert other.usage() == (61 * MiB, 11 * MiB)
    with pytest.raises(FailedPrecondition, match="not the pool's metadata owner"):
        other.allocate(MiB, kind=fmt.LAYER, volume=VOL, layer=str(uuid.uuid4()))
    with pytest.raises(NoSpace, match="no free range"):
        table.allocate(60 * MiB, kind=fmt.LAYER, volume=VOL, layer=str(uuid.uuid4()))


def test_concurrent_allocations_never_overlap(loop):
    lo = loop(128 * MiB)
    dev = open_dev(lo)
    format_pool(dev, POOL, slots=256)
    table, _ = owner_table(dev)
    got, errors = [], []

    def worker(n: int) -> None:
        try:
            for _ in range(6):
                got.append(table.allocate((n + 1) * MiB, kind=fmt.LAYER, volume=VOL, layer=str(uuid.uuid4())))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    used = SliceTable(PoolLun(open_dev(lo), POOL)).used()  # read back, then checked for overlaps
    assert len(used) == 24 and {r.slot for r in used} == {r.slot for r in got}
    for prev, nxt in zip(used, used[1:], strict=False):
        assert prev.end <= nxt.offset


def test_torn_copy_resolved_and_repaired(loop):
    lo = loop(64 * MiB)
    dev = open_dev(lo)
    sb = format_pool(dev, POOL, slots=256)
    table, _ = owner_table(dev)
    rec = table.allocate(2 * MiB, kind=fmt.LAYER, volume=VOL, layer=LAYER)
    # tear copy A's record as a crash in the middle of its sector would
    block = bytearray(dev.read(sb.table_a, fmt.BLOCK))
    block[rec.slot * fmt.RECORD + 50] ^= 0xFF
    dev.write(sb.table_a, bytes(block))
    dev.flush()
    assert table.find(VOL, LAYER) == rec  # from copy B
    assert table.disagreed == [rec.slot]
    assert table.repair() == [rec.slot]
    table.records()
    assert table.disagreed == []
    raw = bytes(dev.read(sb.table_a, fmt.BLOCK))
    assert SliceRecord.unpack(raw[: fmt.RECORD], 0) == rec


def test_overlapping_table_is_refused(loop):
    lo = loop(64 * MiB)
    dev = open_dev(lo)
    sb = format_pool(dev, POOL, slots=64)
    a = SliceRecord(slot=0, state=fmt.USED, kind=fmt.LAYER, generation=1, offset=3 * MiB, size=2 * MiB, volume=VOL)
    b = SliceRecord(slot=1, state=fmt.USED, kind=fmt.LAYER, generation=1, offset=4 * MiB, size=MiB, volume=VOL)
    block = (a.pack() + b.pack()).ljust(fmt.BLOCK, b"\0")
    for off in (sb.table_a, sb.table_b):
        dev.write(off, block)
    dev.flush()
    with pytest.raises(DataCorrupt, match="overlap"):
        SliceTable(PoolLun(dev, POOL)).records()


def test_lun_resize(loop):
    lo = loop(32 * MiB)
    dev = open_dev(lo)
    format_pool(dev, POOL, slots=64)
    table, lease = owner_table(dev)
    with pytest.raises(NoSpace):
        table.allocate(40 * MiB, kind=fmt.LAYER, volume=VOL, layer=LAYER)
    os.truncate(lo.file, 96 * MiB)
    subprocess.run(["losetup", "-c", lo.dev], check=True)
    sb = table.lun.grow(lease.guard)
    assert sb.device_size == 96 * MiB and read_superblock(open_dev(lo)).device_size == 96 * MiB
    rec = table.allocate(40 * MiB, kind=fmt.LAYER, volume=VOL, layer=LAYER)
    assert rec.end <= 96 * MiB


# --- leases ----------------------------------------------------------------


def holder(lo, index: int, host: str, timeout: float, io: float, wait: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    cmd = [sys.executable, "-m", "support.lease_holder", lo.dev, str(index), host, str(timeout), str(io)]
    return subprocess.Popen(cmd + (["wait"] if wait else []), stdout=subprocess.PIPE, text=True, env=env)


def test_owner_killed_is_taken_over_live_owner_is_not(loop):
    lo = loop(32 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    a = holder(lo, fmt.OWNER_LEASE, HOST_A, 2.0, 0.1)
    try:
        assert a.stdout.readline().startswith("acquired 1")
        lun = PoolLun(open_dev(lo), POOL)
        b = DeltaLease(lun, fmt.OWNER_LEASE, HOST_B, timeout=2.0, io_timeout=0.1)
        with pytest.raises(Busy, match=f"held by host {HOST_A}"):
            b.acquire(wait=False)
        t0 = time.monotonic()
        with pytest.raises(Busy, match="which renews it"):
            b.acquire(wait=True)  # A renews within its timeout: never taken
        assert time.monotonic() - t0 < 2.5
        a.send_signal(signal.SIGKILL)
        a.wait()
        t0 = time.monotonic()
        rec = b.acquire(wait=True)
        waited = time.monotonic() - t0
        assert rec.owner == HOST_B and rec.generation == 2
        assert waited >= 2.0  # longer than the timeout after the last renewal it saw
        table = SliceTable(lun, guard=b.guard)
        assert table.allocate(MiB, kind=fmt.LAYER, volume=VOL, layer=LAYER).owner_gen == 2
    finally:
        a.kill()
        a.wait()


def test_owner_that_cannot_renew_writes_nothing(loop):
    lo = loop(32 * MiB)
    dev = open_dev(lo)
    format_pool(dev, POOL, slots=64)
    table, lease = owner_table(dev, timeout=1.0, io=0.1)
    table.allocate(MiB, kind=fmt.LAYER, volume=VOL, layer=LAYER)
    time.sleep(1.0)  # no renewal (a stalled host): its lease runs out
    assert not lease.valid()
    with pytest.raises(LeaseLost, match="not valid"):
        table.allocate(MiB, kind=fmt.LAYER, volume=VOL, layer=str(uuid.uuid4()))
    # a successor took over meanwhile: the old owner's renewal fails for good
    b = DeltaLease(PoolLun(open_dev(lo), POOL), fmt.OWNER_LEASE, HOST_B, timeout=1.0, io_timeout=0.1)
    b.acquire(wait=True)
    with pytest.raises(LeaseLost, match="taken by host"):
        lease.renew()
    assert len(SliceTable(PoolLun(dev, POOL)).used()) == 1


def test_racing_successors_one_wins(loop):
    lo = loop(32 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    hosts = [str(uuid.uuid4()) for _ in range(3)]
    procs = [holder(lo, fmt.OWNER_LEASE, h, 2.0, 0.2) for h in hosts]
    try:
        answers = [p.stdout.readline() for p in procs]
        assert sum(a.startswith("acquired") for a in answers) == 1, answers
        rec = LeaseRecord.unpack(open_dev(lo).read(fmt.lease_offset(fmt.OWNER_LEASE), fmt.BLOCK))
        winner = hosts[[a.startswith("acquired") for a in answers].index(True)]
        assert rec.owner == winner
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_host_ids(loop):
    lo = loop(32 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    lun = PoolLun(open_dev(lo), POOL)
    a = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1)
    b = host_lease(lun, HOST_B, timeout=2.0, io_timeout=0.1)
    assert (a.index, b.index) == (1, 2)
    assert set(live_hosts(lun)) == {HOST_A, HOST_B}
    a.release()
    assert set(live_hosts(lun)) == {HOST_B}
    again = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1)
    assert again.index == 1 and again.held.generation == 2  # its old id, released: taken at once


def test_a_leaving_host_stops_waiting_at_once(loop):
    """A host that stops while it watches a live owner's lease (every
    non-owner does) leaves at once, not after the lease timeout."""
    from agent.volumes.lun.membership import Membership

    lo = loop(32 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    owner = Membership(PoolLun(open_dev(lo), POOL), HOST_A, timeout=30.0, io_timeout=0.5).start()
    try:
        assert owner.wait_owner(5)
        other = Membership(PoolLun(open_dev(lo), POOL), HOST_B, timeout=30.0, io_timeout=0.5).start()
        time.sleep(2)  # joined, and watching the owner's lease
        assert other.state == "member" and other.owner() == HOST_A
        t0 = time.monotonic()
        other.stop()
        assert time.monotonic() - t0 < 3  # not the 30 s the watch could take
    finally:
        owner.stop()


def test_fence_command_and_initiator_name_are_checked(short_tmp):
    """fence_command runs without a shell: an absolute argv[0] or a clear
    error naming the field; only shared LUN pools fence; the initiator name
    must be an iSCSI name."""
    from agent.config import load
    from agent.errors import ConfigError

    from support.agents import write_config

    pool = str(uuid.uuid4())
    lun = f'[pools.{pool}]\ntype = "lun"\ndevice = "wwn-0x5000c500ad9285bb"\n'
    for body, field in (
        (lun + 'fence_command = ["fence-tgt", "--host"]\n', f"pools.{pool}.fence_command"),
        (
            f'[pools.{pool}]\ntype = "dir"\npath = "/srv/p"\nfence_command = ["/bin/true"]\n',
            f"pools.{pool}.fence_command",
        ),
    ):
        a = write_config(short_tmp / field.replace(".", "-"), body)
        with pytest.raises(ConfigError) as e:
            load(str(a.config))
        assert e.value.field == field, e.value.message
    a = write_config(short_tmp / "ok", lun + 'fence_command = ["/usr/local/sbin/fence-tgt", "--host"]\n')
    assert load(str(a.config)).pools[pool].fence_command == ["/usr/local/sbin/fence-tgt", "--host"]
    a = write_config(short_tmp / "init", "")
    a.config.write_text(
        a.config.read_text().replace('log_level = "debug"', 'log_level = "debug"\niscsi_initiator = "host-a"')
    )
    with pytest.raises(ConfigError) as e:
        load(str(a.config))
    assert e.value.field == "agent.iscsi_initiator"


def test_the_owner_fences_a_lapsed_host_once(loop):
    """The owner's watch of the host leases, by its own clock: a lease that
    stops changing for timeout + io_timeout without being released has
    lapsed and is fenced once per generation; a failed fence is named by
    unfenced() and tried again; a host that renews, or released its lease,
    is never fenced."""
    from agent.volumes.lun.membership import Membership

    lo = loop(64 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    lun = PoolLun(open_dev(lo), POOL)
    dead = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1, address="10.0.0.1:9443")
    alive = host_lease(lun, HOST_B, timeout=2.0, io_timeout=0.1)
    gone = host_lease(lun, str(uuid.uuid4()), timeout=2.0, io_timeout=0.1)
    gone.release()
    calls, answers = [], [False]

    def fence(host, address):
        calls.append((host, address))
        if not answers[0]:
            raise RuntimeError("the fence device does not answer")

    m = Membership(lun, str(uuid.uuid4()), timeout=2.0, io_timeout=0.1, fence=fence)
    assert m.watch_hosts(now=100.0) == []  # first sight
    alive.renew()
    assert m.watch_hosts(now=101.5) == [] and not calls  # unchanged for 1.5 s only
    alive.renew()
    assert m.watch_hosts(now=102.2) == [HOST_A]  # 2.2 s > 2.0 + 0.1: lapsed; the fence failed
    assert calls == [(HOST_A, "10.0.0.1:9443")]
    answers[0] = True
    alive.renew()
    assert m.watch_hosts(now=102.9) == [] and len(calls) == 2  # fenced now
    alive.renew()
    assert m.watch_hosts(now=110.0) == [] and len(calls) == 2  # once per lease generation
    before = dead.held.generation
    dead.release()  # the host came back (let in again): its id under a new generation
    back = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1)
    assert back.held.generation > before
    assert m.watch_hosts(now=111.0) == [] and len(calls) == 2
    assert {h for h, _ in calls} == {HOST_A}  # the renewing and the released host never


def test_a_host_lease_handed_over_waits_for_its_own_agent(loop):
    """An agent that stops while VMs on its host use the pool hands its host
    lease over instead of releasing it: no other host may take the id (it
    stays held for them, and lapses in time), its own next agent takes it
    back at once under a new generation."""
    lo = loop(32 * MiB)
    format_pool(open_dev(lo), POOL, slots=64)
    lun = PoolLun(open_dev(lo), POOL)
    a = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1)
    gen = a.held.generation
    a.release(hand_over=True)
    left = LeaseRecord.unpack(lun.read_block(fmt.lease_offset(a.index)))
    assert left.flags == fmt.HANDED_OVER and not left.free and left.owner == HOST_A
    other = DeltaLease(lun, a.index, HOST_B, timeout=2.0, io_timeout=0.1)
    with pytest.raises(Busy):
        other.acquire(wait=False)  # held, for everyone else
    t0 = time.monotonic()
    back = host_lease(lun, HOST_A, timeout=2.0, io_timeout=0.1)
    assert back.index == a.index and back.held.generation == gen + 1 and back.held.flags == 0
    assert time.monotonic() - t0 < 1.0  # not the 2.1 s a dead holder is watched for
