"""Live backups of VMs a libvirtd manages, against a real session-mode
libvirtd (run as an unprivileged user) and its type='qemu' domains: the
agent uses libvirt's checkpoint and pull-backup API, never raw QMP; every
backup restores to exactly what the guest had written at the backup's
instant."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as pb
from agent.hypervisor.libvirt import LibvirtHypervisor
from agent.volumes.nbd import NbdClient

from support.agents import BP_UUID, POOL_UUID, write_config
from support.backups import OK, Bk, nid
from support.cli import cli
from support.libvirtd import SessionLibvirtd
from support.volumes import rpc_error

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture(scope="module")
def env(libvirtd):
    work = libvirtd.base.parent / f"agent-{nid()[:8]}"
    work.mkdir()
    work.chmod(0o755)
    agent = write_config(
        work,
        f"""
        [vms]
        libvirt_uri = "{libvirtd.uri}"
        libvirt_work_dir = "{work}/pull"
        report_interval = 1.0
        """,
    ).start()
    c = agent.client()
    yield agent, Bk(agent, c), libvirtd
    libvirtd.clear()
    c.close()
    agent.stop()


class Guest:
    """What the guest wrote, to compare restores with."""

    def __init__(self, vm, ndisks: int):
        self.vm = vm
        self.data = [bytearray(SIZE) for _ in range(ndisks)]

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        self.vm.write(disk, pattern, offset, length)
        self.data[disk][offset : offset + length] = bytes([pattern]) * length

    def now(self) -> list[bytes]:
        return [bytes(d) for d in self.data]


def vm_backup(bk: Bk, vols: list[str], **kw):
    disks = [jobs_pb2.VmBackupDisk(pool_uuid=POOL_UUID, volume_uuid=v, backup_uuid=nid()) for v in vols]
    job = bk.c.run(f"vmb-{nid()}", vm_backup=jobs_pb2.VmBackupSpec(backup_point_uuid=BP_UUID, disks=disks, **kw))
    assert job.state == OK, job.error
    return job.vm_backup_result


def restored(bk: Bk, backup_uuid: str) -> bytes:
    r = bk.restore(backup_uuid)
    raw = f"{r.access_path}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", r.access_path, raw], check=True)
    with open(raw, "rb") as f:
        data = f.read()
    os.unlink(raw)
    return data


def new_vm(bk: Bk, libvirtd: SessionLibvirtd, n: int):
    vols = [bk.create(capacity=SIZE, name=f"disk{i}").uuid for i in range(n)]
    from pathlib import Path

    vm = libvirtd.vm([Path(bk.head(v)) for v in vols])
    return vols, vm, Guest(vm, n)


def test_a_libvirt_vm_is_backed_up_live_as_one_set_then_incrementally(env):
    agent, bk, libvirtd = env
    vols, vm, guest = new_vm(bk, libvirtd, 2)
    guest.write(0, 0xAA, 0, 4 * MiB)
    guest.write(1, 0x11, 2 * MiB, MiB)
    first = vm_backup(bk, vols, name="first")
    expected1 = guest.now()
    assert [b.mode for b in first.backups] == ["full", "full"]
    assert first.consistency == "crash" and "guest agent" in first.reason  # no guest OS: no agent answers
    assert first.vm == vm.name and first.checkpoint.startswith("bf-")
    definition = json.loads(first.vm_definition)
    assert definition["type"] == "libvirt" and f"<name>{vm.name}</name>" in definition["xml"]
    kept = {b.uuid: b for b in bk.list(volume_uuid=vols[0])}[first.backups[0].backup_uuid]
    assert (kept.consistency, kept.vm_definition) == ("crash", first.vm_definition)  # in the repository

    guest.write(0, 0xBB, 8 * MiB, MiB)  # after the first backup: only in the second
    guest.write(1, 0x22, 0, 512)
    second = vm_backup(bk, vols, name="second")
    expected2 = guest.now()
    assert [b.mode for b in second.backups] == ["incremental", "incremental"]
    assert [b.chunks_read for b in second.backups] == [1, 1]  # libvirt's dirty bitmap since the first checkpoint
    assert [b.parent_backup_uuid for b in second.backups] == [b.backup_uuid for b in first.backups]
    assert second.pruned_checkpoints == [first.checkpoint]  # only the newest is needed
    lv = LibvirtHypervisor(libvirtd.uri)
    assert [c[0] for c in lv.holder(bk.head(vols[0])).checkpoints()] == [second.checkpoint]

    for result, expected in ((first, expected1), (second, expected2)):
        for disk, b in enumerate(result.backups):
            assert restored(bk, b.backup_uuid) == expected[disk]

    # the VM in the host's report, its disks mapped to the volumes
    deadline = time.monotonic() + 10
    while True:
        vms = {v.name: v for v in bk.c.list_vms().vms}
        if vm.name in vms:
            break
        assert time.monotonic() < deadline, vms
        time.sleep(0.2)
    assert [d.volume_uuid for d in vms[vm.name].disks] == vols

    # the host CLI: one line per disk, incremental from the second backup's checkpoint
    guest.write(1, 0x33, 5 * MiB, MiB)
    out = cli(agent, "vm-backup", BP_UUID, *(f"{POOL_UUID}:{v}" for v in vols)).stdout
    assert out.startswith(f"{vm.name}: crash") and out.count("incremental") == 2, out
    backup_of_disk1 = out.splitlines()[2].split()[2]
    assert restored(bk, backup_of_disk1) == guest.now()[1]


def test_the_pull_export_keeps_its_instant_while_the_guest_writes(env, tmp_path):
    agent, bk, libvirtd = env
    vols, vm, guest = new_vm(bk, libvirtd, 1)
    guest.write(0, 0x5A, 0, 2 * MiB)
    expected = guest.now()[0]
    lvm = LibvirtHypervisor(libvirtd.uri).holder(bk.head(vols[0]))
    work = libvirtd.base / f"pull-{nid()[:8]}"
    work.mkdir()
    import shutil

    shutil.chown(work, "nobody", "nogroup")
    with lvm.pull_backup({"vda": ""}, f"bf-{nid()}", "test", str(work)) as exports:
        guest.write(0, 0xC3, 0, 4 * MiB)  # the guest goes on: qemu keeps the old data in the scratch file
        ex = exports["vda"]
        with NbdClient(ex.socket, export=ex.export) as c:
            assert c.pread(4 * MiB, 0) == expected[: 4 * MiB]
    assert vm.dom.jobInfo()[0] == 0  # the backup job ended with the block (VIR_DOMAIN_JOB_NONE)


def test_a_checkpoint_gone_or_unusable_falls_back_to_reading_everything(env):
    agent, bk, libvirtd = env
    vols, vm, guest = new_vm(bk, libvirtd, 1)
    guest.write(0, 0x01, 0, MiB)
    first = vm_backup(bk, vols)
    lvm = LibvirtHypervisor(libvirtd.uri).holder(bk.head(vols[0]))
    lvm.delete_checkpoint(first.checkpoint)  # an operator deleted it
    guest.write(0, 0x02, 4 * MiB, MiB)
    second = vm_backup(bk, vols)
    b = second.backups[0]
    assert b.mode == "fallback" and first.checkpoint in b.mode_reason
    assert restored(bk, b.backup_uuid) == guest.now()[0]

    # qemu killed: libvirt keeps the checkpoint, but its bitmap was never stored
    vm.kill()
    vm.dom.create()
    guest.write(0, 0x03, 12 * MiB, MiB)
    third = vm_backup(bk, vols)
    b = third.backups[0]
    assert b.mode == "fallback", b.mode_reason
    assert restored(bk, b.backup_uuid) == guest.now()[0]
    fourth = vm_backup(bk, vols)  # and tracking works again from the new checkpoint
    assert fourth.backups[0].mode == "incremental" and fourth.backups[0].chunks_read == 0


def test_the_layer_model_is_refused_for_a_libvirt_vm_with_the_way_out(env):
    agent, bk, libvirtd = env
    vols, vm, guest = new_vm(bk, libvirtd, 1)
    e = rpc_error(
        bk.c.create_snapshot,
        pb.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=vols[0], snapshot_uuid=nid(), name="s"),
    )
    assert e.code().name == "FAILED_PRECONDITION"
    assert f"libvirt domain {vm.name}" in e.details() and "vm_backup" in e.details()

    # a volume of no libvirt VM, and disks of two VMs, are refused naming the field
    idle = bk.create(capacity=SIZE, name="idle").uuid
    disks = [jobs_pb2.VmBackupDisk(pool_uuid=POOL_UUID, volume_uuid=idle, backup_uuid=nid())]
    e = rpc_error(bk.c.submit, f"vmb-{nid()}", vm_backup=jobs_pb2.VmBackupSpec(backup_point_uuid=BP_UUID, disks=disks))
    assert e.code().name == "FAILED_PRECONDITION" and "disks[0]" in e.details()
    other, _, _ = new_vm(bk, libvirtd, 1)
    disks = [jobs_pb2.VmBackupDisk(pool_uuid=POOL_UUID, volume_uuid=v, backup_uuid=nid()) for v in (vols[0], other[0])]
    e = rpc_error(bk.c.submit, f"vmb-{nid()}", vm_backup=jobs_pb2.VmBackupSpec(backup_point_uuid=BP_UUID, disks=disks))
    assert e.code().name == "FAILED_PRECONDITION" and "disks[1]" in e.details() and vm.name in e.details()


def test_a_libvirt_vms_tpm_state_is_kept_with_its_backup(env):
    """libvirt's swtpm keeps the VM's TPM under its uuid: the backup's
    definition holds the state file's contents."""
    import base64
    from pathlib import Path

    agent, bk, libvirtd = env
    vol = bk.create(capacity=SIZE, name="tpm").uuid
    vm = libvirtd.vm([Path(bk.head(vol))], tpm=True)
    result = vm_backup(bk, [vol])
    definition = json.loads(result.vm_definition)
    (state,) = definition["tpm"]
    assert vm.dom.UUIDString() in state and state.endswith(".permall")
    assert base64.b64decode(definition["files"][state]) == open(state, "rb").read()
    kept = {b.uuid: b for b in bk.list(volume_uuid=vol)}[result.backups[0].backup_uuid]
    assert json.loads(kept.vm_definition)["files"][state] == definition["files"][state]


