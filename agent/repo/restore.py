"""Restore a backup into a writer (a new volume, usually).

Chunks are fetched and decoded (decrypt, decompress, checksum) by a small
pool of workers, several in flight, and written in order; zero chunks are not
written (a new volume reads as zeros). A target that takes concurrent writes
has the data written when write() returns, so its chunks' records are read,
and decompressed, into recycled buffers (the native core: no fresh 4 MiB
allocation zeroed and paged in per chunk). The image digest of everything
written is computed on the way, from the block digests that checking each
chunk yields anyway, and compared with the manifest's by the caller.
"""

from __future__ import annotations

from agent.repo.format import HEADER, ZERO, ImageDigest, Manifest
from agent.repo.pipeline import BufferPool, OrderedPipeline
from agent.repo.repository import Repository

PREFETCH = 8  # chunks whose reading starts ahead of the workers


def restore(repo: Repository, manifest: Manifest, write, *, ctx=None, concurrent: bool = False, zero=None) -> str:
    """Feed the backup to write(offset, data) for non-zero chunks; returns
    the image digest (hex) of the content written. concurrent=True: write
    is thread-safe and order-free (positional writes into a file), so the
    workers call it as soon as a chunk is decoded, in parallel. zero(offset,
    length), when given, is called for zero chunks (a restore in place must
    clear what was there; a new volume reads as zeros already)."""
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    with repo.shared("restore", checkpoint=ctx.checkpoint):
        repo.refresh()
        return _restore(repo, manifest, write, ctx, concurrent, zero)


def _restore(repo: Repository, m: Manifest, write, ctx, concurrent: bool, zero) -> str:
    image = ImageDigest()
    cs = m.chunk_size
    ctx.progress(0, m.size, "restoring")

    buffers = BufferPool(cs)
    records = BufferPool(HEADER.size + cs + repo.sealer.overhead)  # the largest record: stored as it is

    def work(i: int, cid: str):
        if cid == ZERO:
            return i, None, None
        if not concurrent:
            data, digests = repo.get(bytes.fromhex(cid))
            return i, data, digests
        # a concurrent target has written the data when write() returns, so
        # the buffer is recycled at once (no 4 MiB allocation per chunk)
        buf, rec = buffers.get(cs), records.get(records.size)
        try:
            data, digests = repo.get(bytes.fromhex(cid), out=buf, record_buf=rec)
            ctx.throttle(len(data))
            write(i * cs, data)
        finally:
            buffers.put(buf)
            records.put(rec)
        return i, True, digests

    def retire(result) -> None:
        i, data, digests = result
        offset = i * cs
        length = min(cs, m.size - offset)
        if data is None:
            if zero is not None:
                zero(offset, length)
            image.add_zero(length)
        else:
            if not concurrent:
                ctx.throttle(len(data))
                write(offset, data)
            image.add(digests, length)
        ctx.progress(offset + length)

    data = [bytes.fromhex(c) for c in m.chunks if c != ZERO]
    for cid in data[:PREFETCH]:
        repo.prefetch(cid)
    ahead = PREFETCH
    with OrderedPipeline(work, retire) as pipe:
        for i, cid in enumerate(m.chunks):
            ctx.checkpoint()
            if cid != ZERO and ahead < len(data):
                repo.prefetch(data[ahead])  # keeps PREFETCH chunks ahead of the workers
                ahead += 1
            pipe.submit(i, cid)
        pipe.drain()
    return image.hexdigest()
