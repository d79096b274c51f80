"""Backups opened on the host: a disk partitioned with sfdisk, ext4 and xfs
made by mkfs and filled with known files (a sparse file, hard links, a
255-byte name, owners, modes, times, links), backed up by a real agent;
then `blockferry backups files/extract/mount/umount` over the agent's NBD
export (nbdkit), nbdfuse, loop devices and read-only mounts. What comes
out is compared with what went in, file by file."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

from support.agents import BP_UUID
from support.backups import Bk
from support.volumes import MiB

# small filesystems: mkfs.xfs refuses under 300 MB unless told it is a test
XFS_ENV = {**os.environ, "TEST_DIR": "1", "TEST_DEV": "1", "QA_CHECK_FS": "1"}
LONG = "L" * 255
MTIME = 978_307_200_123_456_789  # 2001-01-01, with nanoseconds


def cli(agent, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert (r.returncode == 0) == ok, (args, r.returncode, r.stdout, r.stderr)
    return r


def fill(top: Path) -> None:
    """The known files, written into a mounted filesystem."""
    top.mkdir()
    (top / "plain").write_bytes(os.urandom(300_000))
    with open(top / "sparse", "wb") as f:  # 1 MiB, a 6 MiB hole, 1 MiB
        f.write(os.urandom(MiB))
        f.seek(7 * MiB)
        f.write(os.urandom(MiB))
    (top / "a").write_bytes(b"hard linked\n")
    os.link(top / "a", top / "b")
    (top / LONG).write_bytes(b"long name\n")
    (top / "secret").write_bytes(b"0600, owned by 1234:5678\n")
    os.chown(top / "secret", 1234, 5678)
    os.chmod(top / "secret", 0o600)
    (top / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(top / "tool", 0o4755)
    (top / "dir").mkdir(mode=0o750)
    (top / "dir" / "inner").write_bytes(b"inside\n")
    os.symlink("dir/inner", top / "rel-link")
    os.symlink("/etc", top / "abs-link")  # into the guest's /etc, never the host's
    for p in [top / n for n in ("plain", "sparse", "a", LONG, "secret", "tool", "dir/inner", "dir")]:
        os.utime(p, ns=(MTIME, MTIME))
    os.utime(top / "rel-link", ns=(MTIME, MTIME), follow_symlinks=False)


def tree(top: Path) -> dict[str, tuple]:
    """What a tree holds: per path its kind, mode, owner, size, mtime, hard
    link group, content digest or link target."""
    out = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            st = p.lstat()
            rel = str(p.relative_to(top))
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
                group = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else ""
            else:
                what = os.readlink(p) if p.is_symlink() else ""
                group = ""
            mtime = st.st_mtime_ns
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, size, mtime, group, what)
    return out


def make_disk(path: Path, work: Path, partitioned: bool) -> dict[str, dict]:
    """A disk image: GPT with ext4 (p1) and xfs (p2), or ext4 alone; each
    filled with the known files. Returns each filesystem's tree."""
    subprocess.run(["truncate", "-s", str(100 * MiB), str(path)], check=True)
    if partitioned:
        table = "label: gpt\nstart=2048, size=65536, name=root\nstart=67584, size=131072, name=data\n"
        subprocess.run(["sfdisk", "-q", str(path)], input=table, text=True, check=True)
        parts = {"p1": ("ext4", 2048 * 512, 65536 * 512), "p2": ("xfs", 67584 * 512, 131072 * 512)}
    else:
        parts = {"fs": ("ext4", 0, 100 * MiB)}
    trees = {}
    for name, (fstype, off, size) in parts.items():
        loop = subprocess.run(
            ["losetup", "-f", "--show", "-o", str(off), "--sizelimit", str(size), str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        mnt = work / f"fill-{name}"
        mnt.mkdir()
        try:
            if fstype == "xfs":
                subprocess.run(["mkfs.xfs", "-q", loop], env=XFS_ENV, check=True)
            else:
                subprocess.run(["mkfs.ext4", "-q", loop], check=True)
            subprocess.run(["mount", loop, str(mnt)], check=True)
            try:
                fill(mnt / "files")
                trees[name] = tree(mnt / "files")
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
        finally:
            subprocess.run(["losetup", "-d", loop], check=True)
    return trees


def backed_up(a, c, raw: Path, name: str) -> str:
    bk = Bk(a, c)
    vol = bk.create(capacity=raw.stat().st_size, name=name).uuid
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), bk.head(vol)], check=True)
    return bk.backup(vol, bk.snap(vol, "s").uuid).backup_uuid


