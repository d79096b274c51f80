"""Snapshot sets across drivers: a running VM whose disks live in pools of
two kinds (qcow2 files and RBD images) or in two RBD pools.

One driver takes a set of its own pools alone (the qcow2 driver all of this
host's qcow2 pools, in one QMP transaction; the RBD driver one pool, with a
pause for more than one image). Across drivers this module holds the
instant: it finds the VM that runs the disks, freezes its guest once,
pauses it (QMP stop, or libvirt's suspend) and has each driver take its
part on the VM's open connection (volumes.base.SetInstant), then resumes
it. The RBD parts go first and the qcow2 part last: an RBD snapshot is
undone by removing it, while a live qcow2 switch undoes itself on failure
and could only be undone afterwards through the VM's monitor. The pause is
reported as the set's switch_ms.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from agent.errors import BlockferryError, InvalidArgument
from agent.hypervisor.base import RunningVm
from agent.hypervisor.freeze import vm_definition
from agent.pools import PoolRegistry
from agent.volumes.base import SetInstant, SnapshotRequest, SnapshotSet

log = logging.getLogger("agent.snapsets")


def create_snapshot_set(
    pools: PoolRegistry, requests: Sequence[SnapshotRequest], *, freeze: bool = True, freeze_timeout: float = 10.0
) -> SnapshotSet:
    groups: dict[str, list[SnapshotRequest]] = {}  # "qcow2" (every qcow2 pool) or an RBD pool
    for i, r in enumerate(requests):
        driver = pools.get(r.pool_uuid, f"snapshots[{i}].pool_uuid")
        groups.setdefault("qcow2" if driver.kind in ("dir", "nfs") else r.pool_uuid, []).append(r)
    if len(groups) == 1:  # one driver holds the instant itself
        return pools.get(requests[0].pool_uuid).create_snapshot_set(
            requests, freeze=freeze, freeze_timeout=freeze_timeout
        )
    order = sorted(groups, key=lambda k: k == "qcow2")  # the RBD parts first, qcow2 last
    vm = _the_vm(pools, groups)
    if vm is None:  # no VM runs them: each part is its own instant, and nothing writes across them
        parts = [pools.get(groups[k][0].pool_uuid).create_snapshot_set(groups[k]) for k in order]
        return _merge(requests, parts, None, 0.0)
    made: list[tuple[str, SnapshotSet]] = []
    with vm:
        definition = vm_definition(vm)
        with vm.frozen(timeout=freeze_timeout, wanted=freeze) as fr:
            started = time.monotonic()
            vm.pause()
            try:
                instant = SetInstant(vm, fr.consistency, definition)
                for k in order:
                    part = pools.get(groups[k][0].pool_uuid).create_snapshot_set(groups[k], within=instant)
                    made.append((k, part))
            except BaseException:
                failed = True
                raise
            else:
                failed = False
            finally:
                vm.resume()
                pause_ms = (time.monotonic() - started) * 1000
                if failed:
                    _undo(pools, made, {r.volume_uuid: r.pool_uuid for r in requests})
        log.info(
            "snapshot set across pools of a running VM",
            extra={"vm": vm.name, "parts": len(order), "consistency": fr.consistency, "pause_ms": round(pause_ms, 1)},
        )
        return _merge(
            requests, [p for _, p in made], (vm.name, fr.consistency, fr.reason, fr.frozen_ms, definition), pause_ms
        )


def _the_vm(pools: PoolRegistry, groups: dict[str, list[SnapshotRequest]]) -> RunningVm | None:
    """The one running VM whose disks the set's volumes are (connected),
    None when no VM runs any of them; refused when two do."""
    found: RunningVm | None = None
    for vm in pools.hypervisor.running_vms():
        try:
            mine = [r for rs in groups.values() for r in rs if _is_disk(pools, vm, r)]
        except BlockferryError:
            mine = []
        if not mine:
            vm.close()
            continue
        if found is not None:
            vm.close()
            found.close()
            raise InvalidArgument(
                f"snapshots: volume {mine[0].volume_uuid} is a disk of VM {vm.name}, others of VM {found.name}: "
                "a set holds the disks of one VM",
                field="snapshots",
            )
        found = vm
    return found


def _is_disk(pools: PoolRegistry, vm: RunningVm, r: SnapshotRequest) -> bool:
    driver = pools.get(r.pool_uuid)
    if driver.kind == "rbd":
        return vm.rbd_disk(driver.rbd_pool, driver.namespace, r.volume_uuid) is not None  # type: ignore[attr-defined]
    return vm.disk_of(driver.head_path(r.volume_uuid)) is not None  # type: ignore[attr-defined]


def _undo(pools: PoolRegistry, made: list[tuple[str, SnapshotSet]], pool_of: dict[str, str]) -> None:
    """All or none: the parts already taken go again (after the VM runs on)."""
    for _, part in made:
        for snap in part.snapshots:
            try:
                pools.get(pool_of[snap.volume_uuid]).delete_snapshot(snap.volume_uuid, snap.uuid)
            except BlockferryError as e:
                log.error(
                    "a snapshot of a failed set could not be removed",
                    extra={"volume": snap.volume_uuid, "snapshot": snap.uuid, "error": e.message},
                )


def _merge(
    requests: Sequence[SnapshotRequest], parts: list[SnapshotSet], vm: tuple | None, pause_ms: float
) -> SnapshotSet:
    """One set of the parts, its snapshots in the order they were asked for."""
    taken = {x.uuid: x for p in parts for x in p.snapshots}
    snapshots = tuple(taken[r.snapshot_uuid] for r in requests)
    if vm is None:
        worst = "crash" if any(p.consistency == "crash" for p in parts) else parts[0].consistency
        return SnapshotSet(snapshots, worst, "", "", 0.0, 0.0)
    name, consistency, reason, frozen_ms, definition = vm
    return SnapshotSet(snapshots, consistency, name, reason, frozen_ms, pause_ms, definition)
