"""A small ext4 file system on a loop device, mounted where a test server
exports or shares it: the way to make a real server run out of space."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def mount_small_fs(img: Path, mountpoint: Path, size: int) -> str:
    """Create, format and mount it; returns the loop device."""
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
    loop = subprocess.run(
        ["losetup", "-f", "--show", str(img)], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(["mount", loop, str(mountpoint)], check=True)
    return loop


def unmount_small_fs(mountpoint: Path, loop: str) -> None:
    """Unmount (the server's helpers may hold it for a moment) and detach."""
    for _ in range(50):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    else:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    subprocess.run(["losetup", "-d", loop], check=False)
