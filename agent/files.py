"""Files taken out of a backup's mounted filesystems (agent/mounts.py):
paths inside the mount resolved without ever following a link (a link in
the guest's tree points into the guest, and followed on this host it would
reach the host's own files), listings from lstat, and extraction with
coreutils' `cp -a --sparse=auto`: permissions, owners, times, links,
hard links inside the copied set, extended attributes and holes kept."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass

from agent.errors import InvalidArgument, NotFound, StorageIOError


@dataclass
class Entry:
    path: str  # relative to the mount directory, as the operator writes it
    mode: int
    uid: int
    gid: int
    size: int
    blocks: int  # 512-byte blocks allocated
    mtime_ns: int
    nlink: int
    target: str = ""  # a link's target

    @property
    def kind(self) -> str:
        return stat.filemode(self.mode)


def resolve(root: str, path: str) -> str:
    """The host path of `path` (p1/etc/hosts) under a mount directory,
    refusing `..` and any link on the way (the last component may be a link,
    shown or copied as a link)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"path: {path!r} must not contain '..'", field="path")
    here = root
    for i, part in enumerate(parts):
        here = os.path.join(here, part)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise NotFound(f"path: {'/'.join(parts[: i + 1])} is not in the backup") from None
        if stat.S_ISLNK(st.st_mode) and i < len(parts) - 1:
            raise InvalidArgument(
                f"path: {'/'.join(parts[: i + 1])} is a link to {os.readlink(here)} inside the backup; "
                "give the path it points to, starting at the filesystem's name",
                field="path",
            )
    return here


def entry(root: str, host_path: str) -> Entry:
    st = os.lstat(host_path)
    return Entry(
        os.path.relpath(host_path, root),
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_blocks,
        st.st_mtime_ns,
        st.st_nlink,
        os.readlink(host_path) if stat.S_ISLNK(st.st_mode) else "",
    )


def listing(root: str, path: str) -> list[Entry]:
    """A directory's entries, sorted by name, or the one entry of a file."""
    here = resolve(root, path)
    if stat.S_ISDIR(os.lstat(here).st_mode):
        return [entry(root, os.path.join(here, n)) for n in sorted(os.listdir(here))]
    return [entry(root, here)]


def extract(root: str, paths: list[str], dest: str) -> list[Entry]:
    """Copy files and directory trees out of the mount into `dest` (a
    directory, made if missing); each lands under its own last name. The
    copy is made in a hidden directory inside `dest` and moved into place
    only when all of it is there: a failed extract leaves nothing behind."""
    if not paths:
        raise InvalidArgument("path: name at least one file or directory to extract", field="path")
    sources = [resolve(root, p) for p in paths]
    if root in sources:
        raise InvalidArgument("path: name a filesystem (p1) or a path in one, not the whole mount", field="path")
    names = [os.path.basename(s) for s in sources]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise InvalidArgument(f"path: two sources would land on the same name: {sorted(clash)}", field="path")
    os.makedirs(dest, exist_ok=True)
    taken = [n for n in names if os.path.lexists(os.path.join(dest, n))]
    if taken:
        raise InvalidArgument(f"dest: {dest} already holds {sorted(taken)}; nothing was copied", field="dest")
    work = tempfile.mkdtemp(prefix=".blockferry-extract-", dir=dest)
    try:
        cp = subprocess.run(
            ["cp", "-a", "--sparse=auto", "--", *sources, work], capture_output=True, text=True, check=False
        )
        if cp.returncode != 0:
            raise StorageIOError(f"extract into {dest}: {cp.stderr.strip().splitlines()[-1]}; nothing was kept")
        for n in names:
            os.rename(os.path.join(work, n), os.path.join(dest, n))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [entry(dest, os.path.join(dest, n)) for n in names]
