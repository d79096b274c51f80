"""Full and incremental backup of a snapshot into a repository.

- Full: reads only the data extents of the snapshot, chunk by chunk; zero
  chunks are marked, not stored; the rest are stored once (dedup).
- Incremental: reads only the chunks the driver's change tracking reports as
  changed since the parent backup's snapshot; the others are taken from the
  parent manifest by reference, and their block digests from the parent's
  block-digest records, so the image digest of the new snapshot is known
  without reading unchanged data.
- Fallback: when tracking is lost, untrusted, or the parent's snapshot is
  gone, every data chunk is read and the chunk ids (digests) decide what is
  new; only changed chunks are stored, and the manifest says "fallback".
- full=True forces the full re-read (a policy's full_backup_interval).

Three stages overlap (agent.repo.pipeline): the driver's reader (several
requests in flight) fills recycled chunk buffers; workers hash, compress and
seal; the retire thread appends records to the open pack and writes the
block digests, in chunk order.

No chains: a manifest lists every chunk, so any backup restores from its own
manifest alone. The manifest is committed last, after its packs and block
digests are durable. A backup that fails (no space, a lost server, a
cancel) lists nothing, and the packs it committed are deleted at once
when nothing else holds the repository (agent.repo.gc.reclaim), so a full
backup point does not stay full until the next GC.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from agent import __version__, native
from agent.errors import FailedPrecondition, NotFound, TrackingLost
from agent.extents import Extent
from agent.repo import holds
from agent.repo.format import (
    BLOCK_SIZE,
    ZERO,
    BackupStats,
    ImageDigest,
    Manifest,
    VmRecord,
    block_digests,
    zero_block_digests,
)
from agent.repo.gc import reclaim
from agent.repo.pipeline import BufferPool, OrderedPipeline
from agent.repo.repository import Repository

log = logging.getLogger("agent.backup")
READ_REQUEST = 4 << 20


def chunk_indexes(extents: list[Extent], chunk: int, size: int) -> list[int]:
    """Indexes of the chunks the extents touch."""
    out: set[int] = set()
    for e in extents:
        end = min(e.end, size)
        if end > e.start:
            out.update(range(e.start // chunk, (end - 1) // chunk + 1))
    return sorted(out)


def backup(
    driver,
    volume: str,
    snapshot: str,
    repo: Repository,
    *,
    parent: Manifest | None = None,
    full: bool = False,
    backup_id: str | None = None,
    name: str = "",
    description: str = "",
    tenant: str = "",
    ctx=None,
    lock: holds.Lock | None = None,
) -> Manifest:
    """lock: the new backup is locked (agent/repo/holds.py) before its
    manifest is published, so it is never listed unlocked."""
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    backup_id = backup_id or str(uuid.uuid4())
    written: set[str] = set()  # the packs this backup stored chunks in
    try:
        with repo.shared("backup", checkpoint=ctx.checkpoint):
            repo.refresh()
            info = driver.snapshot_info(volume, snapshot)
            # The changes first (qcow2: read from the bitmaps in the layer files;
            # RBD: a diff), so the reader maps only the chunks an incremental reads.
            changes, only = None, None
            if parent is not None and not full:
                changes = _changes_since(driver, volume, snapshot, parent, repo.chunk_size)
                if changes.indexes is not None:
                    only = (parent.size, _ranges(changes.indexes, repo.chunk_size, parent.size))
            with driver.open_reader(volume, snapshot, only=only) as reader:
                return _backup(
                    driver,
                    reader,
                    info,
                    volume,
                    snapshot,
                    repo,
                    parent,
                    changes,
                    backup_id,
                    name,
                    description,
                    tenant,
                    ctx,
                    written,
                    lock,
                )
    except BaseException:
        reclaim(repo, written, owner=backup_id)  # what it committed goes now, not at the next GC
        raise


@dataclass(frozen=True)
class _Changes:
    """What change tracking says since the parent backup's snapshot: the
    chunks it touched (in the parent's geometry), or why that is not known
    (lost); degraded: why it was known only the slow way."""

    indexes: list[int] | None
    lost: str = ""
    degraded: str = ""


def _vm_record(info) -> VmRecord | None:
    """The VM the snapshot was taken of, kept with the backup (format 2);
    None for a snapshot no running VM held."""
    if info.consistency in ("application", "crash"):
        return VmRecord(info.consistency, info.vm_definition)
    return None


def _reason(e) -> str:
    """An error's message without its leading field name, as a reason."""
    field = f"{e.field}: " if e.field else ""
    return e.message[len(field) :] if field and e.message.startswith(field) else e.message


def _changes_since(driver, volume: str, snapshot: str, parent: Manifest, cs: int) -> _Changes:
    try:
        changed = driver.changed_extents(volume, snapshot, parent.snapshot_uuid)
    except (TrackingLost, NotFound, FailedPrecondition) as e:
        return _Changes(
            None, f"change tracking since the parent backup's snapshot {parent.snapshot_uuid}: {_reason(e)}"
        )
    if parent.chunk_size != cs:
        return _Changes(None, f"the parent backup has chunks of {parent.chunk_size} bytes, this backup point {cs}")
    return _Changes(chunk_indexes(changed.extents, cs, parent.size), degraded=changed.degraded)


def _ranges(indexes: list[int], cs: int, size: int) -> list[tuple[int, int]]:
    """The guest ranges of these chunks, neighbours merged."""
    out: list[tuple[int, int]] = []
    for i in indexes:
        start, length = i * cs, min(cs, size - i * cs)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def commit_data(repo: Repository, blocks) -> None:
    """Make the packs and the block records durable, both before the
    manifest: at once where the store takes concurrent writers (a local
    directory: two fsyncs in parallel save one disk round trip)."""
    if not repo.store.concurrent_writers:
        repo.flush()
        blocks.commit()
        return
    with ThreadPoolExecutor(1, thread_name_prefix="bf-blocks") as ex:
        done = ex.submit(blocks.commit)
        try:
            repo.flush()
        except BaseException:
            wait([done])
            raise
        done.result()


def _backup(
    driver,
    reader,
    info,
    volume,
    snapshot,
    repo,
    parent,
    changes,
    backup_id,
    name,
    description,
    tenant,
    ctx,
    written: set[str],
    lock: holds.Lock | None,
) -> Manifest:
    cs = repo.chunk_size
    size = reader.size()
    n = (size + cs - 1) // cs
    mode, why = (
        "full",
        (
            "no earlier backup of this volume on this backup point"
            if parent is None
            else "a full re-read was asked for (full, or a policy's full_backup_interval)"
        ),
    )
    chunks = [ZERO] * n
    wanted = None
    if changes is not None:
        if parent.size != size:
            why = f"the volume's size changed since the parent backup ({parent.size} bytes, now {size})"
        elif changes.indexes is None:
            mode, why = "fallback", changes.lost
        else:
            mode, why = "incremental", changes.degraded
            wanted = changes.indexes
            chunks = list(parent.chunks)
    if wanted is None:  # every data chunk (the allocation map is only needed here)
        wanted = chunk_indexes([e for e in reader.extents() if not e.zero], cs, size)
    if mode == "fallback":
        log.warning(
            "backup falls back to reading every data chunk",
            extra={"volume": volume, "snapshot": snapshot, "reason": why},
        )
    elif mode == "full":
        log.info("backup reads every data chunk", extra={"volume": volume, "snapshot": snapshot, "reason": why})
    elif why:
        log.warning(
            "incremental backup with degraded change tracking",
            extra={"volume": volume, "snapshot": snapshot, "reason": why},
        )

    def length(i: int) -> int:
        return min(cs, size - i * cs)

    parent_blocks = repo.block_reader(parent.backup_id) if mode == "incremental" else None
    blocks = repo.block_writer(backup_id)
    image = ImageDigest()
    stats = BackupStats(chunks_read=len(wanted), mode_reason=why)
    state = {"next": 0, "retired": 0}
    buffers = BufferPool(cs)

    def emit(i: int, digests: bytes) -> None:
        blocks.add(digests)
        image.add(digests, length(i))
        state["next"] = i + 1

    def emit_until(j: int) -> None:  # chunks not read: from the parent, or zeros
        for i in range(state["next"], j):
            if chunks[i] == ZERO:
                emit(i, zero_block_digests(length(i)))
            else:
                emit(i, parent_blocks.get(i, (length(i) + BLOCK_SIZE - 1) // BLOCK_SIZE))

    def work(i: int, buf, release):
        if native.is_zero(buf):
            return i, buf, release, None, None, None
        digests = block_digests(buf)
        cid = repo.sealer.chunk_id(digests)
        record = None if repo.has(cid) else repo.encode(cid, buf)
        return i, buf, release, cid, digests, record

    def retire(result) -> None:
        i, buf, release, cid, digests, record = result
        emit_until(i)
        old = chunks[i]
        if cid is None:
            chunks[i] = ZERO
            emit(i, zero_block_digests(len(buf)))
        else:
            stored = repo.add(cid, record, len(buf), written) if record is not None else 0
            stats.stored_bytes += stored
            stats.new_chunks += 1 if stored else 0
            chunks[i] = cid.hex()
            emit(i, digests)
        release()  # the record is written: the buffer may be reused
        if mode != "full" and chunks[i] != (old if mode == "incremental" else parent.chunks[i]):
            stats.changed_chunks += 1
        state["retired"] += len(buf)
        ctx.progress(state["retired"])

    total = sum(length(i) for i in wanted)
    ctx.progress(0, total, "reading")
    try:
        with OrderedPipeline(work, retire) as pipe:
            current = {"i": -1, "buf": None, "fill": 0}

            def on_data(offset: int, view: memoryview) -> None:
                ctx.throttle(len(view))
                stats.read_bytes += len(view)
                i = offset // cs
                if current["i"] != i and offset == i * cs and len(view) == length(i):
                    release = reader.hold(view)  # a whole chunk in the reader's buffer: no copy
                    if release is not None:
                        current.update(i=i, buf=None, fill=0)
                        pipe.submit(i, view, release)
                        return
                if current["i"] != i:
                    current.update(i=i, buf=buffers.get(length(i)), fill=0)
                pos = offset - i * cs
                current["buf"][pos : pos + len(view)] = view
                current["fill"] += len(view)
                if current["fill"] == length(i):
                    buf = current["buf"]
                    pipe.submit(i, buf, lambda: buffers.put(buf))
                    current["buf"] = None

            extents = [Extent(i * cs, length(i)) for i in wanted]
            reader.read(extents, on_data, min(cs, READ_REQUEST), ctx.checkpoint)
            pipe.drain()
        emit_until(n)
        ctx.checkpoint()
        ctx.progress(phase="publishing")
        m = Manifest(
            backup_id=backup_id,
            volume_uuid=volume,
            snapshot_uuid=info.uuid,
            size=size,
            chunk_size=cs,
            chunks=chunks,
            image_digest=image.hexdigest(),
            created_at=time.time(),
            parent=parent.backup_id if parent else None,
            name=name,
            description=description,
            tenant=tenant,
            pool_uuid=driver.pool_uuid,
            snapshot_name=info.name,
            agent_version=__version__,
            mode=mode,
            stats=stats,
            vm=_vm_record(info),
        )
        commit_data(repo, blocks)
        if lock is not None:
            repo.flush()  # its packs are committed and indexed: their retention can be set
            holds.prepare(repo, m, lock)
        repo.publish_manifest(m)
        if lock is not None:
            holds.seal(repo, m, lock)
    except BaseException:
        blocks.abort()
        repo.settle()  # the packs committing in the background end first: backup() reclaims them
        raise
    log.info("backup published", extra={"backup": backup_id, "volume": volume, "mode": mode, **asdict(stats)})
    return m
