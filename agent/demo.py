"""The README's main job, on the embedded default.

It starts a private blockferry-agent (unix socket, SQLite job journal, a
local directory pool and a local directory backup point), then on a qcow2
volume: writes data as a guest would (through qemu-nbd), snapshots it, takes
a full backup, changes a little, snapshots again, shows the changed extents
from the dirty bitmaps, takes an incremental backup that reads only those,
restores both backups into new volumes, deep-verifies them, checks every
digest against an independent reading, and stops the agent with SIGTERM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from agent import native
from agent.api.v1 import backups_pb2 as b
from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.client import AgentClient, Target

POOL_UUID = "6f1c2b0e-0d7a-4c55-9a38-000000000001"
BP_UUID = "6f1c2b0e-0d7a-4c55-9a38-000000000002"
CAPACITY = 1 << 30
MiB = 1 << 20


def reference_digest(path: str, workdir: str) -> str:
    """Independent check: qemu-img converts to raw, hashlib hashes it (streamed)."""
    import hashlib

    raw = os.path.join(workdir, "reference.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
    outer = hashlib.sha256()
    size = 0
    try:
        with open(raw, "rb") as f:
            while block := f.read(native.IMAGE_BLOCK_SIZE):
                outer.update(hashlib.sha256(block).digest())
                size += len(block)
    finally:
        os.unlink(raw)
    outer.update(size.to_bytes(8, "little"))
    return outer.hexdigest()


def guest_write(path: str, writes: dict[int, bytes], run_dir: str) -> None:
    """Write as a VM would: through a writable qemu-nbd (dirty bitmap on)."""
    from agent.volumes.nbd import NbdClient, QemuNbd

    with QemuNbd(path, readonly=False, run_dir=run_dir) as srv, NbdClient(srv.socket) as c:
        for off, data in writes.items():
            c.pwrite(data, off)
        c.flush()


def step(text: str) -> None:
    print(f"== {text}", flush=True)


def run_demo(workdir: str | None) -> int:
    from agent.cli import follow, human

    workdir = os.path.abspath(workdir or os.path.join(os.path.expanduser("~"), ".local/share/blockferry-demo"))
    pool_root = os.path.join(workdir, "pool")
    bp_root = os.path.join(workdir, "backups")
    run_dir = os.path.join(workdir, "run")
    os.makedirs(pool_root, exist_ok=True)
    sock = os.path.join(workdir, "agent.sock")
    conf = os.path.join(workdir, "agent.toml")
    with open(conf, "w") as f:
        f.write(f'[agent]\nstate_dir = "{workdir}/state"\nrun_dir = "{run_dir}"\nroots = ["{workdir}"]\n'
                f'log_format = "text"\n[grpc]\nunix_socket = "{sock}"\n'
                f'[pools.{POOL_UUID}]\ntype = "dir"\npath = "{pool_root}"\n'
                f'[backup_points.{BP_UUID}]\ntype = "local"\npath = "{bp_root}"\n')
    step(f"blockferry demo in {workdir}")
    agent = subprocess.Popen([sys.executable, "-m", "agent.server", "-c", conf],
                             stderr=open(os.path.join(workdir, "agent.log"), "ab"))
    ok = True
    try:
        with AgentClient(Target(socket=sock)) as client:
            client.wait_ready(timeout=30)
            info = client.host_info()
            step(f"agent {info.version} is up on {sock}; dir pool {POOL_UUID} at {pool_root}, "
                 f"backup point {BP_UUID} at {bp_root}")

            def call(method, msg):
                return client.volume_call(method, msg)

            vol = str(uuid.uuid4())
            created = call("CreateVolume", v.CreateVolumeRequest(pool_uuid=POOL_UUID, volume_uuid=vol,
                                                                 name="demo-disk", capacity=CAPACITY))
            step(f"created qcow2 volume {vol} ({human(created.capacity)}) at {created.access_path}")

            first = {off: os.urandom(MiB) for off in range(0, CAPACITY, 16 * MiB)}  # 64 MiB scattered
            guest_write(created.access_path, first, run_dir)
            s1 = call("CreateSnapshot", v.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=vol,
                                                                snapshot_uuid=str(uuid.uuid4()), name="s1"))
            step(f"wrote {len(first)} MiB as a guest would, took snapshot s1 {s1.uuid}")

            change = {off: os.urandom(64 << 10) for off in range(8 * MiB, CAPACITY, 64 * MiB)}
            guest_write(created.access_path, change, run_dir)
            s2 = call("CreateSnapshot", v.CreateSnapshotRequest(pool_uuid=POOL_UUID, volume_uuid=vol,
                                                                snapshot_uuid=str(uuid.uuid4()), name="s2"))
            step(f"changed {len(change)} x 64 KiB, took snapshot s2 {s2.uuid}")

            t0 = time.monotonic()
            changed = call("GetChangedExtents", v.GetChangedExtentsRequest(
                pool_uuid=POOL_UUID, volume_uuid=vol, snapshot_uuid=s2.uuid, since_snapshot_uuid=s1.uuid))
            got = [(e.start, e.length) for e in changed.extents]
            want = sorted((off, 64 << 10) for off in change)
            step(f"changed extents s1 -> s2 from the dirty bitmaps ({(time.monotonic() - t0) * 1000:.0f} ms): "
                 f"{len(got)} extents, {human(sum(n for _, n in got))}")
            for start, length in got[:4]:
                print(f"   {start:>12}  +{length}")
            print(f"   ... {'exactly what was written' if got == want else 'MISMATCH with what was written'}")
            ok &= got == want

            def digest(volume, snapshot=""):
                j = client.run(f"demo-sum-{uuid.uuid4()}", checksum=jobs_pb2.ChecksumSpec(
                    pool_uuid=POOL_UUID, volume_uuid=volume, snapshot_uuid=snapshot))
                return j.checksum_result.image_digest

            def run_job(kind: str, job_id: str, spec):
                nonlocal ok
                client.submit(job_id, **{kind: spec})
                job = follow(client, job_id, json_out=False)
                ok &= job.state == jobs_pb2.JOB_STATE_SUCCEEDED
                return job

            def backup(snap, label):
                bid = str(uuid.uuid4())
                step(f"{label} backup of {snap.name} to backup point {BP_UUID} (a job, with progress)")
                job = run_job("backup", f"demo-backup-{bid}", jobs_pb2.BackupSpec(
                    backup_point_uuid=BP_UUID, pool_uuid=POOL_UUID, volume_uuid=vol, snapshot_uuid=snap.uuid,
                    backup_uuid=bid, name=f"demo-{snap.name}", description=f"demo backup of {snap.name}"))
                r = job.backup_result
                print(f"   mode {r.mode}: read {r.chunks_read} chunks ({human(r.read_bytes)}), stored "
                      f"{r.new_chunks} new ({human(r.stored_bytes)} after zstd), {r.changed_chunks} changed")
                return r

            full = backup(s1, "full")
            incr = backup(s2, "incremental")
            ok &= full.mode == "full" and incr.mode == "incremental"
            st = client.backup_call("GetRepositoryStats", b.RepositoryStatsRequest(backup_point_uuid=BP_UUID))
            listed = client.backup_call("ListBackups", b.ListBackupsRequest(backup_point_uuid=BP_UUID,
                                                                            volume_uuid=vol)).backups
            step(f"backup point holds {st.backups} backups: {human(st.logical_bytes)} logical, "
                 f"{human(st.unique_bytes)} after dedup, {human(st.stored_bytes)} stored")
            for x in listed:
                print(f"   {x.uuid}  {x.mode:<11}  {x.name}  parent={x.parent_backup_uuid or '-'}")

            restored = {}
            for r, snap in ((full, s1), (incr, s2)):
                new_vol = str(uuid.uuid4())
                step(f"restore backup {r.backup_uuid} ({snap.name}) into a new volume {new_vol}")
                job = run_job("restore", f"demo-restore-{new_vol}", jobs_pb2.RestoreSpec(
                    backup_point_uuid=BP_UUID, backup_uuid=r.backup_uuid, pool_uuid=POOL_UUID,
                    volume_uuid=new_vol, name=f"restored-{snap.name}"))
                restored[snap.uuid] = job.restore_result

            for r in (full, incr):
                step(f"deep verify of backup {r.backup_uuid}")
                job = run_job("verify", f"demo-verify-{r.backup_uuid}", jobs_pb2.VerifySpec(
                    backup_point_uuid=BP_UUID, backup_uuid=r.backup_uuid, deep=True))
                print(f"   {job.verify_result.chunks_checked} chunks, {human(job.verify_result.bytes_checked)} "
                      "checked; image digest recomputed from the chunks matches the manifest")

            for r, snap in ((full, s1), (incr, s2)):
                d_snap = digest(vol, snap.uuid)
                d_restored = digest(restored[snap.uuid].volume_uuid)
                d_ref = reference_digest(restored[snap.uuid].access_path, workdir)
                match = d_snap == r.image_digest == d_restored == d_ref
                step(f"{snap.name}: snapshot {d_snap}\n   backup manifest  {r.image_digest}\n"
                     f"   restored volume  {d_restored}\n   reference (qemu-img convert + hashlib of the restored "
                     f"volume) {d_ref}: {'MATCH' if match else 'MISMATCH'}")
                ok &= match
    finally:
        agent.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = agent.wait(timeout=60)
        step(f"agent drained and exited with {rc} in {time.monotonic() - t0:.1f}s")
    if not ok:
        print("!! the demo found a mismatch")
    return 0 if ok and rc == 0 else 1
