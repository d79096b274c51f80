"""Copy backups from one repository to another (any two backup point
types; an off-site copy).

For each backup the destination lacks: every chunk is read from the
source (checked against its digest there), and stored at the destination
under the destination's own chunk id (an encrypted repository keys its ids)
unless the destination holds it already, so only what is missing travels;
the block digests go along, and the manifest is published last, with the
same backup id, image digest and fields, so a copy is restored, verified
and listed like the original. A copy cut short lists nothing: its packs
go at once (gc.reclaim) or at the next gc, and a new run copies that
backup again while skipping the backups already copied. When the agent
stops mid-copy, the chunks sent so far are committed instead, and the
job resumes after the restart sending only the rest.

Both repositories must use the same chunk size (the chunk list and block
digests map one to one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

from agent.errors import BlockferryError, FailedPrecondition, Interrupted
from agent.repo import holds
from agent.repo.backup import commit_data
from agent.repo.format import BLOCK_SIZE, ZERO, Manifest
from agent.repo.gc import reclaim
from agent.repo.pipeline import OrderedPipeline
from agent.repo.repository import Repository

log = logging.getLogger("agent.copy")


@dataclass
class CopyStats:
    backups_copied: int = 0
    backups_present: int = 0  # at the destination already: skipped
    chunks_sent: int = 0  # stored at the destination
    chunks_present: int = 0  # the destination held them: not sent
    bytes_sent: int = 0  # plaintext bytes of the chunks sent
    stored_bytes: int = 0  # what the destination stored for them


def check_compatible(src: Repository, dst: Repository) -> None:
    if src.chunk_size != dst.chunk_size:
        raise FailedPrecondition(
            f"target_backup_point_uuid: its repository's chunk size is {dst.chunk_size}, "
            f"the source's {src.chunk_size}: a copy needs the same chunk size",
            field="target_backup_point_uuid",
        )
    if src.id == dst.id:
        raise FailedPrecondition(
            "target_backup_point_uuid: it is the same repository as the source", field="target_backup_point_uuid"
        )


def copy_backups(
    src: Repository,
    dst: Repository,
    manifests: list[Manifest],
    *,
    ctx=None,
    lock: holds.Lock | None = None,
    new_ids: dict[str, str] | None = None,
) -> CopyStats:
    """Copy these backups of src (oldest first, so shared chunks travel
    once) that dst lacks. lock: the destination's lock for each copy;
    new_ids: the id a backup's copy gets (the controller's own row for
    it), by default its own."""
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    check_compatible(src, dst)
    stats = CopyStats()
    todo = []
    new_ids = new_ids or {}
    for m in sorted(manifests, key=lambda m: m.created_at):
        if dst.has_backup(new_ids.get(m.backup_id, m.backup_id)):
            stats.backups_present += 1
        else:
            todo.append(m)
    total = sum(m.size for m in todo)
    ctx.progress(0, total, "copying")
    done = 0
    for m in todo:
        _copy_one(src, dst, m, new_ids.get(m.backup_id, m.backup_id), ctx, stats, lock, done)
        done += m.size
        ctx.progress(done)
        stats.backups_copied += 1
    return stats


def _copy_one(
    src: Repository,
    dst: Repository,
    m: Manifest,
    new_id: str,
    ctx,
    stats: CopyStats,
    lock: holds.Lock | None,
    base: int,
) -> None:
    cs = m.chunk_size
    written: set[str] = set()
    try:
        with src.shared("copy", checkpoint=ctx.checkpoint), dst.shared("copy", checkpoint=ctx.checkpoint):
            src.refresh()
            dst.refresh()
            reader = src.block_reader(m.backup_id)
            blocks = dst.block_writer(new_id)
            chunks: list[str] = [ZERO] * len(m.chunks)

            def length(i: int) -> int:
                return min(cs, m.size - i * cs)

            def work(i: int, digests: bytes):
                tcid = dst.sealer.chunk_id(digests)
                if dst.has(tcid):
                    return i, tcid, None, 0
                data, _ = src.get(bytes.fromhex(m.chunks[i]))  # checked against the source's digest
                return i, tcid, dst.encode(tcid, data), len(data)

            def retire(result) -> None:
                i, tcid, record, plain = result
                chunks[i] = tcid.hex()
                stored = dst.add(tcid, record, plain, written) if record is not None else 0
                if stored:
                    stats.chunks_sent += 1
                    stats.bytes_sent += plain
                    stats.stored_bytes += stored
                else:
                    stats.chunks_present += 1
                ctx.progress(base + i * cs + length(i))

            try:
                with OrderedPipeline(work, retire) as pipe:
                    for i, c in enumerate(m.chunks):
                        ctx.checkpoint()
                        digests = reader.get(i, (length(i) + BLOCK_SIZE - 1) // BLOCK_SIZE)
                        blocks.add(digests)
                        if c != ZERO:
                            ctx.throttle(length(i))
                            pipe.submit(i, digests)
                    pipe.drain()
                ctx.checkpoint()
                copied = dataclasses.replace(m, backup_id=new_id, chunks=chunks)
                commit_data(dst, blocks)
                if lock is not None:
                    dst.flush()
                    holds.prepare(dst, copied, lock)
                dst.publish_manifest(copied)
                if lock is not None:
                    holds.seal(dst, copied, lock)
            except BaseException as e:
                blocks.abort()
                if isinstance(e, Interrupted):  # the agent stops: what arrived stays for the resumed copy
                    with contextlib.suppress(BlockferryError):
                        dst.flush()
                else:
                    dst.settle()
                raise
    except Interrupted:
        raise  # its packs are the resumed job's head start (or the next gc's, if it never runs)
    except BaseException:
        reclaim(dst, written, owner=new_id)
        raise
    log.info(
        "backup copied",
        extra={"backup": m.backup_id, "copy": new_id, "sent": stats.chunks_sent, "present": stats.chunks_present},
    )
