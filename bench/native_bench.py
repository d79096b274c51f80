#!/usr/bin/env python3
"""Native core vs its peers, side by side in one run; medians of N runs.

  .venv/bin/python bench/native_bench.py [--runs 5] [--image-gib 4]

Rows (ratio = peer time / our time, so > 1 means we are faster):
  sha256      per-block SHA-256 (4 MiB blocks, and the repository's 64 KiB
              blocks) of a 1 GiB buffer vs hashlib.sha256 (OpenSSL)
  xxh3-128    per-block XXH3-128 of the same buffer vs the xxhash package
  zero        zero detection of a 1 GiB written zero buffer, GB/s
  image       image digest of a sparse 4 GiB file with 10 % data vs `sha256sum`
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import xxhash  # noqa: E402

from agent import _native, native  # noqa: E402
from agent.kinds.checksum import digest_range  # noqa: E402

GiB = 1 << 30
BLOCK = 4 << 20


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, runs: int) -> float:
    return statistics.median(timed(fn) for _ in range(runs))


def per_block(peer, block):
    def run(buf):
        view = memoryview(buf)
        return [peer(view[o : o + block]).digest() for o in range(0, len(buf), block)]

    return run


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--image-gib", type=int, default=4)
    args = p.parse_args()
    runs = args.runs
    rows = []

    buf = bytearray(os.urandom(1 << 20)) * 1024  # 1 GiB of data, touched
    for algo, peer, peer_name, block in (
        ("sha256", hashlib.sha256, "hashlib.sha256", BLOCK),
        ("sha256", hashlib.sha256, "hashlib.sha256", 64 << 10),
        ("xxh3-128", xxhash.xxh3_128, "xxhash.xxh3_128", BLOCK),
    ):
        peer_t = median_time(lambda b=buf, f=peer, n=block: per_block(f, n)(b), runs)
        for threads in (1, 2):
            ours = median_time(lambda b=buf, a=algo, t=threads, n=block: native.block_digests(a, b, n, t), runs)
            rows.append(
                (
                    f"{algo} digests of {block >> 10} KiB blocks, {threads} thread{'s' if threads > 1 else ''}",
                    peer_name,
                    GiB / ours / 1e9,
                    GiB / peer_t / 1e9,
                    peer_t / ours,
                )
            )
    del buf

    zero = bytearray(GiB)
    zero[:] = bytes(GiB)  # written, so not the shared zero page
    for threads in (1, 2):
        t = median_time(lambda z=zero, n=threads: native.zero_flags(z, BLOCK, n), runs)
        rows.append((f"zero detection, {threads} thread{'s' if threads > 1 else ''}", "-", GiB / t / 1e9, None, None))
    del zero

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        path = os.path.join(d, "sparse.raw")
        size = args.image_gib * GiB
        rnd = os.urandom(1 << 20)
        with open(path, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 10 << 20):  # 1 MiB of data in every 10 MiB
                f.seek(off)
                f.write(rnd)

        def ours():
            fd = os.open(path, os.O_RDONLY)
            try:
                digest_range(fd, 0, size)
            finally:
                os.close(fd)

        def peer():
            subprocess.run(["sha256sum", path], check=True, capture_output=True)

        ours(), peer()  # warm the page cache for both
        t_ours, t_peer = median_time(ours, runs), median_time(peer, runs)
        rows.append(
            (
                f"image digest, {args.image_gib} GiB sparse file, 10 % data",
                "sha256sum",
                size / t_ours / 1e9,
                size / t_peer / 1e9,
                t_peer / t_ours,
            )
        )

    print(f"SHA-256 build: {_native.SHA256_ISA}, XXH3 build: {_native.XXH3_ISA}")
    print(f"median of {runs} runs; GB/s = 1e9 bytes/s; ratio = peer time / our time\n")
    print("| bench | peer | ours GB/s | peer GB/s | ratio |")
    print("|---|---|---|---|---|")
    for name, peer_name, ours_gbs, peer_gbs, ratio in rows:
        print(
            f"| {name} | {peer_name} | {ours_gbs:.2f} | {'' if peer_gbs is None else f'{peer_gbs:.2f}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
