#!/usr/bin/env python3
"""Running VMs: the guest-visible pause of a live snapshot of a two-disk VM,
and a live incremental backup against the same backup of an idle volume;
medians of N runs.

  .venv/bin/python bench/live_bench.py [--runs 5] [--mib 256]

The pause is the QMP transaction that switches both disks to their new
layers (qemu drains the guest's I/O and holds its big lock through it; no
guest freeze). Peer: the same switch as qemu's own
`blockdev-snapshot-sync` transaction on a second VM (what a QMP host
without fixed head paths does).

Incremental: two volumes of --mib MiB with the same data (half random, in
1 MiB pieces every 2 MiB), one held by a running VM, one idle. Each run
changes 5 % of both (the same 64 KiB writes: the VM's through qemu-io,
the idle one's through qemu-nbd), snapshots both and backs both up
incrementally to one local repository each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from agent.repo.backup import backup  # noqa: E402
from agent.repo.repository import Repository  # noqa: E402
from agent.stores.local import LocalStore  # noqa: E402
from agent.volumes.base import SnapshotRequest  # noqa: E402
from agent.volumes.nbd import NbdClient, QemuNbd  # noqa: E402
from agent.volumes.qcow2 import Qcow2Pool  # noqa: E402

from support.vms import Vm  # noqa: E402  (a qemu-system VM without a guest OS)

MiB = 1 << 20
CHUNK = 1 << 20


def nid() -> str:
    return str(uuid.uuid4())


def vm_write_file(vm: Vm, disk: int, src: str, offset: int, length: int) -> None:
    cmd = f'qemu-io -d /machine/peripheral/vd{disk}/virtio-backend "write -s {src} {offset} {length}"'
    vm.qmp("human-monitor-command", **{"command-line": cmd})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mib", type=int, default=256)
    args = p.parse_args()
    size = args.mib * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        tmp = Path(d)
        run_dir = str(tmp / "run")
        pool = Qcow2Pool(nid(), d, run_dir=run_dir, allowed_roots=[d])
        piece = tmp / "piece"
        piece.write_bytes(os.urandom(MiB))
        small = tmp / "small"

        # ---- the pause: our set of two disks vs qemu's blockdev-snapshot-sync
        disks = [pool.create_volume(nid(), f"d{i}", 64 * MiB).uuid for i in range(2)]
        vm = Vm(tmp, [pool.head_path(v) for v in disks], name="bench")
        peer_heads = []
        for i in range(2):
            peer_heads.append(str(tmp / f"peer{i}.qcow2"))
            os.system(f"qemu-img create -q -f qcow2 {peer_heads[-1]} 64M")
        peer = Vm(tmp, peer_heads, name="peer")
        ours, theirs, whole = [], [], []
        try:
            for run in range(args.runs):
                t0 = time.perf_counter()
                got = pool.create_snapshot_set(
                    [SnapshotRequest(pool.pool_uuid, v, nid(), f"p{run}") for v in disks], freeze=False
                )
                whole.append((time.perf_counter() - t0) * 1000)
                ours.append(got.switch_ms)
                actions = [
                    {
                        "type": "blockdev-snapshot-sync",
                        "data": {
                            "node-name": f"d{i}" if run == 0 else f"o{i}-{run - 1}",
                            "snapshot-file": str(tmp / f"peer{i}-{run}.qcow2"),
                            "snapshot-node-name": f"o{i}-{run}",
                            "format": "qcow2",
                        },
                    }
                    for i in range(2)
                ]
                t0 = time.perf_counter()
                peer.qmp("transaction", actions=actions)
                theirs.append((time.perf_counter() - t0) * 1000)
        finally:
            vm.quit()
            peer.quit()

        # ---- incremental backup: a running VM's volume vs an idle one
        live = pool.create_volume(nid(), "live", size).uuid
        idle = pool.create_volume(nid(), "idle", size).uuid
        vm = Vm(tmp, [pool.head_path(live)], name="writer")
        try:
            with QemuNbd(pool.head_path(idle), readonly=False, run_dir=run_dir) as srv, NbdClient(srv.socket) as c:
                data = piece.read_bytes()
                for off in range(0, size, 2 * MiB):
                    vm_write_file(vm, 0, str(piece), off, MiB)
                    c.pwrite(data, off)
                c.flush()
            repos = {v: Repository.init(LocalStore(str(tmp / f"bp-{v}")), chunk_size=CHUNK) for v in (live, idle)}
            parents = {}
            for v in (live, idle):
                s = nid()
                pool.create_snapshot(v, s, "base")
                parents[v] = backup(pool, v, s, repos[v], name="full")
            times: dict[str, list[float]] = {live: [], idle: []}
            step = 64 * 1024 * 20  # 64 KiB in every 1.25 MiB: 5 %
            for run in range(args.runs):
                small.write_bytes(os.urandom(64 * 1024))
                with QemuNbd(pool.head_path(idle), readonly=False, run_dir=run_dir) as srv:
                    with NbdClient(srv.socket) as c:
                        chunk = small.read_bytes()
                        for off in range(run * 65536 % step, size, step):
                            vm_write_file(vm, 0, str(small), off, 65536)
                            c.pwrite(chunk, off)
                        c.flush()
                for v in (live, idle):
                    s = nid()
                    pool.create_snapshot(v, s, f"r{run}")
                    os.sync()
                    t0 = time.perf_counter()
                    m = backup(pool, v, s, repos[v], parent=parents[v])
                    times[v].append(time.perf_counter() - t0)
                    assert not m.fell_back, m.stats.mode_reason
                    parents[v] = m
        finally:
            vm.quit()

    t_ours, t_peer = statistics.median(ours), statistics.median(theirs)
    t_live, t_idle = statistics.median(times[live]), statistics.median(times[idle])
    print(f"two-disk VM (no guest freeze); {args.mib} MiB volumes, 5 % change; median of {args.runs} runs\n")
    print("| bench | ours | peer | ratio (ours/peer) | target |")
    print("|---|---|---|---|---|")
    print(
        f"| guest-visible pause of a live snapshot of 2 disks (the QMP transaction) | {t_ours:.1f} ms | "
        f"`blockdev-snapshot-sync` x2 in one transaction {t_peer:.1f} ms | {t_ours / t_peer:.2f}x | <= 100 ms |"
    )
    print(
        f"| the whole set call (find the VM, create the layers, switch, rename, metadata) | "
        f"{statistics.median(whole):.1f} ms | - | - | - |"
    )
    print(
        f"| incremental backup of a running VM's volume | {t_live:.3f} s | the same of an idle volume "
        f"{t_idle:.3f} s | {t_live / t_idle:.2f}x | <= 1.2x |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
