"""Full copies: the data paths of full clones.

copy_image: data extents are read from a read-only qemu-nbd with several
requests in flight, zero blocks inside them are detected by the native core
and skipped, and the rest is written to a writable qemu-nbd with several
writes in flight, so holes stay holes in the copy.

copy_snapshot: a snapshot of any volume driver into a new volume of any
other (qcow2 <-> RBD), through the drivers' snapshot readers and restore
targets, the pieces backups and restores use; the new volume appears only
when complete (the restore target's commit).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import native
from agent.extents import Extent
from agent.volumes.nbd import AsyncWriter, QemuNbd

READ_REQUEST = 4 << 20

ZERO_BLOCK = 65536


@dataclass(frozen=True)
class CopyStats:
    data_bytes: int  # bytes read from data extents
    written_bytes: int  # bytes written (data extents less zero blocks)


def copy_image(src: str, dst: str, *, run_dir: str, ctx, src_format: str = "qcow2") -> CopyStats:
    with (
        QemuNbd(src, fmt=src_format, readonly=True, run_dir=run_dir) as rs,
        QemuNbd(dst, readonly=False, run_dir=run_dir) as ws,
    ):
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


def copy_snapshot(source, volume_uuid: str, snapshot_uuid: str, target, new_uuid: str, name: str, ctx):
    """A new volume new_uuid in target holding the snapshot's content;
    returns (its VolumeInfo, data bytes copied). Cancelled or failed, the
    target's abort() leaves nothing behind."""
    with source.open_reader(volume_uuid, snapshot_uuid) as reader:
        data = [Extent(e.start, e.length) for e in reader.extents() if not e.zero]
        total = sum(e.length for e in data)
        out = target.open_restore_target(new_uuid, name, reader.size(), job_id=ctx.job_id)
        try:
            ctx.progress(0, total, "copying")
            done = 0

            def on_data(offset: int, view: memoryview) -> None:
                nonlocal done
                ctx.throttle(len(view))
                out.write(offset, view)  # zero blocks inside are skipped
                done += len(view)
                ctx.progress(done)

            reader.read(data, on_data, READ_REQUEST, ctx.checkpoint)
            ctx.checkpoint()
            ctx.progress(total, total, "committing")
            return out.commit(), total
        except BaseException:
            out.abort()
            raise
