"""Reading RBD images: aio reads with a bounded number in flight, delivered
in order, and the snapshot reader backups and copies use."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING

from agent.errors import StorageIOError
from agent.extents import AllocExtent, Extent
from agent.volumes.base import SnapshotReader

if TYPE_CHECKING:
    from agent.volumes.rbd.driver import RbdPool

REQUEST_SIZE = 4 << 20
IN_FLIGHT = 8


class RbdReader:
    """aio_read with a bounded number of requests in flight, delivered in order."""

    def __init__(self, img, *, request_size: int = REQUEST_SIZE, in_flight: int = IN_FLIGHT):
        self.img = img
        self.request_size = request_size
        self.in_flight = in_flight

    def read_extents(self, extents: Iterable[Extent], on_data, *, checkpoint=None) -> None:
        requests = (
            (off, min(self.request_size, e.end - off))
            for e in extents
            for off in range(e.start, e.end, self.request_size)
        )
        pending: collections.deque = collections.deque()
        results: dict[int, bytes | Exception] = {}

        def make_cb(offset):
            def cb(completion, data):
                rv = completion.get_return_value()
                results[offset] = data if rv >= 0 else StorageIOError(f"RBD read at {offset} failed: {rv}")

            return cb

        try:
            for offset, length in requests:
                pending.append((offset, self.img.aio_read(offset, length, make_cb(offset))))
                while len(pending) >= self.in_flight:
                    self._deliver(pending, results, on_data, checkpoint)
            while pending:
                self._deliver(pending, results, on_data, checkpoint)
        finally:
            for _, comp in pending:  # wait out what is in flight after an error
                comp.wait_for_complete_and_cb()

    @staticmethod
    def _deliver(pending, results, on_data, checkpoint) -> None:
        offset, comp = pending[0]
        comp.wait_for_complete_and_cb()  # returns after the callback has stored the result
        data = results.pop(offset)
        pending.popleft()
        if isinstance(data, Exception):
            raise data
        if checkpoint:
            checkpoint()
        on_data(offset, memoryview(data))


class RbdSnapshotReader(SnapshotReader):
    def __init__(self, pool: RbdPool, img):
        self.pool, self.img = pool, img

    def size(self) -> int:
        return self.img.size()

    def extents(self) -> list[AllocExtent]:
        return self.pool.alloc_extents(self.img)

    def read(self, extents, on_data, request_size: int, checkpoint=None) -> None:
        RbdReader(self.img, request_size=request_size).read_extents(extents, on_data, checkpoint=checkpoint)

    def hold(self, view):
        return _nothing  # each read returns a new bytes object: holding the view keeps it


def _nothing() -> None:
    pass
