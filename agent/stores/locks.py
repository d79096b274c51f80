"""Repository locks, kept in the repository itself so that every agent that
reaches the backup point sees them.

Backups, restores, verifies and deletes take a shared lock; garbage
collection takes the exclusive lock. A lock is an object locks/<id> naming
its holder (host, boot id, pid) and refreshed while held. To acquire, a
holder first writes its lock and then lists the others: if a conflicting lock
is there it removes its own and retries, so of two racing holders at least
one always sees the other. A lock is stale, and removed by whoever finds it,
when its holder ran on this host in this boot and its process is gone (an
agent killed with -9), or when it was not refreshed for `stale_after`
seconds (a host that died).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from agent.errors import NotFound, RepositoryLocked

log = logging.getLogger("agent.repo")

SHARED, EXCLUSIVE = "shared", "exclusive"
STALE_AFTER = 900.0
REFRESH_EVERY = 60.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass
class LockRecord:
    id: str
    mode: str
    purpose: str
    host: str
    boot_id: str
    pid: int
    created: float
    refreshed: float

    def stale(self, now: float, stale_after: float) -> bool:
        if self.host == socket.gethostname() and self.boot_id == _boot_id():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return now - self.refreshed > stale_after

    def describe(self) -> str:
        return f"{self.purpose} ({self.mode}) held by {self.host} pid {self.pid} since {time.ctime(self.created)}"


class RepoLock:
    def __init__(
        self,
        store,
        mode: str,
        purpose: str,
        *,
        timeout: float = 0.0,
        stale_after: float = STALE_AFTER,
        checkpoint=None,
        prefix: str = "locks",
        busy=None,
    ):
        """prefix: where the lock objects live (another lock family than the
        repository's, e.g. one per volume of an NFS pool); busy(record):
        the error when the timeout ends with a conflicting holder."""
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.busy = busy
        self.store = store
        self.mode = mode
        self.record = LockRecord(
            uuid.uuid4().hex, mode, purpose, socket.gethostname(), _boot_id(), os.getpid(), time.time(), time.time()
        )
        self.name = f"{prefix}/{self.record.id}"
        self.timeout = timeout
        self.stale_after = stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.record.refreshed = time.time()
        # not synced: a crash that loses a lock record also ended its holder
        self.store.publish(self.name, json.dumps(asdict(self.record)).encode(), durable=False)

    def _others(self) -> list[LockRecord]:
        out = []
        for name in self.store.list(self.prefix):
            if name == self.name:
                continue
            try:
                out.append(LockRecord(**json.loads(self.store.get(name))))
            except NotFound:
                continue  # released meanwhile
            except (ValueError, TypeError):
                log.warning("ignoring a malformed repository lock", extra={"lock": name})
        return out

    def _conflicts(self) -> list[LockRecord]:
        now = time.time()
        out = []
        for other in self._others():
            if other.stale(now, self.stale_after):
                log.warning(
                    "removing a stale lock", extra={"lock": f"{self.prefix}/{other.id}", "held": other.describe()}
                )
                self.store.delete(f"{self.prefix}/{other.id}")
            elif self.mode == EXCLUSIVE or other.mode == EXCLUSIVE:
                out.append(other)
        return out

    def acquire(self) -> RepoLock:
        deadline = time.monotonic() + self.timeout
        while True:
            self._write()
            conflicts = self._conflicts()
            if not conflicts:
                break
            self.store.delete(self.name)
            if time.monotonic() >= deadline:
                if self.busy:
                    raise self.busy(conflicts[0])
                raise RepositoryLocked(
                    f"backup point: the repository is locked by {conflicts[0].describe()}; try again when it ends",
                    field="backup_point_uuid",
                )
            if self.checkpoint:
                self.checkpoint()  # a waiting job can still be cancelled
            time.sleep(random.uniform(0.05, 0.5))
        self._thread = threading.Thread(target=self._refresh, name="repo-lock", daemon=True)
        self._thread.start()
        return self

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self._write()
            except Exception as e:  # the next refresh tries again; staleness takes 15 minutes
                log.warning("could not refresh a repository lock", extra={"error": str(e)})

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.store.delete(self.name)

    def __enter__(self) -> RepoLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release()
            return
        try:  # keep the error that ended the operation, not a failed cleanup
            self.release()
        except Exception as e:  # a lock record left behind goes stale (dead pid, or 15 minutes)
            log.warning("could not remove a repository lock", extra={"error": str(e), "lock": self.name})
