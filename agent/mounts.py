"""A backup's disk opened on this host, read-only: the agent's NBD export
shown as a file by nbdfuse, its partitions found by partx, and each
filesystem the kernel can read mounted through a loop device at the
partition's offset (`mount -o loop,offset=,sizelimit=`), read-only and
without replaying a journal, so nothing is ever written to the backup or
to the disk image.

A mount directory holds:

    DIR/disk.raw    the whole disk (nbdfuse over a regular file)
    DIR/p1, p2 ...  the partitions' filesystems (or DIR/fs for a disk
                    without a partition table)
    DIR/.blockferry-mount.json  what was mounted, for `umount`

Needs root (loop devices and mount). The loop devices are set up by
mount with autoclear, so unmounting a filesystem frees its loop."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent import procs
from agent.errors import FailedPrecondition, InvalidArgument, StorageIOError

STATE = ".blockferry-mount.json"
IMAGE = "disk.raw"
START_TIMEOUT = 30.0
SECTOR = 512

# read-only and no journal replay: a dirty filesystem is shown as it was
# when the snapshot was taken, and the image is never written to
OPTIONS = {
    "ext2": "ro",
    "ext3": "ro,noload",
    "ext4": "ro,noload",
    "xfs": "ro,norecovery,nouuid",
    "vfat": "ro",
    "btrfs": "ro,rescue=nologreplay",
}


@dataclass
class Filesystem:
    name: str  # p1, p2, ... or fs for a disk without a partition table
    offset: int
    size: int
    type: str  # as blkid names it; "" when it found none
    mounted: bool = False
    why: str = ""  # why it is not mounted


@dataclass
class Mount:
    dir: str
    export_id: str
    created_dir: bool
    nbdfuse_pid: int = 0
    partition_table: str = ""
    filesystems: list[Filesystem] = field(default_factory=list)

    @property
    def image(self) -> str:
        return os.path.join(self.dir, IMAGE)

    def save(self) -> None:
        tmp = os.path.join(self.dir, STATE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, os.path.join(self.dir, STATE))

    @classmethod
    def load(cls, directory: str) -> Mount:
        path = os.path.join(directory, STATE)
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise InvalidArgument(f"dir: {directory} is not a blockferry backup mount", field="dir") from None
        raw["filesystems"] = [Filesystem(**x) for x in raw["filesystems"]]
        return cls(**raw)


def _need_root() -> None:
    if os.geteuid() != 0:
        raise FailedPrecondition("opening a backup's filesystems needs root (loop devices and mount)")


def _kernel_filesystems() -> set[str]:
    with open("/proc/filesystems") as f:
        return {line.split()[-1] for line in f if line.strip()}


def probe(image: str, offset: int = 0) -> dict[str, str]:
    """What blkid finds at an offset of the image: TYPE, PTTYPE, LABEL, ..."""
    cp = procs.run(["blkid", "-p", "-o", "export", "-O", str(offset), image], timeout=30, check=False)
    if cp.returncode not in (0, 2):  # 2: nothing found
        raise StorageIOError(f"blkid {image}: {cp.stderr.strip() or cp.returncode}")
    return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)


def partitions(image: str) -> list[tuple[int, int, int]]:
    """(number, offset, size) in bytes of each partition in the image's table."""
    cp = procs.run(["partx", "--raw", "--noheadings", "--output", "NR,START,SECTORS", image], timeout=30, what="partx")
    found = []
    for line in cp.stdout.split("\n"):
        if line.strip():
            nr, start, sectors = (int(x) for x in line.split())
            found.append((nr, start * SECTOR, sectors * SECTOR))
    return found


def filesystems(image: str) -> tuple[str, list[Filesystem]]:
    """The partition table type ("" for none) and the filesystems on the disk."""
    whole = probe(image)
    size = os.path.getsize(image)
    if whole.get("PTTYPE"):
        found = [
            Filesystem(f"p{nr}", off, length, probe(image, off).get("TYPE", ""))
            for nr, off, length in partitions(image)
        ]
        return whole["PTTYPE"], found
    return "", [Filesystem("fs", 0, size, whole.get("TYPE", ""))]


