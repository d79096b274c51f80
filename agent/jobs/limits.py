"""A bandwidth limit shared by all jobs of the host."""

from __future__ import annotations

import threading
import time


class BandwidthLimiter:
    """Token bucket that may go into debt: a caller takes what it moved, and
    sleeps off any debt. rate 0 means unlimited."""

    def __init__(self, rate: int, burst_seconds: float = 0.25):
        self._lock = threading.Lock()
        self._rate = rate
        self._burst_seconds = burst_seconds
        self._tokens = 0.0
        self._stamp = time.monotonic()

    @property
    def rate(self) -> int:
        return self._rate

    def delay_for(self, nbytes: int) -> float:
        """Take nbytes and return how long the caller must sleep."""
        with self._lock:
            if self._rate <= 0:
                return 0.0
            now = time.monotonic()
            self._tokens = min(self._tokens + (now - self._stamp) * self._rate, self._rate * self._burst_seconds)
            self._stamp = now
            self._tokens -= nbytes
            return -self._tokens / self._rate if self._tokens < 0 else 0.0
