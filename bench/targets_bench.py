#!/usr/bin/env python3
"""Backup points: the same full backup to each type vs the raw peer tool, in
one run, on the same machine; medians of N runs, printed as throughput and
the ratio ours/peer (target >= 0.9).

  .venv/bin/python bench/targets_bench.py [--runs 3] [--gib 2] [--dir /var/tmp]

Setup: a --gib GiB qcow2 volume full of random data (incompressible, so
ours and the peer move the same bytes) and its snapshot, exported once to a
raw file for the peers. Servers on 127.0.0.1, as in the tests: nfs-ganesha
(NFSv3), smbd, tgtd (a file LUN) and a loop device, both LUN files written
whole once first (a disk's blocks exist; a sparse file would charge block
allocation to whoever writes first). Each run, per
type, back to back:
  - ours: a full backup of the snapshot into a new repository there;
  - peer: nfs `nfs-cp` and smb `smbclient put`, each then an fsync of its
    file on the server (nfs-cp never sends COMMIT and smbclient never FLUSH;
    our commits do), iscsi `qemu-img convert -t
    writeback -n` to the LUN (writeback: the target's cache flushed once at
    the end, as our commits flush it; convert's default, unsafe, never
    flushes), block `dd oflag=direct conv=fsync bs=4M` to the loop device (a
    loop device with direct I/O on, so writes reach its file like a disk's;
    conv=fsync: the device cache flushed once, as our commits flush it);
  - store only: the same bytes written through our object store as objects
    of its pack size in 4 MiB pieces (the transport without hashing).
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

from agent.repo.backup import backup  # noqa: E402
from agent.repo.repository import Repository  # noqa: E402
from agent.volumes.nbd import NbdClient, QemuNbd  # noqa: E402
from agent.volumes.qcow2 import Qcow2Pool  # noqa: E402

MiB = 1 << 20


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (every process and the
    kernel: ours or the peer, and the server), from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, machine CPU seconds)"""
    c0, t0 = busy_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, busy_seconds() - c0


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--only", default="", help="comma list of nfs,smb,iscsi,block,s3")
    args = ap.parse_args()
    size = int(args.gib * 1024) * MiB
    kinds = [k for k in ("nfs", "smb", "iscsi", "block", "s3") if not args.only or k in args.only.split(",")]
    work = tempfile.mkdtemp(prefix="bf-tbench-", dir=args.dir)
    servers = []
    ceph = rgw = bucket = None
    try:
        from support.iscsiserver import TgtServer
        from support.nfsserver import NfsServer
        from support.smbserver import SmbServer
        from support.stores import Loop

        pool = Qcow2Pool(str(uuid.uuid4()), f"{work}/pool", run_dir=f"{work}/run", allowed_roots=[work])
        vol = pool.create_volume(str(uuid.uuid4()), "src", size).uuid
        with QemuNbd(pool.head_path(vol), readonly=False, run_dir=f"{work}/run") as srv, NbdClient(srv.socket) as c:
            for off in range(0, size, 64 * MiB):
                c.pwrite(os.urandom(64 * MiB), off)
            c.flush()
        snap = str(uuid.uuid4())
        pool.create_snapshot(vol, snap, "s1")
        raw = f"{work}/src.raw"
        run(["qemu-img", "convert", "-O", "raw", pool.snap_path(vol, snap), raw])
        nfs = NfsServer(root=None).start() if "nfs" in kinds else None
        smb = SmbServer().start() if "smb" in kinds else None
        tgt = TgtServer().start() if "iscsi" in kinds else None
        if "s3" in kinds:  # Ceph's own gateway on a one-OSD bluestore cluster, as in the tests
            from support.cephcluster import CephCluster
            from support.rgw import Rgw

            # sparse; room for every run's three copies: RGW frees deleted objects only later (its gc)
            ceph = CephCluster(objectstore="bluestore", store_bytes=3 * args.runs * size + (8 << 30)).start()
            rgw = Rgw(ceph).setup()
            bucket = rgw.make_bucket()
        servers = [s for s in (nfs, smb, tgt) if s]
        lun = tgt.add_lun(2 * size + 512 * MiB) if tgt else None
        loop = Loop(f"{work}/lun.img", 2 * size + 512 * MiB, direct_io=True) if "block" in kinds else None
        # the LUNs' files written whole once, as a real disk's blocks exist: otherwise the
        # first writer of each run pays the file system's block allocation, the other not
        for f in ([lun.file] if lun else []) + ([loop.file] if loop else []):
            run(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={f}",
                    "bs=16M",
                    f"count={(2 * size + 512 * MiB) // (16 * MiB)}",
                    "conv=notrunc,fsync",
                    "status=none",
                ]
            )
        results: dict[str, dict[str, list[float]]] = {k: {"ours": [], "peer": [], "store": []} for k in kinds}
        cpu: dict[str, dict[str, list[float]]] = {k: {"ours": [], "peer": [], "store": []} for k in kinds}

        def blank(path: str, dev_size: int) -> None:
            """Zero where a LUN repository's superblocks and catalogs live (and
            the last MiB), so the next run formats a fresh repository."""
            with open(path, "r+b") as f:
                f.write(bytes(70 * MiB))
                f.seek(dev_size - MiB)
                f.write(bytes(MiB))
                f.flush()
                os.fsync(f.fileno())

        for r in range(args.runs):
            for kind in kinds:
                sub = f"run{r}-{uuid.uuid4().hex[:6]}"
                if kind == "nfs":
                    from agent.stores.nfs import NfsStore

                    store = NfsStore(
                        "127.0.0.1", str(nfs.export), sub, nfs_port=nfs.nfs_port, mount_port=nfs.mount_port
                    )
                    peer = ["nfs-cp", raw, nfs.url(nfs.export, f"{sub}-peer.raw")]
                elif kind == "smb":
                    from agent.stores.smb import SmbStore

                    store = SmbStore(
                        "127.0.0.1", "backups", sub, username=smb.user, password=smb.password, port=smb.port
                    )
                    auth = f"{smb.root}/private/bench.auth"
                    with open(auth, "w") as f:
                        f.write(f"username = {smb.user}\npassword = {smb.password}\n")
                    os.chmod(auth, 0o600)
                    peer = [
                        "smbclient",
                        "//127.0.0.1/backups",
                        "-p",
                        str(smb.port),
                        "-A",
                        auth,
                        "-m",
                        "SMB3",
                        "-c",
                        f"put {raw} {sub}-peer.raw",
                    ]
                elif kind == "iscsi":
                    from agent.stores.iscsi import IscsiBlockDevice
                    from agent.stores.lun import LunStore

                    blank(str(lun.file), 2 * size + 512 * MiB)
                    store = LunStore(IscsiBlockDevice("127.0.0.1", lun.iqn, 1, port=tgt.port), format_lun=True)
                    # -t writeback: the target's cache is flushed at the end (SYNCHRONIZE
                    # CACHE), as our commits flush it; convert's default (unsafe) never does
                    peer = [
                        "qemu-img",
                        "convert",
                        "-t",
                        "writeback",
                        "-n",
                        "-W",
                        "-m",
                        "16",
                        "-f",
                        "raw",
                        "-O",
                        "raw",
                        raw,
                        f"iscsi://127.0.0.1:{tgt.port}/{lun.iqn}/1",
                    ]
                elif kind == "s3":
                    from agent.stores.s3 import S3Store

                    store = S3Store(
                        rgw.endpoint,
                        bucket,
                        sub,
                        access_key=rgw.access_key,
                        secret_key=rgw.secret_key,
                        part_size=16 * MiB,
                    )
                    # the same part size as ours; RGW acks a part once Ceph has it on disk
                    peer = ["s3cmd", "-c", str(rgw.s3cfg), "--multipart-chunk-size-mb=16", "--no-progress"]
                    peer += ["put", raw, f"s3://{bucket}/{sub}-peer.raw"]
                else:
                    from agent.stores.blockdev import LocalBlockDevice
                    from agent.stores.lun import LunStore

                    blank(loop.dev, 2 * size + 512 * MiB)
                    store = LunStore(LocalBlockDevice(loop.dev), format_lun=True)
                    peer = ["dd", f"if={raw}", f"of={loop.dev}", "oflag=direct", "conv=fsync", "bs=4M", "status=none"]
                repo = Repository.init(store)

                def store_only():
                    """The transport alone: the same bytes as objects of the
                    store's pack size (64 MiB; 1 GiB on LUNs) written in 4 MiB
                    pieces and committed one after the other (no hashing)."""
                    obj = store.pack_target
                    with open(raw, "rb", buffering=0) as f:
                        for k in range(0, size, obj):
                            w = store.open_writer(f"bench/{k // obj:06d}")
                            for _ in range(obj // (4 * MiB)):
                                piece = f.read(4 * MiB)
                                if not piece:
                                    break
                                w.write(piece)
                            w.commit()

                # nfs-cp never sends a COMMIT (its writes are UNSTABLE and it closes
                # without nfs_fsync) and smbclient put never a FLUSH: their files are
                # made durable on the server (local here) as our commits make ours,
                # like `+ fsync` elsewhere
                served = nfs.export if kind == "nfs" else smb.root / "backups" if kind == "smb" else None

                def the_peer():
                    run(peer)
                    if served:
                        fd = os.open(served / f"{sub}-peer.raw", os.O_RDONLY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)

                order = [("ours", lambda: backup(pool, vol, snap, repo)), ("store", store_only)]
                if r % 2:
                    order.reverse()
                # the peer overwrites a LUN raw: there it always goes last
                if r % 2 and kind in ("nfs", "smb", "s3"):
                    order.insert(0, ("peer", the_peer))
                else:
                    order.append(("peer", the_peer))
                for who, fn in order:
                    os.sync()
                    wall, used = timed(fn)
                    results[kind][who].append(wall)
                    cpu[kind][who].append(used)
                store.close()
                if kind == "nfs":
                    shutil.rmtree(nfs.export / sub, ignore_errors=True)
                    os.unlink(nfs.export / f"{sub}-peer.raw")
                elif kind == "smb":
                    shutil.rmtree(smb.root / "backups" / sub, ignore_errors=True)
                    os.unlink(smb.root / "backups" / f"{sub}-peer.raw")
                elif kind == "s3":  # the OSD's space back for the next run
                    rgw.s3cmd("del", "--recursive", "--force", f"s3://{bucket}/{sub}", check=False)
                    rgw.s3cmd("del", f"s3://{bucket}/{sub}-peer.raw", check=False)
                if os.environ.get("BENCH_VERBOSE"):
                    print(kind, r, {w: round(v[-1], 2) for w, v in results[kind].items()}, flush=True)

        gib = size / (1 << 30)
        print(f"\nfull backup of {gib:g} GiB of random data, median of {args.runs} runs (throughput = data / time)\n")
        print("| target | ours: full backup | ours: store only | peer | backup/peer | store/peer | target |")
        print("|---|---|---|---|---|---|---|")
        peers = {
            "nfs": "`nfs-cp` + fsync on the server",
            "smb": "`smbclient put` + fsync on the server",
            "iscsi": "`qemu-img convert -t writeback` to the LUN",
            "block": "`dd oflag=direct conv=fsync bs=4M`",
            "s3": "`s3cmd put` (16 MiB parts)",
        }
        for kind in kinds:
            o, p = statistics.median(results[kind]["ours"]), statistics.median(results[kind]["peer"])
            st = statistics.median(results[kind]["store"])
            print(
                f"| {kind} | {o:.2f} s ({size / o / 1e6:.0f} MB/s) | {st:.2f} s ({size / st / 1e6:.0f} MB/s) | "
                f"{peers[kind]} {p:.2f} s ({size / p / 1e6:.0f} MB/s) | {p / o:.2f}x | {p / st:.2f}x | >= 0.9x |"
            )
        print(f"\nmachine CPU seconds (all processes and the kernel: client, server, disk), {os.cpu_count()} CPUs\n")
        print("| target | ours: full backup | ours: store only | peer |")
        print("|---|---|---|---|")
        for kind in kinds:
            m = {w: statistics.median(cpu[kind][w]) for w in ("ours", "store", "peer")}
            print(f"| {kind} | {m['ours']:.2f} | {m['store']:.2f} | {m['peer']:.2f} |")
    finally:
        for s in servers:
            s.destroy()
        if rgw is not None:
            rgw.stop()
        if ceph is not None:
            ceph.destroy()
        try:
            loop.detach()
        except Exception:
            pass
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
