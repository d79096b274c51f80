"""Live snapshots of volumes a running VM holds (the QMP adapter), against
real qemu-system processes: the snapshot is the point in time it was taken
while the guest keeps writing, its layer is readable while the VM runs, and
backups and change tracking work from it."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from agent.errors import InUse, TrackingLost
from agent.hypervisor.holders import qmp_socket
from agent.hypervisor.qemu import QemuHypervisor
from agent.repo.repository import Repository
from agent.stores.local import LocalStore
from agent.volumes.qcow2 import Qcow2Pool, qemu_img
from agent.volumes.qcow2.driver import BITMAP

from support.backups import CS, nid, restore_to_qcow2
from support.vms import Vm

MiB = 1 << 20


@pytest.fixture
def env(short_tmp):
    pool = Qcow2Pool(nid(), str(short_tmp / "pool"), run_dir=str(short_tmp / "run"), allowed_roots=[str(short_tmp)])
    vms: list[Vm] = []

    def start(*disks: str, **kw) -> Vm:
        vms.append(Vm(short_tmp, list(disks), **kw))
        return vms[-1]

    yield pool, start, short_tmp
    for vm in vms:
        vm.quit()


def raw_of(path: str, tmp) -> bytes:
    """The guest content of a layer, read with qemu's own tools (-U: the VM holds it)."""
    out = tmp / f"{nid()}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


def test_qmp_socket_from_the_command_line():
    assert qmp_socket(("qemu", "-qmp", "unix:/run/a.qmp,server=on,wait=off")) == "/run/a.qmp"
    assert qmp_socket(
        ("qemu", "-chardev", "socket,id=m,path=/run/b.qmp,server=on", "-mon", "chardev=m,mode=control")
    ) == ("/run/b.qmp")
    assert qmp_socket(("qemu", "-chardev", "socket,id=m,path=/run/c", "-mon", "chardev=m,mode=readline")) is None
    assert qmp_socket(("qemu-nbd", "/img")) is None


@pytest.mark.parametrize("drive", [False, True], ids=["blockdev", "drive"])
def test_live_snapshots_are_the_point_in_time_while_the_guest_writes(env, drive):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "live", 16 * MiB).uuid
    head = pool.head_path(vol)
    vm = start(head, name="guest1", drive=drive)  # -drive: qemu's own file nodes, reopened by name
    vm.write(0, 0xAA, 0, 4 * MiB)
    s1 = nid()
    info = pool.create_snapshot(vol, s1, "s1")  # qemu holds the head: the live path
    assert info.tracking == "ok" and pool.head_path(vol) == head
    vm.write(0, 0xBB, 0, MiB)  # after the snapshot: not in it
    vm.write(0, 0xCC, 8 * MiB, MiB)
    layer1 = pool.snap_path(vol, s1)
    assert raw_of(layer1, tmp) == b"\xaa" * (4 * MiB) + bytes(12 * MiB)
    bm = qemu_img.info(layer1).bitmap(BITMAP)  # qemu stored the frozen layer's bitmap
    assert bm is not None and bm.consistent

    s2 = nid()
    pool.create_snapshot(vol, s2, "s2")
    vm.write(0, 0xDD, 0, 16 * MiB)  # the guest rewrites everything: both snapshots keep their point
    expected2 = b"\xbb" * MiB + b"\xaa" * (3 * MiB) + bytes(4 * MiB) + b"\xcc" * MiB + bytes(7 * MiB)
    assert raw_of(pool.snap_path(vol, s2), tmp) == expected2
    assert raw_of(layer1, tmp)[: 4 * MiB] == b"\xaa" * (4 * MiB)
    changed = pool.changed_extents(vol, s2, s1)
    assert changed.exact and [(e.start, e.length) for e in changed.extents] == [(0, MiB), (8 * MiB, MiB)]
    disk = vm.qmp("query-block")[0]["inserted"]  # qemu still reads every layer's header
    assert disk["backing_file_depth"] == 2  # head -> s2 -> s1
    vm.flush(0)
    assert raw_of(head, tmp) == b"\xdd" * (16 * MiB)  # the guest's last writes went to the head

    # the snapshots back up and restore bit for bit while the VM runs
    from agent.repo.backup import backup

    repo = Repository.init(LocalStore(str(tmp / "bp")), chunk_size=CS)
    m1 = backup(pool, vol, s1, repo, name="full")
    m2 = backup(pool, vol, s2, repo, parent=m1)
    assert m2.stats.chunks_read == 2 and not m2.fell_back  # the two changed chunks, from the stored bitmaps
    for m, snap in ((m1, s1), (m2, s2)):
        new_vol, written = restore_to_qcow2(pool, repo, m, tmp)
        assert written == m.image_digest
        assert raw_of(pool.head_path(new_vol), tmp) == raw_of(pool.snap_path(vol, snap), tmp)