def test_rbd_disks_of_a_libvirt_vm_snapshot_as_one_set(libvirtd, ceph, short_tmp):
    """libvirt 9 checkpoints only qcow2 disks; a libvirt VM's RBD disks are
    snapshotted by Ceph while it runs: one set, the VM paused through
    libvirt around the images' snapshots."""
    import stat

    from agent import native

    from support.agents import RBD_POOL_UUID

    for p in (ceph.root, ceph.conf):  # the session's qemu (nobody) reads the cluster's ceph.conf
        p.chmod(p.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
    work = short_tmp / "rbd-agent"
    work.mkdir()
    agent = write_config(work, ceph.pool_section(RBD_POOL_UUID) + f'[vms]\nlibvirt_uri = "{libvirtd.uri}"\n').start()
    c = agent.client()
    bk = Bk(agent, c)
    try:
        vols = [bk.create(capacity=SIZE, name=f"r{i}", pool_uuid=RBD_POOL_UUID).uuid for i in range(2)]
        vm = libvirtd.vm([], rbd=(ceph.conf, [f"rbd/{v}" for v in vols]))
        guest = Guest(vm, 2)
        guest.write(0, 0x61, 0, MiB)
        guest.write(1, 0x62, 2 * MiB, MiB)
        want = guest.now()
        reqs = [
            pb.CreateSnapshotRequest(pool_uuid=RBD_POOL_UUID, volume_uuid=v, snapshot_uuid=nid(), name="set")
            for v in vols
        ]
        got = c.create_snapshot_set(pb.CreateSnapshotSetRequest(snapshots=reqs))
        guest.write(0, 0x63, 0, 4 * MiB)  # after the set
        assert (got.vm, got.consistency) == (vm.name, "crash") and got.switch_ms > 0  # paused through libvirt
        assert vm.dom.state()[0] == 1  # running again
        assert json.loads(got.vm_definition)["type"] == "libvirt"
        for r, data in zip(reqs, want, strict=True):
            ref = native.RefImageHash()
            ref.update(data)
            assert bk.digest(r.volume_uuid, r.snapshot_uuid, pool=RBD_POOL_UUID) == ref.digest().hex()
        # a vm_backup of them is refused, saying what works
        disks = [jobs_pb2.VmBackupDisk(pool_uuid=RBD_POOL_UUID, volume_uuid=vols[0], backup_uuid=nid())]
        e = rpc_error(
            bk.c.submit, f"vmb-{nid()}", vm_backup=jobs_pb2.VmBackupSpec(backup_point_uuid=BP_UUID, disks=disks)
        )
        assert e.code().name == "FAILED_PRECONDITION" and "snapshot set" in e.details()
    finally:
        libvirtd.clear()
        c.close()
        agent.stop()
