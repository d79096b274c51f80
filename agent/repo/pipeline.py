"""An ordered pipeline with three stages running at once: the caller submits
items (a reader thread, usually), a small pool of workers transforms them
(the native digests, zstd and AES-GCM release the GIL), and one retire thread
consumes the results in submission order (writing packs, or a volume). At
most `depth` items are between submit and retire, so memory stays bounded.

An error in a worker or in retire stops the pipeline: the next submit() or
drain() raises it in the caller's thread.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

WORKERS = max(2, min(4, os.cpu_count() or 2))
_DONE = object()


class OrderedPipeline:
    def __init__(
        self,
        work: Callable[..., Any],
        retire: Callable[[Any], None],
        *,
        workers: int = WORKERS,
        depth: int | None = None,
    ):
        self.work = work
        self.retire = retire
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bf-work")
        self._queue: queue.Queue = queue.Queue(maxsize=depth or workers * 2)
        self._error: BaseException | None = None
        self._stop = False
        self._retirer = threading.Thread(target=self._retire_loop, name="bf-retire", daemon=True)
        self._retirer.start()
        self._closed = False

    def _retire_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if self._error is not None or self._stop:
                item.cancel()
                continue
            try:
                self.retire(item.result())
            except BaseException as e:  # handed to the caller's thread
                self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, *args) -> None:
        self._raise()
        f: Future = self._pool.submit(self.work, *args)
        while True:
            try:
                self._queue.put(f, timeout=0.1)
                return
            except queue.Full:
                if self._error is not None:
                    f.cancel()
                    self._raise()

    def drain(self) -> None:
        """Wait until everything submitted is retired; raise its error."""
        self._finish()
        self._raise()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(_DONE)
            self._retirer.join()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop without retiring what is left (after an error or a cancel)."""
        self._stop = True
        self._finish()

    def __enter__(self) -> OrderedPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BufferPool:
    """Reused buffers of one size: fresh 4 MiB allocations cost page faults
    and let the allocator's heap grow; a handful of recycled ones do not."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        if n == self.size:
            with self._lock:
                if self._free:
                    return self._free.pop()
        return bytearray(n)

    def put(self, buf: bytearray) -> None:
        if len(buf) == self.size:
            with self._lock:
                self._free.append(buf)
