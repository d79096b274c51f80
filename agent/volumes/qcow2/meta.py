"""Metadata of a qcow2 volume: its snapshot tree, clones and tracking state.

Kept as one JSON file per volume, replaced atomically (PoolFiles.replace:
write a temporary file, fsync, rename, fsync the directory), so a crash
leaves either the old or the new version.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from agent.errors import FailedPrecondition, HasDependents, NotFound, StorageIOError

META_VERSION = 1
TRACKING_OK = "ok"
TRACKING_LOST = "lost"


@dataclass
class SnapMeta:
    uuid: str
    name: str
    description: str
    created_at: float
    parent: str | None
    tracking: str = TRACKING_OK  # whether this layer's dirty bitmap is complete
    consistency: str = ""  # application, crash or offline (hypervisor/freeze.py); "" from before it was kept
    vm_definition: str = ""  # the VM that held it, to start it again (RunningVm.definition)
    clones: list[str] = field(default_factory=list)  # linked clone volume uuids

    def check_no_clones(self) -> None:
        """HAS_DEPENDENTS while linked clones grow from this snapshot."""
        if self.clones:
            raise HasDependents(
                f"snapshot_uuid: snapshot {self.name} ({self.uuid}) has linked clones "
                f"{', '.join(c.split('/')[1] for c in self.clones)}; flatten or delete them first",
                field="snapshot_uuid",
            )


@dataclass
class VolMeta:
    uuid: str
    name: str
    created_at: float
    head_parent: str | None = None  # the snapshot the live state grows from
    head_tracking: str = TRACKING_OK
    snapshots: list[SnapMeta] = field(default_factory=list)
    base_file: str | None = None  # adopted external image the volume is an overlay on
    base_format: str | None = None
    parent_volume: str | None = None  # linked clone: origin volume, pool and snapshot
    parent_pool: str | None = None
    parent_snapshot: str | None = None
    parent_file: str | None = None  # the origin snapshot's file
    version: int = META_VERSION

    def snapshot(self, uuid: str) -> SnapMeta | None:
        return next((s for s in self.snapshots if s.uuid == uuid), None)

    def children_of(self, uuid: str | None) -> list[SnapMeta]:
        return [s for s in self.snapshots if s.parent == uuid]

    def snap(self, uuid: str) -> SnapMeta:
        """The snapshot, or NOT_FOUND naming the volume."""
        s = self.snapshot(uuid)
        if s is None:
            raise NotFound(f"snapshot_uuid: no snapshot {uuid} on volume {self.uuid}", field="snapshot_uuid")
        return s

    def path_to(self, snap: str, since: str | None) -> list[SnapMeta]:
        """Snapshot layers on the tree path (since, snap], newest first."""
        path, cur = [], self.snap(snap)
        while True:
            path.append(cur)
            if cur.parent == since:
                return path
            if cur.parent is None:
                raise FailedPrecondition(
                    f"since_snapshot_uuid: snapshot {since} is not an ancestor of snapshot {snap}",
                    field="since_snapshot_uuid",
                )
            cur = self.snap(cur.parent)

    def linked_clones(self) -> list[str]:
        """The linked clones of the volume's snapshots, as "pool/volume"."""
        return [c for s in self.snapshots for c in s.clones]

    def clones_blocking_delete(self, force: bool) -> list[str]:
        """The linked clones a forced delete flattens; unforced,
        HAS_DEPENDENTS while there are clones or snapshots."""
        clones = self.linked_clones()
        if clones and not force:
            raise HasDependents(
                f"volume_uuid: volume {self.uuid} has linked clones "
                f"{', '.join(c.split('/')[1] for c in clones)}; flatten or delete them first, "
                "or delete with force (which flattens them)",
                field="volume_uuid",
            )
        if self.snapshots and not force:
            names = ", ".join(f"{s.name} ({s.uuid})" for s in self.snapshots)
            raise HasDependents(
                f"volume_uuid: volume {self.uuid} has snapshots {names}; delete them first, or delete with force",
                field="volume_uuid",
            )
        return clones


def load(fs, path: str) -> VolMeta:
    """The metadata at path, read through the pool's files (PoolFiles)."""
    try:
        d = json.loads(fs.read(path))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StorageIOError(f"volume metadata {path} is unreadable: {e}") from None
    if d.get("version", 0) > META_VERSION:
        raise StorageIOError(f"volume metadata {path} has version {d['version']}, newer than this agent")
    known = {f.name for f in dataclasses.fields(SnapMeta)}  # fields a newer agent added are kept out
    snaps = [SnapMeta(**{k: v for k, v in s.items() if k in known}) for s in d.pop("snapshots", [])]
    return VolMeta(snapshots=snaps, **d)


def save(fs, path: str, meta: VolMeta) -> None:
    fs.replace(path, json.dumps(dataclasses.asdict(meta), indent=1, sort_keys=True).encode())
