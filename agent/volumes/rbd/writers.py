"""Writing RBD images: aio writes with a bounded number in flight, and the
two restore targets, in place (the live image) and into a new volume (a
hidden temporary image renamed when complete)."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING

import rados
import rbd

from agent import native
from agent.errors import StorageIOError
from agent.volumes.base import RestoreTarget, VolumeInfo
from agent.volumes.rbd.reader import IN_FLIGHT

if TYPE_CHECKING:
    from agent.volumes.rbd.driver import RbdPool

log = logging.getLogger("agent.rbd")

ZERO_BLOCK = 65536


class RbdWriter:
    """aio_write with a bounded number in flight; zero blocks are skipped or
    sent as write_zeroes (exact, unlike an unaligned discard)."""

    def __init__(self, img, *, in_flight: int = IN_FLIGHT, fresh: bool = True):
        self.img = img
        self.in_flight = in_flight
        self.fresh = fresh  # a new image already reads as zeros
        self._pending: collections.deque = collections.deque()
        self.written = 0

    def write(self, data, offset: int) -> None:
        comp = self.img.aio_write(bytes(data), offset, None)
        self._pending.append(comp)
        self.written += len(data)
        while len(self._pending) >= self.in_flight:
            self._retire()

    def zero(self, length: int, offset: int) -> None:
        if not self.fresh:
            self.img.write_zeroes(offset, length)

    def write_nonzero(self, view, offset: int) -> None:
        pos = 0
        for a, b in native.nonzero_runs(view, ZERO_BLOCK):
            if a > pos:
                self.zero(a - pos, offset + pos)
            self.write(view[a:b], offset + a)
            pos = b
        if pos < len(view):
            self.zero(len(view) - pos, offset + pos)

    def _retire(self) -> None:
        comp = self._pending.popleft()
        comp.wait_for_complete_and_cb()
        rv = comp.get_return_value()
        if rv < 0:
            raise StorageIOError(f"RBD write failed: {rv}")

    def finish(self) -> None:
        while self._pending:
            self._retire()
        self.img.flush()


class RbdOverwriteTarget(RestoreTarget):
    """A restore in place into the live image: refused while a client has
    it open (watchers); zero ranges are written as zeros (write_zeroes)."""

    def __init__(self, pool: RbdPool, vol: str):
        self.pool, self.vol = pool, vol
        self._io_cm = pool.ioctx()
        self.io = self._io_cm.__enter__()
        self.img = None
        try:
            pool.refuse_if_open(self.io, vol)
            self.img = rbd.Image(self.io, vol)
            self.writer = RbdWriter(self.img, fresh=False)
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data) -> None:
        self.writer.write_nonzero(memoryview(data), offset)

    def zero(self, offset: int, length: int) -> None:
        self.img.write_zeroes(offset, length)

    def commit(self) -> VolumeInfo:
        try:
            self.writer.finish()
            info = self.pool.info_of(self.io, self.img, self.vol)
        finally:
            self.abort()
        return info

    def abort(self) -> None:
        if self.img is not None:
            try:
                self.writer.finish()  # wait out writes in flight
            except Exception:  # noqa: BLE001 - the restore reports its own error
                pass
            self.img.close()
            self.img = None
        if self.io is not None:
            self._io_cm.__exit__(None, None, None)
            self.io = None


class RbdRestoreTarget(RestoreTarget):
    """Writes into a hidden temporary image (.<uuid>.restore) with aio;
    commit() stamps the name and renames it to the volume uuid."""

    def __init__(self, pool: RbdPool, vol: str, name: str, capacity: int):
        self.pool, self.vol, self.name = pool, vol, name
        self.tmp = f".{vol}.restore"
        self._io_cm = pool.ioctx()
        self.io = self._io_cm.__enter__()
        self.img = None
        try:
            try:
                rbd.RBD().remove(self.io, self.tmp)  # a leftover of an interrupted restore of this very id
            except rbd.ImageNotFound:
                pass
            rbd.RBD().create(self.io, self.tmp, capacity, old_format=False, features=pool.features)
            self.img = rbd.Image(self.io, self.tmp)
            self.writer = RbdWriter(self.img)
        except BaseException:
            self.abort()
            raise

    def write(self, offset: int, data) -> None:
        self.writer.write_nonzero(memoryview(data), offset)

    def _close_image(self) -> None:
        if self.img is not None:
            self.img.close()
            self.img = None

    def commit(self) -> VolumeInfo:
        try:
            self.writer.finish()
            self.pool.stamp(self.img, self.name)
            self._close_image()
            rbd.RBD().rename(self.io, self.tmp, self.vol)
            with self.pool.open_image(self.io, self.vol) as img:
                info = self.pool.info_of(self.io, img, self.vol)
        except BaseException:
            self.abort()
            raise
        self._io_cm.__exit__(None, None, None)
        return info

    def abort(self) -> None:
        if self.io is None:
            return
        try:
            try:
                self.writer.finish()  # wait out writes in flight before removing the image
            except Exception:
                pass
            self._close_image()
            rbd.RBD().remove(self.io, self.tmp)
        except rbd.ImageNotFound:
            pass
        except (rbd.Error, rados.Error) as e:
            log.error("could not remove a partial restore", extra={"image": self.tmp, "error": str(e)})
        finally:
            self._io_cm.__exit__(None, None, None)
            self.io = None
