"""Instant restore: the restore job's volume is made at once as a qcow2
overlay on the backup's read-only NBD export (agent/exports.py), so a VM
can start on it within seconds; the job then copies the backup's data
into the volume and ends the export.

The copy is the VM's own when a VM runs on the volume (QMP block-stream:
qemu reads what its guest has not overwritten from the export and writes
it into the overlay, then drops the export from the disk's chain). With
no VM on it within `wait_for_vm` seconds, qemu-img rebase copies it
(holding the image's lock while it runs) and the volume's image digest
must then equal the backup's. A failed or cancelled copy with no VM on the
volume deletes it; with a VM on it, the volume and its export stay (the
VM reads through them) and the error says so."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from agent.errors import BlockferryError, DataCorrupt, FailedPrecondition, InUse, InvalidArgument
from agent.exports import MAX_LEASE, Exports

log = logging.getLogger("agent.restore")

POLL = 0.2
MAX_WAIT = 3600


@dataclass(frozen=True)
class Done:
    info: object  # the volume's VolumeInfo
    how: str  # live | offline
    digest: str  # offline: the volume's image digest (the backup's); live: "" (the guest has written)


def check(spec, pool, exports: Exports | None) -> None:
    if exports is None:
        raise FailedPrecondition("instant: this agent serves no exports")
    if spec.in_place:
        raise InvalidArgument("instant: a restore in place cannot be instant", field="instant")
    if not hasattr(pool, "create_volume_over"):
        raise InvalidArgument(
            f"pool_uuid: pool {spec.pool_uuid} is not a qcow2 pool; an instant restore needs one", field="pool_uuid"
        )
    if not 0 <= spec.wait_for_vm <= MAX_WAIT:
        raise InvalidArgument(f"wait_for_vm: 0 to {MAX_WAIT} seconds", field="wait_for_vm")


def _held(pool, vol: str) -> bool:
    try:
        pool.check_not_in_use(vol)
        return False
    except InUse:
        return True


def restore(spec, m, pool, exports: Exports, ctx) -> Done:
    e = exports.export(spec.backup_point_uuid, spec.backup_uuid, MAX_LEASE)
    try:
        info = pool.create_volume_over(spec.volume_uuid, spec.name, m.size, e.uri)
    except BaseException:
        exports.unexport(e.export_id)
        raise
    vol = info.uuid
    log.info("instant restore: volume ready", extra={"volume": vol, "path": info.access_path, "export": e.export_id})
    ctx.progress(0, m.size, phase=f"ready at {info.access_path}")
    try:
        deadline = time.monotonic() + spec.wait_for_vm
        while time.monotonic() < deadline and not _held(pool, vol):
            ctx.checkpoint()
            time.sleep(POLL)
        ctx.progress(0, m.size, phase="copying")
        how = pool.detach_source(
            vol,
            on_percent=lambda p: ctx.progress(int(m.size * p / 100), m.size, phase="copying"),
            checkpoint=ctx.checkpoint,
        )
        digest = ""
        if how == "offline":
            digest = pool.image_digest(vol, None, ctx=ctx).image_digest
            if digest != m.image_digest:
                raise DataCorrupt(
                    f"backup {m.backup_id}: the restored volume's image digest {digest} does not match "
                    f"the manifest's {m.image_digest}"
                )
    except BaseException as err:
        if _held(pool, vol):
            msg = err.message if isinstance(err, BlockferryError) else str(err)
            log.error(
                "instant restore: the copy failed while a VM runs on the volume; it and its export stay",
                extra={"volume": vol, "export": e.export_id, "error": msg},
            )
            raise
        try:
            pool.delete_volume(vol, force=True)  # never a half-copied volume that looks restored
        finally:
            exports.unexport(e.export_id)
        raise
    exports.unexport(e.export_id)
    ctx.progress(m.size, m.size, phase="copied")
    return Done(pool.volume_info(vol), how, digest)
