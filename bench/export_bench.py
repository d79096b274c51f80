#!/usr/bin/env python3
"""A backup read through its NBD export vs restored, side by side in one
run; medians of N runs.

  .venv/bin/python bench/export_bench.py [--runs 3] [--gib 2] [--dir /var/tmp] [--warm]

Through a real blockferry-agent process: a --gib GiB qcow2 volume about
half full (every other 4 MiB: 2 MiB random + 2 MiB text-like), one full
backup (zstd) on a local backup point on the disk of --dir. Each run,
in alternating order, with the page cache dropped before each (root; --warm
keeps it):
  - export: ExportBackup, then `nbdcopy URI null:` reads the whole backup
    sequentially (four connections, nbdcopy's default) from nbdkit and our
    plugin; also the time from the request to the first 4 KiB read (a libnbd
    client connecting as soon as the export answers);
  - restore: the restore job writing the same backup into a new qcow2
    volume (durable); the volume is deleted after.
Goals (issue 27): export throughput >= 0.7x the restore's; first byte < 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..")]

from agent.api.v1 import backups_pb2, jobs_pb2  # noqa: E402
from agent.api.v1 import volumes_pb2 as v  # noqa: E402
from agent.client import AgentClient, Target  # noqa: E402
from agent.volumes.nbd import NbdClient, QemuNbd  # noqa: E402

MiB = 1 << 20
POOL = "0eca2be3-056f-4634-a25b-5cf717e067fb"
BP = "6a1e3c1f-4c1b-4f7e-9d8e-0b6f3e2a1c55"


def chunk_content() -> bytes:
    import base64

    return os.urandom(2 * MiB) + base64.b64encode(os.urandom(3 * MiB // 2))[: 2 * MiB]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def first_byte(uri: str) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, 0)
    h.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gib", type=int, default=2)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--warm", action="store_true", help="keep the page cache between runs")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bf-export-bench-", dir=args.dir)
    size = args.gib << 30
    conf = os.path.join(work, "agent.toml")
    with open(conf, "w") as f:
        f.write(
            f'[agent]\nstate_dir = "{work}/state"\nrun_dir = "{work}/run"\nroots = ["{work}"]\n'
            f'log_format = "text"\n[grpc]\nunix_socket = "{work}/agent.sock"\n'
            f'[pools.{POOL}]\npath = "{work}/pool"\n[backup_points.{BP}]\npath = "{work}/bp"\n'
        )
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.server", "-c", conf], stderr=open(os.path.join(work, "agent.log"), "ab")
    )
    try:
        with AgentClient(Target(socket=f"{work}/agent.sock")) as c:
            deadline = time.monotonic() + 30
            while not os.path.exists(f"{work}/agent.sock") and time.monotonic() < deadline:
                time.sleep(0.05)
            c.wait_ready(timeout=30)
            vol = str(uuid.uuid4())
            head = c.create_volume(
                v.CreateVolumeRequest(pool_uuid=POOL, volume_uuid=vol, name="bench", capacity=size)
            ).access_path
            with QemuNbd(head, readonly=False, run_dir=f"{work}/run") as srv, NbdClient(srv.socket) as nc:
                for off in range(0, size, 8 * MiB):
                    nc.pwrite(chunk_content(), off)
                nc.flush()
            snap = c.create_snapshot(
                v.CreateSnapshotRequest(pool_uuid=POOL, volume_uuid=vol, snapshot_uuid=str(uuid.uuid4()), name="s")
            ).uuid
            job = c.run(
                f"backup-{uuid.uuid4()}",
                backup=jobs_pb2.BackupSpec(
                    backup_point_uuid=BP,
                    pool_uuid=POOL,
                    volume_uuid=vol,
                    snapshot_uuid=snap,
                    backup_uuid=str(uuid.uuid4()),
                ),
            )
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
            backup = job.backup_result.backup_uuid
            t = {"export": [], "restore": [], "first": []}

            def export() -> None:
                t0 = time.perf_counter()
                e = c.export_backup(
                    backups_pb2.ExportBackupRequest(backup_point_uuid=BP, backup_uuid=backup, lease_seconds=3600)
                )
                first_byte(e.uri)
                t["first"].append(time.perf_counter() - t0)
                c.unexport_backup(e.export_id)  # a fresh export: its chunk cache empty, as the restore's
                e = c.export_backup(
                    backups_pb2.ExportBackupRequest(backup_point_uuid=BP, backup_uuid=backup, lease_seconds=3600)
                )
                t0 = time.perf_counter()
                subprocess.run(["nbdcopy", e.uri, "null:"], check=True)
                t["export"].append(time.perf_counter() - t0)
                c.unexport_backup(e.export_id)

            def restore() -> None:
                new = str(uuid.uuid4())
                t0 = time.perf_counter()
                j = c.run(
                    f"restore-{new}",
                    restore=jobs_pb2.RestoreSpec(
                        backup_point_uuid=BP, backup_uuid=backup, pool_uuid=POOL, volume_uuid=new, name=new[:8]
                    ),
                )
                t["restore"].append(time.perf_counter() - t0)
                assert j.state == jobs_pb2.JOB_STATE_SUCCEEDED, j.error
                c.delete_volume(v.DeleteVolumeRequest(pool_uuid=POOL, volume_uuid=new))

            for k in range(args.runs):
                for step in (export, restore) if k % 2 == 0 else (restore, export):
                    if not args.warm:
                        drop_caches()
                    step()
    finally:
        agent.terminate()
        agent.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    def rate(seconds: list[float]) -> float:
        return size / MiB / statistics.median(seconds)

    print(f"backup of {args.gib} GiB (half data), {args.runs} runs, {'warm' if args.warm else 'cold'} page cache")
    print(f"{'':28}{'median s':>10}{'MiB/s':>10}   runs")
    for name, label in (("export", "export read (nbdcopy)"), ("restore", "restore job (qcow2)")):
        runs = " ".join(f"{x:.2f}" for x in t[name])
        print(f"{label:28}{statistics.median(t[name]):10.2f}{rate(t[name]):10.0f}   {runs}")
    ratio = rate(t["export"]) / rate(t["restore"])
    first = statistics.median(t["first"])
    print(f"export / restore throughput: {ratio:.2f}x (goal >= 0.7x)")
    print(f"request to first byte: {first:.3f} s median ({' '.join(f'{x:.3f}' for x in t['first'])}) (goal < 1 s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
