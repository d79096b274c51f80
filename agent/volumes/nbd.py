"""qemu-nbd servers started and stopped by the agent, and a libnbd client.

Reads and writes of volume data go through NBD: qemu-nbd serves the image
(read-only for snapshots, writable for clones and restores) on a unix socket
in the agent's runtime directory, and libnbd moves the data with several
requests in flight and a pool of reused buffers.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator

import nbd

from agent import procs
from agent.errors import StorageIOError
from agent.extents import AllocExtent, Extent
from agent.volumes.base import SnapshotReader
from agent.volumes.qemu_objects import with_objects

log = logging.getLogger("agent.nbd")

# NBD_STATE_* flags of base:allocation
STATE_HOLE = 1
STATE_ZERO = 2
# A block-status request may cover at most 4 GiB - 1; ask in 2 GiB steps.
STATUS_STEP = 2 << 30
REQUEST_SIZE = 4 << 20
IN_FLIGHT = 8


class QemuNbd:
    """A qemu-nbd server for one image, alive for the `with` block only."""

    def __init__(
        self,
        image: str,
        *,
        fmt: str = "qcow2",
        readonly: bool = True,
        bitmap: str | None = None,
        run_dir: str | None = None,
        image_opts: str | None = None,
    ):
        self.image = image
        self.fmt = fmt
        self.readonly = readonly
        self.bitmap = bitmap
        self.image_opts = image_opts
        self.run_dir = run_dir or tempfile.gettempdir()
        self.socket = os.path.join(self.run_dir, f"nbd-{uuid.uuid4().hex[:12]}.sock")
        self.child: procs.Child | None = None

    def start(self) -> QemuNbd:
        os.makedirs(self.run_dir, mode=0o750, exist_ok=True)
        argv = ["qemu-nbd", "--persistent", "--shared=16", f"--socket={self.socket}"]
        if self.readonly:
            argv.append("--read-only")
        else:
            argv += ["--discard=unmap", "--detect-zeroes=unmap"]
        if self.bitmap:
            argv += ["--bitmap", self.bitmap]
        if self.image_opts:
            argv += ["--image-opts", self.image_opts]
        else:
            argv += ["--format", self.fmt, self.image]
        self.child = procs.Child(with_objects(argv), name="qemu-nbd")

        def ready() -> bool:
            if not self.child.alive():
                return True
            if not os.path.exists(self.socket):
                return False
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(self.socket)
                    return True
                except OSError:
                    return False

        procs.wait_for(ready, timeout=30, interval=0.001)
        if not self.child.alive():
            err = self.child.stderr_tail()
            self.child.stop()
            raise StorageIOError(f"qemu-nbd could not serve {self.image}: {err.splitlines()[-1] if err else 'exited'}")
        return self

    def stop(self) -> None:
        if self.child:
            self.child.stop()
            self.child = None
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass

    def __enter__(self) -> QemuNbd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def connect(self, *, bitmap_context: bool = False) -> NbdClient:
        contexts = ["base:allocation"]
        if bitmap_context and self.bitmap:
            contexts.append(f"qemu:dirty-bitmap:{self.bitmap}")
        return NbdClient(self.socket, contexts)


class _BufferPool:
    """Process-wide I/O buffers for libnbd aio calls. The python binding of
    libnbd 1.14 (Debian 12) keeps a reference to the buffer of every
    aio_pread/aio_pwrite forever, so a buffer handed to it is never freed;
    measured: 32 MiB more RSS per client. Reusing the same buffers across
    clients keeps memory flat: the pool only grows to the most buffers in
    flight at once."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self, size: int) -> bytearray:
        with self._lock:
            best = None
            for i, b in enumerate(self._free):
                if len(b) >= size and (best is None or len(b) < len(self._free[best])):
                    best = i
            if best is not None:
                return self._free.pop(best)
        return bytearray(max(size, REQUEST_SIZE))

    def put(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)


BUFFERS = _BufferPool()


