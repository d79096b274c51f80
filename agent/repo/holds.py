"""Locks on backups: a backup that must not be deleted before a date.

A lock is an object `holds/<backup>.<until>` (sealed like a manifest) in
the repository; a backup's lock is the latest date among its objects, so
extending a lock writes a new object and never rewrites one, and nothing
ever shortens it. The agent refuses to delete a locked backup through any
API (DeleteBackup, the controller's deletes and retention), and gc keeps
every pack a locked backup needs as it is (no repack either), so an
expired lock is the only way its data can go.

Modes:
- "agent": the agent and the controller enforce the lock. Someone with the
  backup point's own credentials can still remove files or objects.
- "governance", "compliance" (S3 with object lock): every object the
  backup needs (its manifest, block digests, lock object, and each pack
  with its index) also carries the gateway's retention until that date,
  so the gateway itself refuses to delete their versions (compliance:
  nobody can, not even with bypass rights).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.errors import BackupLocked, InvalidArgument, NotFound
from agent.repo.format import ZERO, Manifest
from agent.repo.repository import Repository

log = logging.getLogger("agent.holds")

MODES = ("agent", "governance", "compliance")
PREFIX = "holds"


@dataclass(frozen=True)
class Lock:
    """What a backup should get: locked until (unix seconds), and how."""

    until: float
    mode: str = "agent"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"lock_mode: must be one of {', '.join(MODES)}, not {self.mode!r}", field="lock_mode")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(backup_id: str, until: float) -> str:
    return f"{PREFIX}/{backup_id}.{int(until)}"


def _aad(name: str) -> bytes:
    return f"hold:{name}".encode()


def all_locks(repo: Repository) -> dict[str, Lock]:
    """Each backup's lock (the latest date among its lock objects), expired
    ones included."""
    out: dict[str, Lock] = {}
    for name in repo.store.list(PREFIX):
        try:
            raw = repo.store.get(name)
        except NotFound:
            continue  # removed meanwhile (an expired one, by gc)
        record = json.loads(repo.sealer.open(raw, _aad(name), f"lock {name}"))
        bid, until = record["backup"], float(record["until"])
        if bid not in out or until > out[bid].until:
            out[bid] = Lock(until, record.get("mode", "agent"))
    return out


def lock_of(repo: Repository, backup_id: str) -> Lock | None:
    found = None
    for name in repo.store.list(PREFIX):
        if name.rsplit("/", 1)[1].startswith(f"{backup_id}."):
            record = json.loads(repo.sealer.open(repo.store.get(name), _aad(name), f"lock {name}"))
            if found is None or float(record["until"]) > found.until:
                found = Lock(float(record["until"]), record.get("mode", "agent"))
    return found


def check_delete(repo: Repository, backup_id: str, *, now: float | None = None) -> None:
    """Raise BackupLocked when the backup's lock has not ended."""
    lock = lock_of(repo, backup_id)
    now = time.time() if now is None else now
    if lock is not None and lock.until > now:
        raise BackupLocked(
            f"backup {backup_id} is locked until {iso(lock.until)} ({lock.mode} lock): "
            "it cannot be deleted or pruned before then",
            field="backup_uuid",
        )


def _objects(repo: Repository, m: Manifest) -> list[str]:
    """Every object a backup needs to be restored."""
    packs = set()
    for c in m.chunks:
        if c != ZERO:
            loc = repo.location(bytes.fromhex(c))
            if loc is not None:
                packs.add(loc.pack)
    return [f"blocks/{m.backup_id}"] + sorted(p for pack in packs for p in (pack, f"{pack}.idx"))


def prepare(repo: Repository, m: Manifest, lock: Lock) -> None:
    """Before a backup's manifest is published: its lock object, and the
    gateway's retention on the data it needs (an S3 lock mode)."""
    _write(repo, m.backup_id, lock)
    if lock.mode != "agent":
        for name in _objects(repo, m) + [_name(m.backup_id, lock.until)]:
            repo.store.retain(name, lock.until, lock.mode)


def seal(repo: Repository, m: Manifest, lock: Lock) -> None:
    """After the manifest is published: its own retention."""
    if lock.mode != "agent":
        repo.store.retain(f"manifests/{m.backup_id}", lock.until, lock.mode)


def extend(repo: Repository, backup_id: str, until: float, *, mode: str = "agent", now: float | None = None) -> Lock:
    """Lock a published backup until a date, or extend its lock; a lock is
    never shortened and keeps its mode. A backup without a lock gets one
    of `mode` (its backup point's lock_mode)."""
    now = time.time() if now is None else now
    if until <= now:
        raise InvalidArgument(f"until: {iso(until)} is not in the future", field="until")
    m = repo.manifest(backup_id)
    current = lock_of(repo, backup_id)
    mode = current.mode if current is not None else mode
    if current is not None and until < current.until:
        raise InvalidArgument(
            f"until: backup {backup_id} is locked until {iso(current.until)}; a lock can only be extended",
            field="until",
        )
    lock = Lock(until, mode)
    prepare(repo, m, lock)
    seal(repo, m, lock)
    log.info("backup locked", extra={"backup": backup_id, "until": iso(until), "mode": mode})
    return lock


def _write(repo: Repository, backup_id: str, lock: Lock) -> None:
    name = _name(backup_id, lock.until)
    record = {"backup": backup_id, "until": lock.until, "mode": lock.mode, "at": time.time()}
    repo.store.publish(name, repo.sealer.seal(json.dumps(record).encode(), _aad(name)))


def pinned_packs(repo: Repository, locks: dict[str, Lock], manifests: list[Manifest], now: float) -> set[str]:
    """The packs (by name) that hold a chunk of a backup whose lock has not
    ended: gc neither deletes nor rewrites them."""
    held = {bid for bid, lock in locks.items() if lock.until > now}
    out = set()
    for m in manifests:
        if m.backup_id in held:
            for c in m.chunks:
                if c != ZERO:
                    loc = repo.location(bytes.fromhex(c))
                    if loc is not None:
                        out.add(loc.pack)
    return out


def sweep(repo: Repository, ids: set[str], now: float) -> int:
    """Remove the lock objects that ended of backups no longer listed;
    returns how many went. Unended ones of a backup that is not listed stay
    (a backup whose manifest was never published, or went around the API)."""
    n = 0
    for name in repo.store.list(PREFIX):
        bid, _, until = name.rsplit("/", 1)[1].rpartition(".")
        if bid not in ids and until.isdigit() and int(until) < now:
            repo.store.delete(name)
            n += 1
    return n
