#!/usr/bin/env python3
"""RBD: our data path vs the rbd CLI, side by side in one run; medians of N runs.

  .venv/bin/python bench/rbd_bench.py [--runs 3] [--gib 2]

Starts its own single-node Ceph cluster (bluestore on a sparse file, as the
tests do), makes an image of --gib GiB with scattered data (one 4 MiB object
in two), snapshot s1, a 1 % change, snapshot s2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, ".."), os.path.join(here, "..", "tests")]

from agent.jobs.kinds import NullContext  # noqa: E402
from agent.volumes.rbd import RbdPool  # noqa: E402
from agent.volumes.rbd.reader import RbdReader  # noqa: E402

from support.cephcluster import CephCluster  # noqa: E402

MiB = 1 << 20
OBJ = 4 * MiB


class Ctx(NullContext):
    job_id = "bench"


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gib", type=int, default=2)
    args = p.parse_args()
    size = args.gib << 30
    cluster = CephCluster(objectstore="bluestore", store_bytes=(args.gib * 4 + 4) << 30, with_mgr=False).start()
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
        import rbd

        rnd = os.urandom(OBJ)
        with pool.ioctx() as io, rbd.Image(io, vol) as img:
            for off in range(0, size, 2 * OBJ):
                img.write(rnd, off)
            img.flush()
        s1, s2 = str(uuid.uuid4()), str(uuid.uuid4())
        pool.create_snapshot(vol, s1, "s1")
        with pool.ioctx() as io, rbd.Image(io, vol) as img:
            for off in range(0, size, 100 * 64 << 10):  # 64 KiB in every 6.25 MiB: 1 %
                img.write(rnd[: 64 << 10], off)
            img.flush()
        pool.create_snapshot(vol, s2, "s2")
        conf = str(cluster.conf)

        def ours_read():
            with pool.ioctx() as io, rbd.Image(io, vol, snapshot=s2, read_only=True) as img:
                data = pool._extents(img, size, None, whole_object=False, include_parent=True)
                RbdReader(img).read_extents(data, lambda off, view: None)

        def peer_read():
            subprocess.run(
                f"rbd -c {conf} export rbd/{vol}@{s2} - > /dev/null", shell=True, check=True, stderr=subprocess.DEVNULL
            )

        def ours_diff():
            pool.changed_extents(vol, s2, s1)

        def peer_diff():
            subprocess.run(
                ["rbd", "-c", conf, "diff", "--from-snap", s1, f"rbd/{vol}@{s2}"], check=True, capture_output=True
            )

        def ours_clone():
            target = str(uuid.uuid4())
            pool.full_clone(pool, vol, s2, target, "clone", Ctx())
            pool.delete_volume(target)

        def peer_clone():
            subprocess.run(
                ["rbd", "-c", conf, "cp", f"rbd/{vol}@{s2}", "rbd/peer-copy"], check=True, capture_output=True
            )
            subprocess.run(["rbd", "-c", conf, "rm", "rbd/peer-copy"], check=True, capture_output=True)

        rows = []
        cases = (
            ("full read of a snapshot", ours_read, peer_read, "`rbd export - >/dev/null`"),
            ("changed extents after a 1 % change", ours_diff, peer_diff, "`rbd diff --from-snap`"),
            ("full clone", ours_clone, peer_clone, "`rbd cp`"),
        )
        for name, ours, peer, peer_name in cases:
            ours(), peer()
            t_o, t_p = [], []
            for _ in range(args.runs):
                t_o.append(timed(ours))
                t_p.append(timed(peer))
            rows.append((name, statistics.median(t_o), statistics.median(t_p), peer_name))
    finally:
        cluster.destroy()

    print(f"{args.gib} GiB RBD image, 50 % data; median of {args.runs} interleaved runs\n")
    print("| bench | ours | peer | time ratio (ours/peer) |")
    print("|---|---|---|---|")
    for name, o, pe, peer_name in rows:
        print(f"| {name} | {o:.3f} s | {peer_name} {pe:.3f} s | {o / pe:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
