"""Full and incremental backup of a snapshot, restore, and verify.

- Full: reads only the data extents of the snapshot, chunk by chunk (chunks
  aligned to chunk_size), hashes each with the native core; zero chunks are
  marked, others stored once (dedup).
- Incremental: reads only the chunks the driver's change tracking reports as
  changed since the parent backup's snapshot; the rest are taken from the
  parent manifest by reference. When tracking is lost it reads everything and
  lets the digests decide (`fell_back`). No chains: a manifest lists every
  chunk, so any backup restores from its own manifest alone.
- Restore: writes non-zero chunks into a new volume and compares the image
  digest of what was written with the manifest's.
"""
from __future__ import annotations

import time
import uuid

from agent import __version__, native
from agent.errors import StorageIOError, TrackingLost
from agent.extents import Extent
from agent.repo.format import ZERO, Manifest
from agent.repo.repository import Repository


def _chunk_extents(extents: list[Extent], chunk: int, size: int) -> list[int]:
    """Indexes of the chunks the extents touch."""
    out: set[int] = set()
    for e in extents:
        out.update(range(e.start // chunk, (min(e.end, size) - 1) // chunk + 1))
    return sorted(out)


def backup(driver, volume: str, snapshot: str, repo: Repository, *, parent: Manifest | None = None,
           name: str = "", description: str = "", tenant: str = "", ctx=None) -> Manifest:
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    cs = repo.chunk_size
    info = driver.snapshot_info(volume, snapshot)
    fell_back = False
    digest = driver.image_digest(volume, snapshot)  # format-independent identity of the source
    size = digest.length
    n = (size + cs - 1) // cs
    if parent is not None and parent.chunk_size == cs and parent.size == size:
        try:
            changed = driver.changed_extents(volume, snapshot, parent.snapshot_uuid).extents
            wanted = _chunk_extents(changed, cs, size)
        except TrackingLost:
            fell_back = True
            wanted = None
        chunks = list(parent.chunks)
    else:
        parent = None
        wanted = None
        chunks = [ZERO] * n
    if wanted is None:  # full read of the data extents
        data = [Extent(e.start, e.length) for e in driver.data_extents(volume, snapshot) if not e.zero]
        wanted = _chunk_extents(data, cs, size)
        if parent is None:
            chunks = [ZERO] * n
    want_set = set(wanted)
    for i in want_set:
        chunks[i] = ZERO  # re-read; stays ZERO if it reads as zeros
    extents = [Extent(i * cs, min(cs, size - i * cs)) for i in wanted]
    stats = {"chunks_read": len(wanted), "stored_bytes": 0, "read_bytes": 0, "new_chunks": 0}
    ctx.progress(0, sum(e.length for e in extents), "reading")

    def on_data(offset: int, view: memoryview) -> None:
        ctx.throttle(len(view))
        i = offset // cs
        if not native.is_zero(view):
            d = native.block_digests("sha256", view, len(view)).digests
            stored = repo.put(d, view)
            stats["stored_bytes"] += stored
            stats["new_chunks"] += 1 if stored else 0
            chunks[i] = d.hex()
        stats["read_bytes"] += len(view)
        ctx.progress(stats["read_bytes"])

    driver.read_chunks(volume, snapshot, extents, on_data, cs, ctx.checkpoint)
    m = Manifest(backup_id=str(uuid.uuid4()), volume_uuid=volume, snapshot_uuid=info.uuid, size=size,
                 chunk_size=cs, chunks=chunks, image_digest=digest.image_digest, created_at=time.time(),
                 parent=parent.backup_id if parent else None, name=name, description=description, tenant=tenant,
                 pool_uuid=driver.pool_uuid, agent_version=__version__, fell_back=fell_back, stats=stats)
    ctx.checkpoint()
    repo.publish_manifest(m)
    return m


def verify(repo: Repository, manifest: Manifest, *, deep: bool) -> None:
    """Light: every chunk is there and its checksum holds. Deep: also the
    image digest recomputed from the chunks equals the manifest's."""
    h = native.ImageHash() if deep else None
    for i, d in enumerate(manifest.chunks):
        length = min(manifest.chunk_size, manifest.size - i * manifest.chunk_size)
        if d == ZERO:
            if h:
                h.zero(length)
            continue
        data = repo.get(bytes.fromhex(d))
        if len(data) != length:
            raise StorageIOError(f"backup {manifest.backup_id}: chunk {i} has {len(data)} bytes, not {length}")
        if h:
            h.update(data)
    if h and h.digest().hex() != manifest.image_digest:
        raise StorageIOError(f"backup {manifest.backup_id}: image digest of the chunks does not match the manifest")


def restore(repo: Repository, manifest: Manifest, write, *, ctx=None) -> str:
    """Feed the backup to write(offset, data) for non-zero chunks and return
    the image digest of what was written."""
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    h = native.ImageHash()
    total = manifest.size
    ctx.progress(0, total, "restoring")
    for i, d in enumerate(manifest.chunks):
        ctx.checkpoint()
        offset = i * manifest.chunk_size
        length = min(manifest.chunk_size, total - offset)
        if d == ZERO:
            h.zero(length)
        else:
            data = repo.get(bytes.fromhex(d))
            ctx.throttle(len(data))
            write(offset, data)
            h.update(data)
        ctx.progress(offset + length)
    return h.digest().hex()
