"""Bandwidth limits: the host's, shared by all its jobs; one per backup
point, shared by the jobs on it; and a job's own (a policy's). A job
moving data takes from each that applies and sleeps the longest. Rates
change in place (a config reload, a backup point redefined), so running
jobs follow a new limit at once."""

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

    def set_rate(self, rate: int) -> None:
        with self._lock:
            if rate != self._rate:
                self._rate, self._tokens, self._stamp = rate, 0.0, time.monotonic()

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


class Limits:
    """The host's limiter and one per named key (backup_point:<uuid>)."""

    def __init__(self, host_rate: int = 0):
        self.host = BandwidthLimiter(host_rate)
        self._lock = threading.Lock()
        self._named: dict[str, BandwidthLimiter] = {}

    def set(self, key: str, rate: int) -> None:
        """Set (or, with 0, lift) a named limit."""
        with self._lock:
            current = self._named.get(key)
            if current is None and rate > 0:
                self._named[key] = BandwidthLimiter(rate)
            elif current is not None:
                current.set_rate(rate)

    def get(self, key: str) -> BandwidthLimiter | None:
        with self._lock:
            return self._named.get(key)

    def rates(self) -> dict[str, int]:
        with self._lock:
            return {k: x.rate for k, x in self._named.items() if x.rate > 0}
