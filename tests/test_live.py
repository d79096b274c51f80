"""Live snapshots of volumes a running VM holds (the QMP adapter), against
real qemu-system processes: the snapshot is the point in time it was taken
while the guest keeps writing, its layer is readable while the VM runs, and
backups and change tracking work from it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import grpc
import pytest

from agent.api.v1 import volumes_pb2 as pb
from agent.errors import FailedPrecondition, InUse, InvalidArgument, TrackingLost
from agent.hypervisor.base import STATE_FILE_LIMIT, state_files
from agent.hypervisor.holders import nvram_stores, pflash_files, qmp_socket
from agent.hypervisor.qemu import QemuHypervisor
from agent.repo.repository import Repository
from agent.stores.local import LocalStore
from agent.volumes.base import SnapshotRequest
from agent.volumes.qcow2 import Qcow2Pool, qemu_img
from agent.volumes.qcow2.driver import BITMAP

from support.agents import POOL2_UUID, POOL_UUID
from support.backups import CS, nid, restore_to_qcow2
from support.cli import cli
from support.controller import AGENT_TOKEN, Controller, check_error, check_ok
from support.fake_qga import FakeGuestAgent
from support.vms import Vm
from support.volumes import rpc_error

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


def test_nvram_files_from_the_command_line():
    argv = ("qemu", "-drive", "if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd")
    argv += ("-drive", "if=pflash,unit=1,format=raw,file=/var/lib/vms/100/efivars.fd", "-drive", "file=/d,if=none")
    assert pflash_files(argv) == ["/usr/share/OVMF/OVMF_CODE.fd", "/var/lib/vms/100/efivars.fd"]
    assert nvram_stores(argv) == ["/var/lib/vms/100/efivars.fd"]  # the one the VM writes


def test_a_vms_tpm_state_is_kept_with_its_snapshots_and_backups(env):
    """A real swtpm behind the VM's TPM: its state files' contents go into
    the snapshot's definition, and the backup's manifest keeps them."""
    import base64

    from agent.repo.backup import backup

    pool, start, tmp = env
    vol = pool.create_volume(nid(), "tpm", 8 * MiB).uuid
    vm = start(pool.head_path(vol), tpm=True)
    deadline = time.monotonic() + 10
    while not list(vm.tpm_state.glob("tpm2-*")):  # swtpm writes its state once qemu set the TPM up
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s1 = nid()
    info = pool.create_snapshot(vol, s1, "s1")
    definition = json.loads(info.vm_definition)
    (state,) = [str(p) for p in vm.tpm_state.glob("tpm2-*")]
    assert definition["tpm"] == [state]
    assert base64.b64decode(definition["files"][state]) == open(state, "rb").read()
    repo = Repository.init(LocalStore(str(tmp / "bp")), chunk_size=CS)
    m = backup(pool, vol, s1, repo)
    assert json.loads(repo.manifest(m.backup_id).vm.definition)["files"][state] == definition["files"][state]


def test_a_vms_state_files_are_kept_by_content(tmp_path):
    import base64

    nvram = tmp_path / "efivars.fd"
    nvram.write_bytes(os.urandom(128 << 10))
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(STATE_FILE_LIMIT + 1)
    got = state_files([str(nvram), str(tmp_path / "gone"), str(big)])
    assert list(got) == [str(nvram)] and base64.b64decode(got[str(nvram)]) == nvram.read_bytes()


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
    assert m1.format_version == 2 and m1.vm.consistency == "crash"  # the VM is kept with the backup
    assert json.loads(m1.vm.definition)["argv"][0] == "qemu-system-x86_64"
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


def _set(pool, *vols, **kw):
    reqs = [SnapshotRequest(pool.pool_uuid, v, nid(), f"set-{nid()[:8]}") for v in vols]
    return pool.create_snapshot_set(reqs, **kw)


@pytest.fixture
def fake_qga(short_tmp):
    agents = []

    def make(mode: str) -> FakeGuestAgent:
        agents.append(FakeGuestAgent(str(short_tmp / f"qga-{mode}-{len(agents)}.sock"), mode))
        return agents[-1]

    yield make
    for a in agents:
        a.close()


def test_a_vms_disks_are_one_point_in_time_inside_a_guest_freeze(env, fake_qga):
    pool, start, tmp = env
    vols = [pool.create_volume(nid(), f"disk{i}", 8 * MiB).uuid for i in range(2)]
    ga = fake_qga("ok")
    vm = start(*(pool.head_path(v) for v in vols), qga=ga.path)
    vm.write(0, 0x41, 0, MiB)
    vm.write(1, 0x42, MiB, MiB)
    before = time.monotonic()
    snaps = _set(pool, *vols)
    after = time.monotonic()
    vm.write(0, 0x43, 0, 8 * MiB)  # after the set: in neither snapshot
    vm.write(1, 0x44, 0, 8 * MiB)
    assert snaps.consistency == "application" and snaps.vm == "vm" and snaps.reason == ""
    assert [s.consistency for s in snaps.snapshots] == ["application"] * 2
    assert 0 < snaps.switch_ms <= snaps.frozen_ms
    calls = [c for c in ga.calls if c[0] != "guest-sync-delimited"]
    assert [c for c, _ in calls] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert before < calls[0][1] < calls[1][1] < after
    assert pool.list_snapshots(vols[0])[0].consistency == "application"  # kept in the volume's metadata
    definition = json.loads(snaps.vm_definition)  # how to start the VM again, kept with every snapshot
    assert definition["type"] == "qemu" and vm.uuid in definition["argv"] and definition["nvram"] == []
    assert pool.list_snapshots(vols[1])[0].vm_definition == snaps.vm_definition

    from agent.repo.backup import backup

    repo = Repository.init(LocalStore(str(tmp / "bp")), chunk_size=CS)
    expected = [b"\x41" * MiB + bytes(7 * MiB), bytes(MiB) + b"\x42" * MiB + bytes(6 * MiB)]
    for vol, snap, want in zip(vols, snaps.snapshots, expected, strict=True):
        m = backup(pool, vol, snap.uuid, repo, name="set")
        new_vol, written = restore_to_qcow2(pool, repo, m, tmp)
        assert written == m.image_digest
        assert raw_of(pool.head_path(new_vol), tmp) == raw_of(pool.snap_path(vol, snap.uuid), tmp) == want


@pytest.mark.parametrize("mode", ["absent", "fail", "hang"])
def test_without_a_working_guest_agent_the_set_is_crash_consistent(env, fake_qga, mode):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "noagent", 8 * MiB).uuid
    ga = None if mode == "absent" else fake_qga(mode)
    vm = start(pool.head_path(vol), qga="server" if ga is None else ga.path)  # absent: a channel, no guest OS
    vm.write(0, 0x51, 0, MiB)
    began = time.monotonic()
    snaps = _set(pool, vol, freeze_timeout=1.0)
    took = time.monotonic() - began
    vm.write(0, 0x52, 0, MiB)
    assert snaps.consistency == "crash" and snaps.snapshots[0].consistency == "crash" and snaps.frozen_ms == 0
    assert took < 5
    assert raw_of(pool.snap_path(vol, snaps.snapshots[0].uuid), tmp)[:MiB] == b"\x51" * MiB
    if mode == "absent":
        assert "no answer within 1s" in snaps.reason
    elif mode == "fail":
        assert "Device or resource busy" in snaps.reason and ga.names()[-1] == "guest-fsfreeze-thaw"
    else:  # the thaw is sent after a freeze that did not answer, for when the guest gets to it
        assert "no answer" in snaps.reason and ga.names()[-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


def test_no_guest_agent_channel_and_no_freeze_asked(env):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "plain", 8 * MiB).uuid
    start(pool.head_path(vol))
    assert _set(pool, vol).reason == "the VM has no guest agent channel"
    assert _set(pool, vol, freeze=False).reason == "guest freeze not asked for"
    idle = pool.create_volume(nid(), "idle", 8 * MiB).uuid
    assert pool.create_snapshot(idle, nid(), "s").consistency == "offline"


def test_a_set_of_two_vms_disks_is_refused_and_changes_nothing(env):
    pool, start, tmp = env
    a, b, idle = (pool.create_volume(nid(), n, 8 * MiB).uuid for n in ("a", "b", "idle"))
    start(pool.head_path(a), name="vma")
    start(pool.head_path(b), name="vmb")
    with pytest.raises(InvalidArgument) as e:
        _set(pool, idle, a, b)
    assert e.value.field == "snapshots[2]" and "VM vmb" in e.value.message and "VM vma" in e.value.message
    assert all(pool.list_snapshots(v) == [] for v in (a, b, idle))
    with pytest.raises(InvalidArgument) as e:
        _set(pool, idle, idle)
    assert e.value.field == "snapshots" and "twice" in e.value.message
    mixed = _set(pool, idle, a)  # an idle volume with one VM's disk: one point in time too
    assert [len(pool.list_snapshots(v)) for v in (idle, a, b)] == [1, 1, 0] and mixed.vm == "vma"


def test_a_snapshot_set_through_the_agent_across_two_pools(make_agent, fake_qga, short_tmp):
    a = make_agent().start()
    ga = fake_qga("ok")
    disks = [(POOL_UUID, nid()), (POOL2_UUID, nid())]
    with a.client() as c:
        heads = [
            c.create_volume(pb.CreateVolumeRequest(pool_uuid=p, volume_uuid=v, name="d", capacity=8 * MiB)).access_path
            for p, v in disks
        ]
        vm = Vm(short_tmp, heads, name="twopools", qga=ga.path)
        try:
            vm.write(0, 0x61, 0, MiB)
            vm.write(1, 0x62, 0, MiB)
            reqs = [
                pb.CreateSnapshotRequest(pool_uuid=p, volume_uuid=v, snapshot_uuid=nid(), name="s") for p, v in disks
            ]
            got = c.create_snapshot_set(pb.CreateSnapshotSetRequest(snapshots=reqs))
            vm.write(0, 0x63, 0, MiB)
            assert got.consistency == "application" and got.vm == "twopools" and got.switch_ms > 0
            assert [s.consistency for s in got.snapshots] == ["application"] * 2
            listed = c.list_snapshots(pb.VolumeRef(pool_uuid=POOL2_UUID, volume_uuid=disks[1][1])).snapshots
            assert [s.consistency for s in listed] == ["application"]
            (listed_vm,) = [v for v in c.list_vms().vms if v.name == "twopools"]
            assert listed_vm.state == "running" and not listed_vm.guest_agent  # the fake is no guest
            assert [(d.device, d.pool_uuid, d.volume_uuid) for d in listed_vm.disks] == [
                ("vd0", POOL_UUID, disks[0][1]),
                ("vd1", POOL2_UUID, disks[1][1]),
            ]  # found after a live snapshot renamed their files
            shown = cli(a, "vms").stdout  # the host CLI
            assert "twopools" in shown and f"{POOL2_UUID}:{disks[1][1]}" in shown
            vols = [f"{p}:{v}" for p, v in disks]
            made = json.loads(cli(a, "--json", "snapshot-set", "by-cli", *vols, "--no-freeze").stdout)
            assert made["consistency"] == "crash" and made["reason"] == "guest freeze not asked for"
            assert [x["name"] for x in made["snapshots"]] == ["by-cli", "by-cli"]
            err = rpc_error(lambda: c.create_snapshot_set(pb.CreateSnapshotSetRequest(snapshots=reqs[:1])))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS  # same snapshot uuid again: nothing changed
            bad = pb.CreateSnapshotSetRequest(snapshots=reqs[:1], freeze_timeout=-1)
            err = rpc_error(lambda: c.create_snapshot_set(bad))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "freeze_timeout" in err.details()
        finally:
            vm.quit()
    assert a.stop() == 0


@pytest.mark.parametrize("drive", [False, True], ids=["blockdev", "drive"])
def test_deleting_snapshots_of_a_running_vm_merges_them_in_qemu(env, drive):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "merge", 8 * MiB).uuid
    head = pool.head_path(vol)
    vm = start(head, drive=drive)
    snaps = []
    for i, pattern in enumerate((0x71, 0x72, 0x73)):
        vm.write(0, pattern, i * MiB, MiB)
        snaps.append(nid())
        pool.create_snapshot(vol, snaps[-1], f"s{i}")  # head -> s2 -> s1 -> s0
    vm.write(0, 0x74, 3 * MiB, MiB)
    want = {s: raw_of(pool.snap_path(vol, s), tmp) for s in snaps}

    pool.delete_snapshot(vol, snaps[1])  # in the middle: s2 (read-only in qemu) takes s1's data
    assert [s.uuid for s in pool.list_snapshots(vol)] == [snaps[0], snaps[2]]
    assert raw_of(pool.snap_path(vol, snaps[2]), tmp) == want[snaps[2]]
    assert pool.snapshot_info(vol, snaps[2]).tracking == "lost"  # its bitmap could not take s1's
    with pytest.raises(TrackingLost):
        pool.changed_extents(vol, snaps[2], snaps[0])

    pool.delete_snapshot(vol, snaps[0])  # the root: s2 keeps its tracking state, nothing is older
    pool.delete_snapshot(vol, snaps[2])  # under the head: the head (read-write) takes it, bitmap merged
    assert pool.list_snapshots(vol) == [] and not os.listdir(pool.snap_dir(vol))
    vm.write(0, 0x75, 4 * MiB, MiB)  # the guest keeps writing, to the one file left
    vm.flush(0)
    expected = b"".join(bytes([p]) * MiB for p in (0x71, 0x72, 0x73, 0x74, 0x75)) + bytes(3 * MiB)
    assert raw_of(head, tmp) == expected
    assert vm.qmp("query-block")[0]["inserted"]["backing_file_depth"] == 0
    nodes = [n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)]
    assert len(nodes) == 2  # the head's format and file nodes: no released layer stays open
    s = nid()
    pool.create_snapshot(vol, s, "after")  # and the next live snapshot still works
    assert raw_of(pool.snap_path(vol, s), tmp) == expected


def test_a_layer_qemu_would_reopen_by_a_stale_name_is_not_merged_into(env):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "stale", 8 * MiB).uuid
    old = nid()
    pool.create_snapshot(vol, old, "before-start")  # idle: head -> old
    vm = start(pool.head_path(vol), drive=True)  # qemu names the head's file node itself
    vm.write(0, 0x81, 0, MiB)
    new = nid()
    pool.create_snapshot(vol, new, "live")  # the VM's first head is now layer `new`, under its old name
    with pytest.raises(FailedPrecondition) as e:
        pool.delete_snapshot(vol, old)  # would stream into `new`: qemu reopens it read-write by name
    assert "stop the VM" in e.value.message and e.value.field == "snapshot_uuid"
    assert [s.uuid for s in pool.list_snapshots(vol)] == [old, new]
    vm.write(0, 0x82, 0, MiB)
    vm.flush(0)
    assert raw_of(pool.snap_path(vol, new), tmp)[:MiB] == b"\x81" * MiB
    assert raw_of(pool.head_path(vol), tmp)[:MiB] == b"\x82" * MiB
    with pytest.raises(InUse) as e:
        pool.rollback_snapshot(vol, new)
    assert "stop it first" in e.value.message
    vm.quit()
    pool.delete_snapshot(vol, old)  # stopped: the offline path
    assert [s.uuid for s in pool.list_snapshots(vol)] == [new]


class _Ctx:
    job_id = "live-clone"
    bandwidth_limit = 0

    def progress(self, done, total=None, phase=None):
        pass

    def checkpoint(self):
        pass


def test_linked_and_full_clones_of_a_live_snapshot(env):
    pool, start, tmp = env
    vol = pool.create_volume(nid(), "origin", 8 * MiB).uuid
    vm = start(pool.head_path(vol))
    vm.write(0, 0x91, 0, 2 * MiB)
    snap = nid()
    pool.create_snapshot(vol, snap, "s")
    vm.write(0, 0x92, 0, 8 * MiB)  # the VM keeps writing while both clones are made
    want = b"\x91" * (2 * MiB) + bytes(6 * MiB)
    linked = pool.linked_clone(pool, vol, snap, nid(), "linked")
    full, _ = pool.full_clone(pool, vol, snap, nid(), "full", _Ctx())
    for clone in (linked, full):
        assert raw_of(pool.head_path(clone.uuid), tmp) == want


def test_the_controller_lists_each_hosts_running_vms(short_tmp, make_agent):
    c = Controller(short_tmp / "ctl")
    vm = None
    try:
        host = nid()
        a = make_agent(
            f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
            f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n[vms]\nreport_interval = 1.0\n'
        ).start()
        vol = nid()
        with a.client() as ac:
            head = ac.create_volume(
                pb.CreateVolumeRequest(pool_uuid=POOL_UUID, volume_uuid=vol, name="d", capacity=8 * MiB)
            ).access_path
        vm = Vm(short_tmp, [head], name="inventoried")
        with a.client() as ac:  # a live snapshot renames the file qemu opened: the head is still found
            ac.create_snapshot(
                pb.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=vol, snapshot_uuid=nid(), name="s")
            )
        with c.client("op") as op:
            deadline = time.monotonic() + 30
            while not (vms := check_ok(op.get("/v1/vms"))["list"]):
                assert time.monotonic() < deadline, "no VM reported"
                time.sleep(0.3)
            assert vms == [
                {
                    "UUID": vm.uuid,
                    "Name": "inventoried",
                    "State": "running",
                    "GuestAgent": False,
                    "Manager": "qemu",
                    "Disks": [{"Device": "vd0", "File": head, "PoolUUID": POOL_UUID, "VolumeUUID": vol}],
                    "HostUUID": host,
                    "HostState": "online",
                }
            ]
            assert check_ok(op.get(f"/v1/hosts/{host}/vms"))["list"] == vms
            check_error(op.get(f"/v1/hosts/{nid()}/vms"), 404, "host_uuid")
            vm.quit()
            deadline = time.monotonic() + 30
            while check_ok(op.get("/v1/vms"))["list"]:  # gone at the next scan
                assert time.monotonic() < deadline, "a stopped VM stays listed"
                time.sleep(0.3)
        assert a.stop() == 0
    finally:
        if vm is not None:
            vm.quit()
        c.stop()


def test_rbd_disks_of_a_running_vm_snapshot_as_one_set(short_tmp, ceph, fake_qga):
    """Two RBD volumes a VM runs on with qemu's rbd driver (qemu holds their
    exclusive locks): one set inside a guest freeze, the VM paused around the
    two image snapshots, each snapshot the data of that instant."""
    import rbd

    rp = ceph.rbd_pool(hypervisor=QemuHypervisor())
    vols = [rp.create_volume(nid(), f"rbd{i}", 8 * MiB).uuid for i in range(2)]
    ga = fake_qga("ok")
    spec = {"driver": "rbd", "pool": "rbd", "conf": str(ceph.conf), "user": "admin"}
    vm = Vm(short_tmp, [dict(spec, image=v) for v in vols], name="rbdvm", qga=ga.path)
    try:
        vm.write(0, 0xA1, 0, MiB)
        vm.write(1, 0xA2, MiB, MiB)
        got = _set(rp, *vols)
        vm.write(0, 0xA3, 0, 8 * MiB)  # after the set
        vm.write(1, 0xA4, 0, 8 * MiB)
        assert got.vm == "rbdvm" and got.consistency == "application" and got.switch_ms > 0  # the pause
        assert [s.consistency for s in rp.list_snapshots(vols[0])] == ["application"]
        assert vm.uuid in json.loads(rp.list_snapshots(vols[1])[0].vm_definition)["argv"]
        assert [c for c, _ in ga.calls if c != "guest-sync-delimited"] == [
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw",
        ]
        assert vm.qmp("query-status")["status"] == "running"  # resumed
        want = [b"\xa1" * MiB + bytes(7 * MiB), bytes(MiB) + b"\xa2" * MiB + bytes(6 * MiB)]
        with rp.ioctx() as io:
            for vol, snap, data in zip(vols, got.snapshots, want, strict=True):
                with rbd.Image(io, vol, snapshot=snap.uuid, read_only=True) as img:
                    assert img.read(0, 8 * MiB) == data
        one = rp.create_snapshot(vols[0], nid(), "alone")  # one image: frozen, not paused
        assert one.consistency == "application"
    finally:
        vm.quit()
    idle = rp.create_volume(nid(), "idle", 8 * MiB).uuid
    assert rp.create_snapshot(idle, nid(), "s").consistency == "offline"
    for v in (*vols, idle):
        rp.delete_volume(v, force=True)


def test_a_vm_on_qcow2_and_two_rbd_pools_snapshots_as_one_set(rbd_agent, ceph, short_tmp, fake_qga):
    """One instant across drivers: a VM with a qcow2 disk and disks in two
    RBD pools; the agent freezes the guest once and pauses the VM around
    every part."""
    from agent import native

    from support.agents import RBD2_POOL_UUID, RBD_POOL_UUID
    from support.volumes import Vol

    c = rbd_agent.client()
    v = Vol(rbd_agent, c)
    q = v.create(capacity=8 * MiB, name="q").uuid
    r1 = v.create(capacity=8 * MiB, name="r1", pool_uuid=RBD_POOL_UUID).uuid
    r2 = v.create(capacity=8 * MiB, name="r2", pool_uuid=RBD2_POOL_UUID).uuid
    ga = fake_qga("ok")
    spec = {"driver": "rbd", "conf": str(ceph.conf), "user": "admin"}
    disks = [v.head(q), dict(spec, pool="rbd", image=r1), dict(spec, pool="rbd2", image=r2)]
    vm = Vm(short_tmp, disks, name="mixed", qga=ga.path)
    try:
        for i in range(3):
            vm.write(i, 0xB0 + i, i * MiB, MiB)
        reqs = [
            pb.CreateSnapshotRequest(pool_uuid=p, volume_uuid=vol, snapshot_uuid=nid(), name="mixed")
            for p, vol in ((POOL_UUID, q), (RBD_POOL_UUID, r1), (RBD2_POOL_UUID, r2))
        ]
        got = c.create_snapshot_set(pb.CreateSnapshotSetRequest(snapshots=reqs))
        for i in range(3):
            vm.write(i, 0xC0 + i, 0, 8 * MiB)  # after the set
        assert (got.vm, got.consistency) == ("mixed", "application") and got.switch_ms > 0
        assert [s.uuid for s in got.snapshots] == [r.snapshot_uuid for r in reqs]
        assert {s.consistency for s in got.snapshots} == {"application"}
        assert [n for n, _ in ga.calls if n != "guest-sync-delimited"] == [
            "guest-fsfreeze-freeze",
            "guest-fsfreeze-thaw",
        ]  # once for the three parts
        assert vm.qmp("query-status")["status"] == "running"
        for i, r in enumerate(reqs):
            want = bytearray(8 * MiB)
            want[i * MiB : (i + 1) * MiB] = bytes([0xB0 + i]) * MiB
            ref = native.RefImageHash()
            ref.update(bytes(want))
            assert v.digest(r.volume_uuid, r.snapshot_uuid, pool=r.pool_uuid) == ref.digest().hex()
        # all or none: a set naming a disk of no VM beside the VM's is refused, nothing taken
        idle = v.create(capacity=8 * MiB, name="idle", pool_uuid=RBD_POOL_UUID).uuid
        bad = [
            pb.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=q, snapshot_uuid=nid(), name="bad"),
            pb.CreateSnapshotRequest(pool_uuid=RBD_POOL_UUID, volume_uuid=idle, snapshot_uuid=nid(), name="bad"),
        ]
        e = rpc_error(c.create_snapshot_set, pb.CreateSnapshotSetRequest(snapshots=bad))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and idle in e.details()
        assert [s.name for s in v.call("ListSnapshots", volume_uuid=q).snapshots] == ["mixed"]
        assert vm.qmp("query-status")["status"] == "running"
    finally:
        vm.quit()
        c.close()


def _ext4_features(layer: str, tmp) -> tuple[set[str], int]:
    """The ext4 features of a layer's filesystem, and e2fsck -fn's exit code."""
    raw = tmp / f"{nid()}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", layer, str(raw)], check=True)
    out = subprocess.run(["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("Filesystem features:"))
    rc = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True).returncode
    raw.unlink()
    return set(line.split(":", 1)[1].split()), rc


def test_a_real_guest_freezes_its_filesystem_for_the_snapshot(env):
    """A real guest (Debian's kernel, busybox, qemu-guest-agent; TCG) writes
    to ext4 on the volume without pause. Frozen, the snapshot's filesystem
    is clean as after an unmount: ext4 cleared needs_recovery when it froze;
    without the freeze, the snapshot is what a power cut leaves."""
    from agent.hypervisor.qga import GuestAgent

    from support import guest

    pool, start, tmp = env
    kernel, initrd = guest.build()
    vol = pool.create_volume(nid(), "guestdata", 64 * MiB).uuid
    head = pool.head_path(vol)
    raw = tmp / "fs.raw"
    subprocess.run(["truncate", "-s", str(64 * MiB), str(raw)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), head], check=True)
    vm = start(head, name="realguest", qga="server", boot=(kernel, initrd))
    deadline = time.monotonic() + 120
    while not vm.console.exists() or "GUEST-READY" not in vm.console.read_text(errors="replace"):
        assert vm.proc.poll() is None and time.monotonic() < deadline, vm.console.read_text(errors="replace")[-3000:]
        time.sleep(0.2)
    while True:
        with QemuHypervisor().holder(head) as found:
            if found.summary().guest_agent:  # qemu-ga opened its port in the guest
                break
        assert time.monotonic() < deadline, "the guest agent never opened its channel"
        time.sleep(0.2)

    frozen = _set(pool, vol, freeze_timeout=60)
    assert frozen.consistency == "application" and frozen.reason == "" and frozen.frozen_ms > 0
    crash = _set(pool, vol, freeze=False)
    assert crash.consistency == "crash"
    with GuestAgent(vm.qga_path, timeout=60) as ga:  # the guest's own view: thawed again
        ga.sync()
        assert ga.execute("guest-fsfreeze-status") == "thawed"
    assert "GUEST-NO-DATA" not in vm.console.read_text(errors="replace")
    features, rc = _ext4_features(pool.snap_path(vol, frozen.snapshots[0].uuid), tmp)
    assert "has_journal" in features and "needs_recovery" not in features and rc == 0
    features, _ = _ext4_features(pool.snap_path(vol, crash.snapshots[0].uuid), tmp)
    assert "needs_recovery" in features  # mounted and written, never frozen


def test_a_scan_skips_a_vm_whose_monitor_is_busy(env):
    """qemu greets a monitor client only when the one before left: a scan of
    the host's VMs waits a short while for a busy one and goes on."""
    import socket

    pool, start, tmp = env
    busy = start(pool.head_path(pool.create_volume(nid(), "b", 8 * MiB).uuid), name="busy")
    start(pool.head_path(pool.create_volume(nid(), "f", 8 * MiB).uuid), name="free")
    with socket.socket(socket.AF_UNIX) as holder:
        holder.connect(busy.qmp_path)  # another client holds the monitor
        holder.recv(4096)
        began = time.monotonic()
        vms = QemuHypervisor().running_vms()
        took = time.monotonic() - began
        names = [vm.name for vm in vms]
        for vm in vms:
            vm.close()
    assert "free" in names and "busy" not in names and took < 5