class NbdClient:
    def __init__(self, socket_path: str, contexts: Iterable[str] = ("base:allocation",), export: str = ""):
        self.h = nbd.NBD()
        if export:
            self.h.set_export_name(export)
        self._held: bytearray | None = None  # the buffer on_data keeps (see hold())
        for c in contexts:
            self.h.add_meta_context(c)
        try:
            self.h.connect_unix(socket_path)
        except nbd.Error as e:
            raise StorageIOError(f"cannot connect to NBD server {socket_path}: {e}") from None
        self.size = self.h.get_size()

    def close(self) -> None:
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        # libnbd 1.14 has no close(): the handle is freed with its last reference.

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- extents ----

    def _status(self, context: str) -> Iterator[tuple[int, int, int]]:
        offset = 0
        while offset < self.size:
            got: list[tuple[int, int, int]] = []

            def cb(meta, start, entries, err, got=got):
                if meta != context:
                    return 0
                pos = start
                for i in range(0, len(entries), 2):
                    got.append((pos, entries[i], entries[i + 1]))
                    pos += entries[i]
                return 0

            self.h.block_status(min(STATUS_STEP, self.size - offset), offset, cb)
            if not got:
                raise StorageIOError(f"NBD server sent no {context} extents at offset {offset}")
            for start, length, flags in got:
                length = min(length, self.size - start)
                if length > 0:
                    yield start, length, flags
            offset = got[-1][0] + got[-1][1]

    def allocation(self) -> list[AllocExtent]:
        """Data and zero extents of the whole export (merged)."""
        out: list[AllocExtent] = []
        for start, length, flags in self._status("base:allocation"):
            zero, hole = bool(flags & STATE_ZERO), bool(flags & STATE_HOLE)
            if out and out[-1].end == start and out[-1].zero == zero and out[-1].hole == hole:
                out[-1] = AllocExtent(out[-1].start, out[-1].length + length, zero, hole)
            else:
                out.append(AllocExtent(start, length, zero, hole))
        return out

    def dirty(self, bitmap: str) -> list[Extent]:
        """Extents marked in a dirty bitmap exported with qemu-nbd --bitmap."""
        out: list[Extent] = []
        for start, length, flags in self._status(f"qemu:dirty-bitmap:{bitmap}"):
            if not flags & 1:
                continue
            if out and out[-1].end == start:
                out[-1] = Extent(out[-1].start, out[-1].length + length)
            else:
                out.append(Extent(start, length))
        return out

    # ---- data ----

    def read_extents(
        self,
        extents: Iterable[Extent],
        on_data: Callable[[int, memoryview], None],
        *,
        request_size: int = REQUEST_SIZE,
        in_flight: int = IN_FLIGHT,
        checkpoint: Callable[[], None] | None = None,
    ) -> None:
        """Read the extents with up to `in_flight` requests outstanding and
        call on_data(offset, view) in offset order. The view is valid only
        during the call (its buffer is reused)."""
        requests = (
            (off, min(request_size, e.end - off)) for e in extents for off in range(e.start, e.end, request_size)
        )
        pending: collections.deque = collections.deque()
        h = self.h
        try:
            for offset, length in requests:
                buf = BUFFERS.get(length)
                cookie = h.aio_pread(nbd.Buffer.from_buffer(memoryview(buf)[:length]), offset)
                pending.append((cookie, offset, length, buf))
                while len(pending) >= in_flight:
                    self._deliver(pending, on_data, checkpoint)
            while pending:
                self._deliver(pending, on_data, checkpoint)
        except nbd.Error as e:
            raise StorageIOError(f"NBD read failed: {e}") from None
        finally:
            # after an error, wait out what is in flight: the buffers are ours
            for cookie, _, _, buf in pending:
                try:
                    while not h.aio_command_completed(cookie):
                        h.poll(-1)
                except nbd.Error:
                    continue  # never completed: the buffer may still be written to; leave it out of the pool
                BUFFERS.put(buf)
            pending.clear()

    def _deliver(self, pending, on_data, checkpoint) -> None:
        cookie, offset, length, buf = pending[0]
        while not self.h.aio_command_completed(cookie):
            self.h.poll(-1)
        pending.popleft()
        self._held = None
        try:
            if checkpoint:
                checkpoint()
            on_data(offset, memoryview(buf)[:length])
        finally:
            if self._held is not buf:
                BUFFERS.put(buf)
            self._held = None

    def hold(self, view: memoryview) -> Callable[[], None]:
        """Inside read_extents' on_data: keep this buffer past the call (no
        copy); the returned function gives it back to the pool."""
        buf = view.obj
        self._held = buf
        return lambda: BUFFERS.put(buf)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        for pos in range(0, len(view), REQUEST_SIZE):  # servers take at most 32 MiB a request
            self.h.pwrite(view[pos : pos + REQUEST_SIZE], offset + pos)

    def zero(self, length: int, offset: int, *, punch_hole: bool = True) -> None:
        pos = offset
        while pos < offset + length:
            n = min(1 << 30, offset + length - pos)
            self.h.zero(n, pos, 0 if punch_hole else nbd.CMD_FLAG_NO_HOLE)
            pos += n

    def pread(self, length: int, offset: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def flush(self) -> None:
        self.h.flush()


class NbdSnapshotReader(SnapshotReader):
    """A snapshot read through an NBD client (qemu-nbd, or a hypervisor's export)."""

    def __init__(self, client):
        self.client = client

    def size(self) -> int:
        return self.client.size

    def extents(self) -> list[AllocExtent]:
        return self.client.allocation()

    def read(self, extents, on_data, request_size: int, checkpoint=None) -> None:
        self.client.read_extents(extents, on_data, request_size=request_size, checkpoint=checkpoint)

    def hold(self, view):
        return self.client.hold(view)


class AsyncWriter:
    """Writes with several requests in flight from a pool of reused buffers."""

    def __init__(self, client: NbdClient, *, in_flight: int = IN_FLIGHT):
        self.client = client
        self.in_flight = in_flight
        self._pending: collections.deque = collections.deque()

    def write(self, data, offset: int) -> None:
        n = len(data)
        buf = BUFFERS.get(n)
        view = memoryview(buf)[:n]
        view[:] = data
        cookie = self.client.h.aio_pwrite(nbd.Buffer.from_buffer(view), offset)
        self._pending.append((cookie, buf))
        while len(self._pending) >= self.in_flight:
            self._retire()

    def _retire(self) -> None:
        cookie, buf = self._pending[0]
        h = self.client.h
        try:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        except nbd.Error as e:
            raise StorageIOError(f"NBD write failed: {e}") from None
        self._pending.popleft()
        BUFFERS.put(buf)

    def finish(self) -> None:
        while self._pending:
            self._retire()
        self.client.flush()
