"""An ordered pipeline: work items go to a small thread pool (the native
digests, zstd and AES-GCM release the GIL), results come back in submission
order, with a bounded number in flight so memory stays bounded."""
from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

WORKERS = max(2, min(4, os.cpu_count() or 2))


class OrderedPipeline:
    def __init__(self, work: Callable[..., Any], retire: Callable[[Any], None], *, workers: int = WORKERS,
                 depth: int | None = None):
        self.work = work
        self.retire = retire
        self.depth = depth or workers * 2
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bf-pipe")
        self._pending: collections.deque[Future] = collections.deque()

    def submit(self, *args) -> None:
        self._pending.append(self._pool.submit(self.work, *args))
        while len(self._pending) > self.depth:
            self.retire(self._pending.popleft().result())

    def drain(self) -> None:
        while self._pending:
            self.retire(self._pending.popleft().result())

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()

    def __enter__(self) -> "OrderedPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