def test_files_listed_extracted_and_mounted_from_a_backup(make_agent, short_tmp):
    a = make_agent().start()
    raw = short_tmp / "disk.raw"
    trees = make_disk(raw, short_tmp, partitioned=True)
    with a.client() as c:
        backup = backed_up(a, c, raw, "parted")

    # the filesystems, then a directory's entries
    listed = cli(a, "backups", "files", BP_UUID, backup).stdout
    assert "p1" in listed and "ext4" in listed and "p2" in listed and "xfs" in listed, listed
    assert "not mounted" not in listed, listed
    entries = cli(a, "backups", "files", BP_UUID, backup, "p2/files").stdout
    assert "-rwsr-xr-x" in entries and "1234:5678" in entries and LONG in entries and "abs-link -> /etc" in entries

    # extract from both filesystems: contents, modes, owners, times, hard links, links and holes kept
    dest = short_tmp / "out"
    cli(a, "backups", "extract", BP_UUID, backup, "p1/files", "p2/files/dir", "--to", str(dest))
    assert tree(dest / "files") == trees["p1"]
    assert tree(dest / "dir") == {k[4:]: v for k, v in trees["p2"].items() if k.startswith("dir/")}
    sparse = (dest / "files" / "sparse").stat()
    assert sparse.st_size == 8 * MiB and sparse.st_blocks * 512 <= 3 * MiB, sparse
    a_, b_ = (dest / "files" / "a").stat(), (dest / "files" / "b").stat()
    assert a_.st_ino == b_.st_ino and a_.st_nlink == 2

    # refused, naming the field, nothing copied: a link on the way, a name already there
    r = cli(a, "backups", "files", BP_UUID, backup, "p1/files/abs-link/passwd", ok=False)
    assert "path: p1/files/abs-link is a link to /etc" in r.stderr, r.stderr
    r = cli(a, "backups", "extract", BP_UUID, backup, "p2/files", "--to", str(dest), ok=False)
    assert "dest:" in r.stderr and "'files'" in r.stderr, r.stderr
    assert tree(dest / "files") == trees["p1"]

    # mount: the whole disk bit for bit, both filesystems browsable, then gone
    mnt = short_tmp / "mnt"
    out = cli(a, "backups", "mount", BP_UUID, backup, str(mnt)).stdout
    assert "gpt" in out, out
    assert hashlib.sha256((mnt / "disk.raw").read_bytes()).digest() == hashlib.sha256(raw.read_bytes()).digest()
    assert tree(mnt / "p1" / "files") == trees["p1"] and tree(mnt / "p2" / "files") == trees["p2"]
    assert "ro" in next(x for x in Path("/proc/mounts").read_text().splitlines() if str(mnt / "p2") in x).split()[3]
    assert backup in cli(a, "backups", "exports").stdout
    cli(a, "backups", "umount", str(mnt))
    assert not mnt.exists() and str(mnt) not in Path("/proc/mounts").read_text()
    assert backup not in cli(a, "backups", "exports").stdout


def test_a_disk_without_partition_table(make_agent, short_tmp):
    a = make_agent().start()
    raw = short_tmp / "plain.raw"
    trees = make_disk(raw, short_tmp, partitioned=False)
    with a.client() as c:
        backup = backed_up(a, c, raw, "plain")
    listed = cli(a, "backups", "files", BP_UUID, backup).stdout
    assert "fs" in listed and "ext4" in listed, listed
    dest = short_tmp / "out"
    cli(a, "backups", "extract", BP_UUID, backup, "fs/files/dir", "fs/files/sparse", "--to", str(dest))
    assert tree(dest / "dir") == {k[4:]: v for k, v in trees["fs"].items() if k.startswith("dir/")}
    assert hashlib.sha256((dest / "sparse").read_bytes()).hexdigest() == trees["fs"]["sparse"][-1]