@pytest.mark.parametrize("monitor", ["chardev", "config"])
def test_a_monitor_found_on_the_command_line_or_through_the_globs(env, short_tmp, monitor):
    pool, start, tmp = env
    if monitor == "config":  # not on the command line: only the configured globs find it
        pool.hypervisor = QemuHypervisor((str(short_tmp / "*.qmp"),))
    vol = pool.create_volume(nid(), "globbed", 8 * MiB).uuid
    vm = start(pool.head_path(vol), monitor=monitor)
    vm.write(0, 0x11, 0, MiB)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")
    vm.write(0, 0x22, 0, MiB)
    assert raw_of(pool.snap_path(vol, s1), tmp)[:MiB] == b"\x11" * MiB


def test_holders_that_are_not_vms_the_agent_drives_are_named(env, short_tmp):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "held", 8 * MiB).uuid
    head = pool.head_path(vol)
    vm = start(head, monitor="config")  # a VM whose monitor the agent cannot find
    with pytest.raises(InUse) as e:
        pool.create_snapshot(vol, nid(), "s1")
    assert f"pid {vm.proc.pid} (qemu-system-x86_64)" in e.value.message and "no running VM" in e.value.message
    vm.quit()
    sock = str(short_tmp / "nbd.sock")
    nbd = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, head])
    try:
        while not os.path.exists(sock):
            time.sleep(0.01)
        with pytest.raises(InUse) as e:
            pool.create_snapshot(vol, nid(), "s1")
        assert f"pid {nbd.pid} (qemu-nbd)" in e.value.message
    finally:
        nbd.terminate()
        nbd.wait(10)
    assert pool.list_snapshots(vol) == [] and os.path.exists(head)


def test_qemu_killed_loses_tracking_and_the_next_backup_reads_everything(env):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "killed", 8 * MiB).uuid
    head = pool.head_path(vol)
    vm = start(head)
    vm.write(0, 0x31, 0, 2 * MiB)
    s1 = nid()
    pool.create_snapshot(vol, s1, "s1")  # live
    vm.write(0, 0x32, 4 * MiB, MiB)
    vm.flush(0)  # the guest's data is safe; the bitmap is not
    vm.kill()  # qemu never stores the head's bitmap: it stays marked in use
    s2 = nid()
    info = pool.create_snapshot(vol, s2, "s2")  # idle again: the offline path
    assert info.tracking == "lost"
    with pytest.raises(TrackingLost):
        pool.changed_extents(vol, s2, s1)

    from agent.repo.backup import backup

    repo = Repository.init(LocalStore(str(tmp / "bp")), chunk_size=CS)
    m1 = backup(pool, vol, s1, repo, name="full")
    m2 = backup(pool, vol, s2, repo, parent=m1)
    assert m2.fell_back and m2.stats.chunks_read == 3  # every allocated chunk read again, and said so
    new_vol, written = restore_to_qcow2(pool, repo, m2, tmp)
    assert written == m2.image_digest
    expected = b"\x31" * (2 * MiB) + bytes(2 * MiB) + b"\x32" * MiB + bytes(3 * MiB)
    assert raw_of(pool.head_path(new_vol), tmp) == raw_of(pool.snap_path(vol, s2), tmp) == expected
