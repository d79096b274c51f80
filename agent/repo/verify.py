"""Verify a backup.

- light: every chunk the manifest names is present and decodes, and its
  checksum (the chunk id; with encryption also the GCM tag) holds;
- deep: also the image digest recomputed from the chunks equals the
  manifest's (catches a manifest whose chunk list was altered consistently).

Both read every referenced chunk; a chunk shared by several chunk positions
is read once in light mode.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.errors import DataCorrupt
from agent.repo.format import ZERO, ImageDigest, Manifest
from agent.repo.pipeline import OrderedPipeline
from agent.repo.repository import Repository


@dataclass(frozen=True)
class VerifyResult:
    backup_id: str
    deep: bool
    chunks_checked: int
    bytes_checked: int


def verify(repo: Repository, manifest: Manifest, *, deep: bool, ctx=None) -> VerifyResult:
    from agent.jobs.kinds import NullContext

    ctx = ctx or NullContext()
    with repo.shared("verify", checkpoint=ctx.checkpoint):
        repo.refresh()
        return _verify(repo, manifest, deep, ctx)


def _verify(repo: Repository, m: Manifest, deep: bool, ctx) -> VerifyResult:
    h = ImageDigest() if deep else None
    cs = m.chunk_size
    seen: set[str] = set()
    counts = {"chunks": 0, "bytes": 0}
    ctx.progress(0, m.size, "verifying")

    def work(i: int, cid: str):
        length = min(cs, m.size - i * cs)
        if cid == ZERO:
            return i, length, None
        try:
            data, digests = repo.get(bytes.fromhex(cid))
        except DataCorrupt as e:  # a transport error stays what it is: never a verdict on the data
            raise DataCorrupt(f"backup {m.backup_id}: chunk {i}: {e.message}") from None
        if len(data) != length:
            raise DataCorrupt(f"backup {m.backup_id}: chunk {i} ({cid}) holds {len(data)} bytes, not {length}")
        return i, length, digests

    def retire(result) -> None:
        i, length, digests = result
        if h is not None:
            if digests is None:
                h.add_zero(length)
            else:
                h.add(digests, length)
        if digests is not None:
            counts["chunks"] += 1
            counts["bytes"] += length
        ctx.progress(i * cs + length)

    with OrderedPipeline(work, retire) as pipe:
        for i, cid in enumerate(m.chunks):
            ctx.checkpoint()
            if not deep and cid in seen:
                continue
            seen.add(cid)
            pipe.submit(i, cid)
        pipe.drain()
    if h is not None and h.hexdigest() != m.image_digest:
        raise DataCorrupt(f"backup {m.backup_id}: the image digest of its chunks does not match the manifest")
    return VerifyResult(m.backup_id, deep, counts["chunks"], counts["bytes"])
