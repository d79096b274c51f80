"""Instant restore against a real agent: the new volume is a qcow2 overlay
on the backup's NBD export (nbdkit), usable at once. A real qemu-system VM
starts on it while the job waits, writes through it, and its own
block-stream copies the rest in; the export then ends and the VM's disk
still reads everything. Without a VM, qemu-img copies and the volume's
digest is the backup's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

from agent.api.v1 import jobs_pb2

from support.agents import BP_UUID, POOL_UUID
from support.backups import Bk
from support.vms import Vm
from support.volumes import MiB

SIZE = 8 * MiB


def backing(path: str) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path], capture_output=True).stdout)
    return info.get("backing-filename")


def raw_bytes(path: str, tmp) -> bytes:
    out = tmp / f"{uuid.uuid4()}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(out)], check=True)
    return out.read_bytes()


def test_instant_restore_with_a_vm_and_without(make_agent, short_tmp):
    a = make_agent().start()
    data = {0: os.urandom(MiB), 5 * MiB: os.urandom(2 * MiB)}  # chunks 1-4 and 7 are zeros
    want = bytearray(SIZE)
    for off, chunk in data.items():
        want[off : off + len(chunk)] = chunk
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=SIZE, name="src").uuid
        bk.write(vol, data)
        snap = bk.snap(vol, "s").uuid
        backup = bk.backup(vol, snap)

        # without a VM, through the CLI: ready at once, copied by qemu-img, the backup's digest
        r = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--socket", str(a.socket), "restore", BP_UUID]
            + [backup.backup_uuid, POOL_UUID, "--name", "quick", "--instant"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "copied by qemu-img; export ended" in r.stdout, (r.stdout, r.stderr)
        quick = next(v for v in bk.call("ListVolumes").volumes if v.name == "quick")
        assert backing(quick.access_path) is None and not c.list_exports().exports
        assert bk.digest(quick.uuid) == backup.image_digest
        assert raw_bytes(quick.access_path, short_tmp) == bytes(want)

        # with a VM: it starts on the volume while the job waits, writes, and its qemu copies
        job_id = f"instant-{uuid.uuid4()}"
        c.submit(
            job_id,
            restore=jobs_pb2.RestoreSpec(
                backup_point_uuid=BP_UUID,
                backup_uuid=backup.backup_uuid,
                pool_uuid=POOL_UUID,
                volume_uuid=str(uuid.uuid4()),
                name="live",
                instant=True,
                wait_for_vm=60,
            ),
        )
        started = time.monotonic()
        while not (phase := c.get(job_id).progress.phase).startswith("ready at "):
            assert time.monotonic() - started < 30, phase
            time.sleep(0.05)
        head = phase.removeprefix("ready at ")
        print(f"volume ready {time.monotonic() - started:.2f} s after the request")
        assert backing(head).startswith("nbd+unix://")
        vm = Vm(short_tmp, [head], name="instant")
        try:
            vm.write(0, 0xAB, 4 * MiB, 64 * 1024)  # into a zero chunk of the backup, before the copy
            want[4 * MiB : 4 * MiB + 64 * 1024] = b"\xab" * (64 * 1024)
            while (job := c.get(job_id)).state not in (
                jobs_pb2.JOB_STATE_SUCCEEDED,
                jobs_pb2.JOB_STATE_FAILED,
                jobs_pb2.JOB_STATE_CANCELLED,
            ):
                assert time.monotonic() - started < 120
                time.sleep(0.1)
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            assert job.restore_result.instant_copy == "live"
            assert not c.list_exports().exports  # the export is gone: the VM's disk must not need it
            assert backing(head) is None
            for cmd in ("read -P 0xab 4M 64k", "read 0 1M", "read 5M 2M", "read -P 0 7M 1M"):
                out = vm.qmp(
                    "human-monitor-command",
                    **{"command-line": f'qemu-io -d /machine/peripheral/vd0/virtio-backend "{cmd}"'},
                )
                assert "fail" not in out.lower() and "error" not in out.lower(), (cmd, out)
            vm.flush(0)
        finally:
            vm.quit()
        assert raw_bytes(head, short_tmp) == bytes(want)
