"""Block devices a raw-LUN repository lives on: the interface, and local
block devices (FC LUNs, any disk, loop devices) opened with O_DIRECT.

Every offset and length is a multiple of BLOCK (4 KiB, which covers 512-byte
and 4 KiB sectors); O_DIRECT needs page-aligned memory, so data goes
through mmap-backed buffers. flush() asks the device to make completed
writes durable (fdatasync: a cache flush on the device).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import threading
from abc import ABC, abstractmethod

from agent.errors import FailedPrecondition, InvalidArgument, NotFound

BLOCK = 4096
STAGING = 4 << 20
BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268


class BlockDevice(ABC):
    label: str
    size: int
    sector_size: int = 512  # the device's logical sector size
    # how a LUN repository writes: pieces of io_size bytes, io_depth at once
    io_size: int = 4 << 20
    io_depth: int = 1
    # a LUN repository flushes the device in the background every pace_every
    # bytes written (0: only at its commits)
    pace_every: int = 0

    @abstractmethod
    def read(self, offset: int, length: int) -> memoryview:
        """length bytes at offset (both aligned), as a view that stays valid
        until this thread's next read."""

    @abstractmethod
    def write(self, offset: int, data) -> None:
        """Write data at an aligned offset; its length is a multiple of
        BLOCK and, for zero copy, it comes from buffer()."""

    def buffer(self, size: int) -> memoryview:
        """A writable buffer suited to write() (page-aligned memory)."""
        return memoryview(mmap.mmap(-1, size))

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


class _Staging(threading.local):
    def __init__(self):
        self.buf = mmap.mmap(-1, STAGING)


class LocalBlockDevice(BlockDevice):
    # O_DIRECT writes from several threads keep the device queue filled: 4
    # measured faster than 1 or 2 on a loop device (bench/targets_bench.py)
    io_depth = 4

    def __init__(self, path: str, *, label: str = "", exclusive: bool = True):
        self.label = label or path
        self.fd = -1
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise NotFound(f"device: {path} does not exist", field="device") from None
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidArgument(f"device: {path} is not a block device", field="device")
        try:
            # O_EXCL on a block device: refused while mounted or opened exclusively
            # elsewhere; a shared pool's LUN is opened by every qemu on the host too
            excl = os.O_EXCL if exclusive else 0
            self.fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC | excl)
        except OSError as e:
            how = "exclusively" if exclusive else "for reading and writing"
            raise FailedPrecondition(
                f"device: cannot open {path} {how}: {e.strerror} (mounted or in use?)", field="device"
            ) from None
        self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        sector = self.sector_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
        if BLOCK % sector:
            self.close()
            raise InvalidArgument(
                f"device: {path} has {sector}-byte sectors; 512 or 4096 are supported", field="device"
            )
        self._local = _Staging()

    def read(self, offset: int, length: int) -> memoryview:
        buf = self._local.buf
        if length > len(buf):
            buf = self._local.buf = mmap.mmap(-1, (length + BLOCK - 1) // BLOCK * BLOCK)
        view = memoryview(buf)[:length]
        got = 0
        while got < length:
            n = os.preadv(self.fd, [view[got:]], offset + got)
            if n <= 0:
                raise OSError(5, f"short read at {offset + got} of {self.label}")
            got += n
        return view

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        if len(view) % BLOCK or offset % BLOCK:
            raise ValueError("unaligned write")
        if not isinstance(view.obj, mmap.mmap):
            staged = self.buffer(len(view))  # O_DIRECT needs page-aligned memory
            staged[:] = view
            view = staged
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def refresh_size(self) -> int:
        """The device's size asked again (a LUN that grew: `losetup -c`, a rescan)."""
        self.size = struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        return self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