def _start_nbdfuse(m: Mount, socket: str) -> None:
    Path(m.image).touch()
    pidfile = os.path.join(m.dir, ".nbdfuse.pid")
    errors = os.path.join(m.dir, ".nbdfuse.err")
    with open(errors, "wb") as err:
        proc = subprocess.Popen(
            ["nbdfuse", "--readonly", "--pidfile", pidfile, m.image, "--unix", socket],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # it serves the file after this command ends
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not os.path.exists(pidfile):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            why = Path(errors).read_text().strip().splitlines()
            raise StorageIOError(f"nbdfuse could not show the export as a file: {why[-1] if why else 'timed out'}")
        time.sleep(0.02)
    m.nbdfuse_pid = proc.pid
    os.unlink(errors)


def mount(socket: str, export_id: str, directory: str) -> Mount:
    """Show the export at `socket` under `directory` (an empty directory, or
    one to create), its filesystems mounted read-only. Undoes itself on
    failure."""
    _need_root()
    d = os.path.abspath(directory)
    created = not os.path.exists(d)
    if created:
        os.makedirs(d, mode=0o700)
    elif not os.path.isdir(d) or os.listdir(d):
        raise InvalidArgument(f"dir: {d} must be an empty directory (or not exist yet)", field="dir")
    m = Mount(d, export_id, created)
    m.save()
    try:
        _start_nbdfuse(m, socket)
        m.save()
        m.partition_table, m.filesystems = filesystems(m.image)
        known = _kernel_filesystems()
        for fs in m.filesystems:
            _mount_one(m, fs, known)
            m.save()
    except BaseException as first:
        try:
            umount(d)
        except Exception as e:  # the first error is the one to show
            first.add_note(f"{d} is left half mounted ({e}): run umount on it")
        raise
    return m


def _mount_one(m: Mount, fs: Filesystem, known: set[str]) -> None:
    if not fs.type:
        fs.why = "no filesystem found"
        return
    if fs.type not in OPTIONS:
        fs.why = f"{fs.type} is not a filesystem this command mounts"
        return
    if fs.type not in known:
        fs.why = f"this host's kernel has no {fs.type} driver"
        return
    target = os.path.join(m.dir, fs.name)
    os.mkdir(target, 0o700)
    opts = f"{OPTIONS[fs.type]},loop,offset={fs.offset},sizelimit={fs.size}"
    cp = procs.run(["mount", "-t", fs.type, "-o", opts, m.image, target], timeout=60, check=False)
    if cp.returncode != 0:
        os.rmdir(target)
        fs.why = (cp.stderr.strip().splitlines() or [f"mount exit code {cp.returncode}"])[-1]
        return
    fs.mounted = True


def umount(directory: str) -> Mount:
    """Unmount what `mount` mounted under `directory`, nbdfuse last, and
    remove what it created. Returns the mount (its export_id is the
    caller's to end)."""
    _need_root()
    m = Mount.load(os.path.abspath(directory))
    for fs in reversed(m.filesystems):
        target = os.path.join(m.dir, fs.name)
        if fs.mounted:
            procs.run(["umount", target], timeout=120, what=f"umount {target}")
            fs.mounted = False
            m.save()
        if os.path.isdir(target):
            os.rmdir(target)
    if m.nbdfuse_pid:
        if os.path.ismount(m.image):
            procs.run(["umount", m.image], timeout=120, what=f"umount {m.image}")
        deadline = time.monotonic() + START_TIMEOUT
        while _alive(m.nbdfuse_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    for name in (IMAGE, ".nbdfuse.pid", ".nbdfuse.err", STATE):
        try:
            os.unlink(os.path.join(m.dir, name))
        except FileNotFoundError:
            pass
    if m.created_dir:
        os.rmdir(m.dir)
    return m


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (its parent, an earlier command, is gone, so it is reaped by init soon) counts as ended
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
