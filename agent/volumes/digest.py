"""Image digest of a volume or snapshot, read through NBD.

Zero extents (holes and zero clusters) are added to the digest without being
read, so a qcow2 image and a raw file or RBD image with the same content give
the same bf-image-sha256-v1 digest.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import native
from agent.extents import Extent
from agent.volumes.nbd import QemuNbd


@dataclass(frozen=True)
class Digest:
    image_digest: str
    length: int
    data_bytes: int
    zero_bytes: int


def digest_stream(total: int, data: list[Extent], read_extents, ctx=None) -> Digest:
    """Digest of `total` bytes whose data extents are `data` (sorted); the
    gaps are zeros. read_extents(extents, on_data, checkpoint) delivers the
    data in order, from whatever reader the driver has."""
    h = native.ImageHash()
    pos = 0
    if ctx:
        ctx.progress(0, total, "reading")

    def on_data(offset: int, view: memoryview) -> None:
        nonlocal pos
        if offset > pos:
            h.zero(offset - pos)  # the gap is zero extents
        if ctx:
            ctx.throttle(len(view))
        h.update(view)
        pos = offset + len(view)
        if ctx:
            ctx.progress(pos)

    read_extents(data, on_data, ctx.checkpoint if ctx else None)
    if total > pos:
        h.zero(total - pos)
    data_bytes = sum(e.length for e in data)
    return Digest(h.digest().hex(), total, data_bytes, total - data_bytes)


def image_digest(path: str, *, run_dir: str, fmt: str = "qcow2", ctx=None) -> Digest:
    with QemuNbd(path, fmt=fmt, readonly=True, run_dir=run_dir) as srv, srv.connect() as client:
        data = [Extent(e.start, e.length) for e in client.allocation() if not e.zero]
        return digest_stream(
            client.size,
            data,
            lambda ext, on_data, checkpoint: client.read_extents(ext, on_data, checkpoint=checkpoint),
            ctx,
        )
