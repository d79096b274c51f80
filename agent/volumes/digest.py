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


def image_digest(path: str, *, run_dir: str, fmt: str = "qcow2", ctx=None) -> Digest:
    with QemuNbd(path, fmt=fmt, readonly=True, run_dir=run_dir) as srv, srv.connect() as client:
        extents = client.allocation()
        data = [Extent(e.start, e.length) for e in extents if not e.zero]
        h = native.ImageHash()
        pos = 0
        total = client.size
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

        client.read_extents(data, on_data, checkpoint=ctx.checkpoint if ctx else None)
        if total > pos:
            h.zero(total - pos)
        data_bytes = sum(e.length for e in data)
        return Digest(h.digest().hex(), total, data_bytes, total - data_bytes)
