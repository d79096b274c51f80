"""qcow2 volumes on a directory or an NFS export: the driver (driver.py),
its file layer (poolfs.py: local files or libnfs), the snapshot tree's
metadata (meta.py), the on-disk qcow2 readers (header.py, map.py, bitmap.py:
the dirty bitmaps), direct cluster I/O for backups and restores (direct.py)
and the qemu-img calls (qemu_img.py)."""

from agent.volumes.qcow2.driver import Qcow2Pool

__all__ = ["Qcow2Pool"]
