"""Garbage collection: reclaim the space of chunks no backup references.

GC holds the repository's exclusive lock, so no backup, restore, verify or
delete runs meanwhile on any agent (they hold shared locks), and every
operation refreshes its index after taking its lock. Under the lock GC:

1. reads every manifest (one it cannot read stops the GC: it never deletes
   on partial knowledge) and collects the chunks they reference;
2. removes partial objects of writers that never committed (crashed
   backups), packs without an index, and block digests without a manifest;
3. deletes packs with no referenced chunk (index first, then the pack);
4. rewrites packs whose referenced part is below REPACK_BELOW of their size:
   the live records are copied as they are into a new pack, which is
   committed with its index before the old index and pack are deleted;
5. removes the ended locks of deleted backups, and on S3 the older
   versions and delete markers whose retention ended.

A pack that holds a chunk of a locked backup (agent/repo/holds.py) is
never deleted or rewritten while the lock lasts.

A crash at any step leaves either the old or the new copy of every live
chunk listed in an index.

reclaim() is the small GC a failed backup runs on its way out: the packs it
wrote that no backup references, deleted under the exclusive lock.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass

from agent.errors import BlockferryError, NotFound
from agent.repo import holds
from agent.repo.format import ZERO
from agent.repo.repository import Repository

log = logging.getLogger("agent.gc")
REPACK_BELOW = 0.5


@dataclass(frozen=True)
class GcResult:
    packs_deleted: int
    packs_rewritten: int
    chunks_removed: int
    bytes_freed: int
    partial_removed: int
    packs_locked: int = 0
    versions_purged: int = 0


def gc(repo: Repository, *, ctx=None, lock_timeout: float = 0.0) -> GcResult:
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    with repo.exclusive("gc", timeout=lock_timeout, checkpoint=ctx.checkpoint):
        repo.refresh()
        return _gc(repo, ctx)


def _gc(repo: Repository, ctx) -> GcResult:
    store = repo.store
    ctx.progress(0, 0, "scanning")
    manifests = repo.manifests()
    live = {bytes.fromhex(c) for m in manifests for c in m.chunks if c != ZERO}
    now = time.time()
    pinned = holds.pinned_packs(repo, holds.all_locks(repo), manifests, now)
    repo.flush()  # records of a failed backup in this process: committed, then judged like any other
    partial = sum(store.sweep_partial(prefix) for prefix in ("packs", "blocks", "manifests"))
    ids = {m.backup_id for m in manifests}
    for name in store.list("blocks"):
        if name.split("/", 1)[1] not in ids:
            store.delete(name)
    names = set(store.list("packs"))
    for name in names:
        if not name.endswith(".idx") and f"{name}.idx" not in names:
            log.info("removing a pack without an index", extra={"pack": name})
            store.delete(name)
    deleted = rewritten = removed = freed = locked = 0
    packs = sorted(n[:-4] for n in names if n.endswith(".idx"))
    ctx.progress(0, len(packs), "collecting")
    for k, pack in enumerate(packs):
        ctx.checkpoint()
        if pack in pinned:
            locked += 1
            ctx.progress(k + 1)
            continue
        entries = repo._read_index(pack)
        keep = {cid: loc for cid, loc in entries.items() if cid in live}
        size = store.size(pack)
        kept = sum(loc.length for loc in keep.values())
        if not keep:
            store.delete(f"{pack}.idx")
            store.delete(pack)
            deleted += 1
            removed += len(entries)
            freed += size
        elif kept < size * REPACK_BELOW:
            new = f"packs/{uuid.uuid4().hex}"
            index = {}
            with store.open_writer(new) as w:
                for cid, loc in sorted(keep.items(), key=lambda kv: kv[1].offset):
                    record = store.get(pack, loc.offset, loc.length)
                    index[cid.hex()] = [w.size, len(record), loc.plain]
                    w.write(record)
                w.commit()
            store.publish(f"{new}.idx", repo.sealer.seal(json.dumps(index).encode(), f"index:{new}".encode()))
            store.delete(f"{pack}.idx")
            store.delete(pack)
            rewritten += 1
            removed += len(entries) - len(keep)
            freed += size - kept
        ctx.progress(k + 1)
    holds.sweep(repo, ids, now)
    purged = sum(store.purge(prefix) for prefix in ("packs", "blocks", "manifests", holds.PREFIX))
    repo.refresh()
    result = GcResult(deleted, rewritten, removed, freed, partial, locked, purged)
    log.info("garbage collected", extra=result.__dict__)
    return result


@dataclass(frozen=True)
class ReclaimResult:
    packs_deleted: int
    bytes_freed: int
    left: int  # packs left for the next GC (referenced meanwhile, or the repository was busy)


def reclaim(repo: Repository, packs: set[str], *, owner: str = "") -> ReclaimResult:
    """After a failed backup: delete at once the packs it wrote that no
    backup references (a full backup point gets its space back without
    waiting for a GC). It takes the exclusive lock without waiting: while
    other operations hold the repository, or when anything goes wrong, the
    packs are left for the next GC, which finds them the same way."""
    if not packs:
        return ReclaimResult(0, 0, 0)
    try:
        with repo.exclusive("reclaim"):
            repo.discard_open()  # only failed backups' chunks can be in it: nothing else runs
            repo.refresh()
            live = {bytes.fromhex(c) for m in repo.manifests() for c in m.chunks if c != ZERO}
            deleted = freed = 0
            for pack in sorted(packs):
                try:
                    entries = repo._read_index(pack)
                except NotFound:
                    continue  # never committed: its writer removed its partial file
                if any(cid in live for cid in entries):
                    continue  # another backup references a chunk of it since: GC repacks it
                size = repo.store.size(pack)
                repo.store.delete(f"{pack}.idx")
                repo.store.delete(pack)
                deleted += 1
                freed += size
            repo.refresh()
    except BlockferryError as e:
        log.warning(
            "the packs of a failed backup are left for the next GC",
            extra={"backup": owner, "packs": len(packs), "why": e.message},
        )
        return ReclaimResult(0, 0, len(packs))
    result = ReclaimResult(deleted, freed, len(packs) - deleted)
    log.info("reclaimed the packs of a failed backup", extra={"backup": owner, **result.__dict__})
    return result
