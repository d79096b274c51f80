"""Per-resource locks: many readers or one writer per resource."""

from __future__ import annotations

import enum
import threading


class LockMode(str, enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


class ResourceLocks:
    """Non-blocking: the engine asks, and keeps a job waiting while refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[LockMode, int]] = {}

    def try_acquire(self, resource: str, mode: LockMode) -> bool:
        with self._lock:
            held = self._held.get(resource)
            if held is None:
                self._held[resource] = (mode, 1)
                return True
            held_mode, count = held
            if mode is LockMode.SHARED and held_mode is LockMode.SHARED:
                self._held[resource] = (held_mode, count + 1)
                return True
            return False

    def would_block(self, resource: str, mode: LockMode) -> bool:
        with self._lock:
            held = self._held.get(resource)
            return held is not None and not (mode is LockMode.SHARED and held[0] is LockMode.SHARED)

    def release(self, resource: str) -> None:
        with self._lock:
            mode, count = self._held[resource]
            if count == 1:
                del self._held[resource]
            else:
                self._held[resource] = (mode, count - 1)
