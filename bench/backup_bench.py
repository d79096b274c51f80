#!/usr/bin/env python3
"""Backups: ours vs qemu-img and rbd, side by side in one run; medians of N runs.

  .venv/bin/python bench/backup_bench.py [--runs 3] [--gib 4] [--dir /var/tmp] [--rbd-gib 1] [--no-rbd]

qcow2 part, through a real blockferry-agent process (so its peak RSS can be
read from /proc/<pid>/status VmHWM): a --gib GiB qcow2 volume about half full
(every other 4 MiB: 2 MiB random + 2 MiB text-like, compressible), on the
local disk of --dir. Each run, on the newest snapshot:
  - peer: `qemu-img convert -O qcow2` of the snapshot to the same disk, then fsync;
  - ours: a full backup into a new repository, zstd and uncompressed (its packs are fsynced);
  - a 1 % change (4 MiB-aligned writes), a snapshot, and an incremental backup;
  - a restore of the full backup into a new qcow2 volume (durable) vs the peer
    convert, back to back in alternating order, both with the page cache
    dropped first (sync; drop_caches: root), so both read their source from
    the disk; as diagnostics, the same restore
    against the peer reading a snapshot in the page cache, and the same
    restore again with the packs cached, to show what is disk and what is us.
RBD part, in process on a single-node Ceph cluster (bluestore on a sparse
file): an --rbd-gib GiB image half full, snapshot, full backup, a 1 % change
(whole objects), snapshot; ours incremental backup vs
`rbd export-diff --from-snap` to a file on the same disk, then fsync.
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
sys.path[:0] = [os.path.join(here, ".."), os.path.join(here, "..", "tests")]

from agent.api.v1 import jobs_pb2  # noqa: E402
from agent.api.v1 import volumes_pb2 as v  # noqa: E402
from agent.client import AgentClient, Target  # noqa: E402
from agent.volumes.nbd import NbdClient, QemuNbd  # noqa: E402

MiB = 1 << 20
POOL = "0eca2be3-056f-4634-a25b-5cf717e067fb"


def bp_uuid(kind: str, k: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"blockferry-bench/{kind}/{k}"))


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timed(fn) -> tuple[float, object]:
    os.sync()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def chunk_content() -> bytes:
    import base64

    return os.urandom(2 * MiB) + base64.b64encode(os.urandom(3 * MiB // 2))[: 2 * MiB]


def drop_caches() -> None:
    """Write back and drop the page cache (root): the next read comes from
    the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def qcow2_part(args, rows: list) -> None:
    work = tempfile.mkdtemp(prefix="bf-bench-", dir=args.dir)
    size = args.gib << 30
    conf = os.path.join(work, "agent.toml")
    sections = "".join(
        f'[backup_points.{bp_uuid(kind, k)}]\npath = "{work}/bp-{kind}-{k}"\ncompression = "{kind}"\n'
        for k in range(args.runs)
        for kind in ("zstd", "none")
    )
    with open(conf, "w") as f:
        f.write(
            f'[agent]\nstate_dir = "{work}/state"\nrun_dir = "{work}/run"\nroots = ["{work}"]\n'
            f'log_format = "text"\n[grpc]\nunix_socket = "{work}/agent.sock"\n'
            f'[pools.{POOL}]\npath = "{work}/pool"\n{sections}'
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

            def snap(name):
                return c.create_snapshot(
                    v.CreateSnapshotRequest(pool_uuid=POOL, volume_uuid=vol, snapshot_uuid=str(uuid.uuid4()), name=name)
                ).uuid

            def job(kind, spec):
                j = c.run(f"{kind}-{uuid.uuid4()}", **{kind: spec})
                assert j.state == jobs_pb2.JOB_STATE_SUCCEEDED, j.error
                if os.environ.get("BENCH_VERBOSE"):
                    print(f"{kind}: agent peak RSS so far {vm_hwm(agent.pid) / MiB:.0f} MiB", file=sys.stderr)
                return j

            def backup(bp, s, parent=""):
                return job(
                    "backup",
                    jobs_pb2.BackupSpec(
                        backup_point_uuid=bp,
                        pool_uuid=POOL,
                        volume_uuid=vol,
                        snapshot_uuid=s,
                        backup_uuid=str(uuid.uuid4()),
                        parent_backup_uuid=parent,
                    ),
                ).backup_result

            base = snap("s0")
            t = {k: [] for k in ("peer", "peer_cold", "zstd", "none", "incr", "restore", "restore_warm")}
            for k in range(args.runs):
                layer = os.path.join(work, "pool", f"pool-{POOL}", "snapshot", vol, base)
                out = os.path.join(work, "peer.qcow2")

                def peer():
                    subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", layer, out], check=True)
                    fsync_path(out)

                # Every output is deleted as soon as it has served, ours and the
                # peer's alike, and the order alternates between runs: on this VM
                # the cost of writing fresh pages swings 3x with what was freed last.
                def ours_none():
                    dt, _ = timed(lambda: backup(bp_uuid("none", k), base))
                    t["none"].append(dt)
                    shutil.rmtree(os.path.join(work, f"bp-none-{k}"))

                def the_peer():
                    dt, _ = timed(peer)
                    t["peer"].append(dt)
                    os.unlink(out)

                def the_peer_cold():
                    """The peer reading its source from the disk, as the restore
                    reads its packs: the page cache dropped first."""
                    drop_caches()
                    dt, _ = timed(peer)
                    t["peer_cold"].append(dt)
                    os.unlink(out)

                for step in (the_peer, ours_none) if k % 2 == 0 else (ours_none, the_peer):
                    step()
                dt, full = timed(lambda: backup(bp_uuid("zstd", k), base))
                t["zstd"].append(dt)
                with QemuNbd(head, readonly=False, run_dir=f"{work}/run") as srv, NbdClient(srv.socket) as nc:
                    step = size // (size // 100 // (4 * MiB))  # 1 % in 4 MiB-aligned writes
                    for off in range(0, size, step):
                        nc.pwrite(os.urandom(4 * MiB), off - off % (4 * MiB))
                    nc.flush()
                base = snap(f"s{k + 1}")
                dt, incr = timed(lambda: backup(bp_uuid("zstd", k), base, full.backup_uuid))
                assert incr.mode == "incremental", incr
                t["incr"].append(dt)
                new = str(uuid.uuid4())

                def ours_restore(row: str) -> None:
                    """The full backup restored into a new volume, timed into
                    t[row]; the volume deleted at once."""
                    dt, _ = timed(
                        lambda: job(
                            "restore",
                            jobs_pb2.RestoreSpec(
                                backup_point_uuid=bp_uuid("zstd", k),
                                backup_uuid=full.backup_uuid,
                                pool_uuid=POOL,
                                volume_uuid=new,
                                name=f"restored-{k}",
                            ),
                        )
                    )
                    t[row].append(dt)
                    c.delete_volume(v.DeleteVolumeRequest(pool_uuid=POOL, volume_uuid=new))

                def ours_restore_cold():
                    drop_caches()
                    ours_restore("restore")

                # the cold restore and the cold peer back to back, order alternating
                for step in (the_peer_cold, ours_restore_cold) if k % 2 == 0 else (ours_restore_cold, the_peer_cold):
                    step()
                # the same restore again: now its packs are in the page cache, as the peer's source is
                ours_restore("restore_warm")
                shutil.rmtree(os.path.join(work, f"bp-zstd-{k}"))
            rss = vm_hwm(agent.pid)
        med = {k: statistics.median(x) for k, x in t.items()}
        if os.environ.get("BENCH_VERBOSE"):
            print(t, file=sys.stderr)
        peer_s = med["peer"]
        gib = args.gib
        rows += [
            (
                f"full backup, uncompressed ({gib} GiB, 50 % data)",
                f"{med['none']:.2f} s",
                f"`qemu-img convert -O qcow2` + fsync {peer_s:.2f} s",
                f"{med['none'] / peer_s:.2f}x",
                "<= 1.0x",
            ),
            (
                "full backup, zstd",
                f"{med['zstd']:.2f} s",
                f"same {peer_s:.2f} s",
                f"{med['zstd'] / peer_s:.2f}x",
                "<= 1.5x",
            ),
            (
                "incremental after a 1 % change",
                f"{med['incr']:.2f} s",
                f"our full (zstd) {med['zstd']:.2f} s",
                f"{100 * med['incr'] / med['zstd']:.1f} %",
                "<= 5 %",
            ),
            (
                "restore (zstd repository) to a new qcow2 volume, page cache dropped first",
                f"{med['restore']:.2f} s",
                f"`qemu-img convert -O qcow2` + fsync, page cache dropped first {med['peer_cold']:.2f} s",
                f"{med['restore'] / med['peer_cold']:.2f}x",
                "<= 1.1x",
            ),
            (
                "the same restore against the peer with its source in the page cache",
                f"{med['restore']:.2f} s",
                f"`qemu-img convert -O qcow2` + fsync {peer_s:.2f} s",
                f"{med['restore'] / peer_s:.2f}x",
                "(diagnostic)",
            ),
            (
                "the same restore again, its packs now in the page cache",
                f"{med['restore_warm']:.2f} s",
                f"same {peer_s:.2f} s",
                f"{med['restore_warm'] / peer_s:.2f}x",
                "(diagnostic)",
            ),
            ("peak RSS of the agent (VmHWM) over all of the above", f"{rss / MiB:.0f} MiB", "-", "-", "<= 200 MiB"),
        ]
    finally:
        agent.terminate()
        agent.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def rbd_part(args, rows: list) -> None:
    import rbd

    from agent.repo.backup import backup
    from agent.repo.repository import Repository
    from agent.stores.local import LocalStore
    from agent.volumes.rbd import RbdPool

    from support.cephcluster import CephCluster

    size = args.rbd_gib << 30
    work = tempfile.mkdtemp(prefix="bf-bench-rbd-", dir=args.dir)
    cluster = CephCluster(objectstore="bluestore", store_bytes=(args.rbd_gib * 4 + 4) << 30, with_mgr=False).start()
    try:
        pool = RbdPool(
            str(uuid.uuid4()),
            ceph_conf=str(cluster.conf),
            client_name="admin",
            keyring="",
            rbd_pool="rbd",
            namespace="",
            features=["layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"],
            timeout=60,
        )
        vol = str(uuid.uuid4())
        pool.create_volume(vol, "bench", size)
        with pool.ioctx() as io, rbd.Image(io, vol) as img:
            for off in range(0, size, 8 * MiB):
                img.write(chunk_content(), off)
            img.flush()
        conf = str(cluster.conf)
        t_o, t_p = [], []
        prev = str(uuid.uuid4())
        pool.create_snapshot(vol, prev, "s0")
        for k in range(args.runs):
            repo = Repository.init(LocalStore(os.path.join(work, f"bp-{k}")))
            full = backup(pool, vol, prev, repo)
            with pool.ioctx() as io, rbd.Image(io, vol) as img:
                step = size // (size // 100 // (4 * MiB))
                for off in range(0, size, step):
                    img.write(os.urandom(4 * MiB), off - off % (4 * MiB))
                img.flush()
            cur = str(uuid.uuid4())
            pool.create_snapshot(vol, cur, f"s{k + 1}")
            dt, m = timed(lambda: backup(pool, vol, cur, repo, parent=full))
            assert m.mode == "incremental"
            t_o.append(dt)
            out = os.path.join(work, "peer.diff")

            def peer():
                subprocess.run(
                    ["rbd", "-c", conf, "export-diff", "--no-progress", "--from-snap", prev, f"rbd/{vol}@{cur}", out],
                    check=True,
                    capture_output=True,
                )
                fsync_path(out)

            dt, _ = timed(peer)
            t_p.append(dt)
            os.unlink(out)
            prev = cur
        o, p = statistics.median(t_o), statistics.median(t_p)
        rows.append(
            (
                f"RBD incremental after a 1 % change ({args.rbd_gib} GiB, 50 % data)",
                f"{o:.2f} s",
                f"`rbd export-diff --from-snap` + fsync {p:.2f} s",
                f"{o / p:.2f}x",
                "<= 1.2x",
            )
        )
    finally:
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gib", type=int, default=4)
    p.add_argument("--rbd-gib", type=int, default=1)
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--no-rbd", action="store_true")
    args = p.parse_args()
    rows: list = []
    qcow2_part(args, rows)
    if not args.no_rbd:
        rbd_part(args, rows)
    print(f"median of {args.runs} runs; every run timed ours and the peer back to back\n")
    print("| bench | ours | peer | ratio | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
