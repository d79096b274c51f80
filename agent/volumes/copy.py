"""Full copy of an image through NBD: the data path of full clones.

Data extents are read from a read-only qemu-nbd with several requests in
flight, zero blocks inside them are detected by the native core and skipped,
and the rest is written to a writable qemu-nbd with several writes in flight,
so holes stay holes in the copy.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent import native
from agent.extents import Extent
from agent.volumes.nbd import AsyncWriter, QemuNbd

ZERO_BLOCK = 65536


@dataclass(frozen=True)
class CopyStats:
    data_bytes: int  # bytes read from data extents
    written_bytes: int  # bytes written (data extents less zero blocks)


def copy_image(src: str, dst: str, *, run_dir: str, ctx, src_format: str = "qcow2") -> CopyStats:
    with QemuNbd(src, fmt=src_format, readonly=True, run_dir=run_dir) as rs, \
            QemuNbd(dst, readonly=False, run_dir=run_dir) as ws:
        with rs.connect() as reader, ws.connect() as writer_client:
            data = [Extent(e.start, e.length) for e in reader.allocation() if not e.zero]
            total = sum(e.length for e in data)
            ctx.progress(0, total, "copying")
            writer = AsyncWriter(writer_client)
            done = written = 0

            def on_data(offset: int, view: memoryview) -> None:
                nonlocal done, written
                ctx.throttle(len(view))
                for a, b in native.nonzero_runs(view, ZERO_BLOCK):
                    writer.write(view[a:b], offset + a)
                    written += b - a
                done += len(view)
                ctx.progress(done)

            reader.read_extents(data, on_data, checkpoint=ctx.checkpoint)
            writer.finish()
            return CopyStats(data_bytes=total, written_bytes=written)
