#!/usr/bin/env python3
"""Shared LUN pools: reading a snapshot the way a backup does (our reader:
the clusters `qemu-img map` places in the chain's slices, read from the
device with O_DIRECT, several requests in flight) vs qemu's own reader
(`qemu-img convert` of the same chain into its null driver), side by side
in one run; medians of N runs.

  .venv/bin/python bench/lun_bench.py [--runs 3] [--gib 1]

Setup: a loop device over a file in $BENCH_DIR (default /var/tmp), a pool
formatted on it, a thick volume of --gib GiB with ~50 % scattered data
(1 MiB of data in every 2 MiB) in its first layer, snapshot s1, then a
second layer with 10 % more, snapshot s2 (reads cross both layers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from agent.extents import Extent  # noqa: E402
from agent.stores.blockdev import LocalBlockDevice  # noqa: E402
from agent.volumes.lun.driver import LunPool  # noqa: E402
from agent.volumes.nbd import NbdClient, QemuNbd  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def write_pattern(name: str, size: int, every: int, run_dir: str, seed: int) -> None:
    data = os.urandom(MiB)
    with QemuNbd(name, readonly=False, run_dir=run_dir) as srv, NbdClient(srv.socket) as c:
        for off in range(seed * MiB, size, every):
            c.pwrite(data, off)
        c.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gib", type=int, default=1)
    args = p.parse_args()
    size = args.gib * GiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = os.path.join(d, "lun.img")
        with open(img, "wb") as f:
            f.truncate(3 * size + 256 * MiB)
        dev = subprocess.run(["losetup", "-f", "--show", img], check=True, capture_output=True, text=True)
        dev = dev.stdout.strip()
        pool = None
        try:
            pool = LunPool.open(
                str(uuid.uuid4()),
                LocalBlockDevice(dev, exclusive=False),
                {"driver": "host_device", "filename": dev},
                host_uuid=str(uuid.uuid4()),
                run_dir=os.path.join(d, "run"),
                format_lun=True,
                lease_timeout=10.0,
                lease_io_timeout=1.0,
            )
            assert pool.membership.wait_owner(10), "no owner lease"
            vol = str(uuid.uuid4())
            pool.create_volume(vol, "bench", size)
            write_pattern(pool.volume_info(vol).access_path, size, 2 * MiB, pool.run_dir, 0)
            pool.create_snapshot(vol, str(uuid.uuid4()), "s1")
            write_pattern(pool.volume_info(vol).access_path, size, 10 * MiB, pool.run_dir, 1)
            s2 = pool.create_snapshot(vol, str(uuid.uuid4()), "s2").uuid
            name = pool._layer_name(vol, s2)

            def ours() -> int:
                got = 0

                def on_data(offset, view):
                    nonlocal got
                    got += len(view)

                with pool.open_reader(vol, s2) as r:
                    data = [Extent(e.start, e.length) for e in r.extents() if not e.zero]
                    r.read(data, on_data, 4 * MiB)
                return got

            def peer() -> None:
                target = f"driver=null-co,size={size}"
                subprocess.run(
                    ["qemu-img", "convert", "-U", "-n", "-W", "-m", "8", "-f", "qcow2", name]
                    + ["--target-image-opts", target],
                    check=True,
                )

            ours_s, peer_s, data = [], [], 0
            for _ in range(args.runs):
                t0 = time.perf_counter()
                data = ours()
                ours_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                peer()
                peer_s.append(time.perf_counter() - t0)
            o, q = statistics.median(ours_s), statistics.median(peer_s)
            print(f"snapshot read, {data / MiB:.0f} MiB of data in a {args.gib} GiB volume on a shared LUN pool")
            print(f"  ours (mapped, O_DIRECT)       {o:7.3f} s  {data / MiB / o:7.0f} MiB/s")
            print(f"  qemu-img convert -> null-co   {q:7.3f} s  {data / MiB / q:7.0f} MiB/s")
            print(f"  ratio ours/peer throughput    {q / o:5.2f}x   (medians of {args.runs})")
        finally:
            if pool is not None:
                pool.close()
            subprocess.run(["losetup", "-d", dev], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
