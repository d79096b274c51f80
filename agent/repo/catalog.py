"""Finding backups on a backup point: filters as in seed 001's backup/list."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import InvalidArgument
from agent.repo.format import Manifest
from agent.repo.repository import Repository


@dataclass(frozen=True)
class BackupFilter:
    volume_uuid: str = ""
    snapshot_uuid: str = ""
    name: str = ""  # exact
    description: str = ""  # substring, case-insensitive
    tenant: str = ""
    created_after: float = 0.0  # unix seconds, inclusive; 0: no bound
    created_before: float = 0.0  # exclusive; 0: no bound

    def check(self) -> BackupFilter:
        if self.created_after < 0 or self.created_before < 0:
            raise InvalidArgument("created_after/created_before: must not be negative", field="created_after")
        if self.created_before and self.created_after and self.created_before <= self.created_after:
            raise InvalidArgument("created_before: must be after created_after", field="created_before")
        return self

    def matches(self, m: Manifest) -> bool:
        return (
            (not self.volume_uuid or m.volume_uuid == self.volume_uuid)
            and (not self.snapshot_uuid or m.snapshot_uuid == self.snapshot_uuid)
            and (not self.name or m.name == self.name)
            and (not self.description or self.description.lower() in m.description.lower())
            and (not self.tenant or m.tenant == self.tenant)
            and (not self.created_after or m.created_at >= self.created_after)
            and (not self.created_before or m.created_at < self.created_before)
        )


def list_backups(repo: Repository, flt: BackupFilter) -> list[Manifest]:
    """Matching backups, oldest first."""
    flt.check()
    return [m for m in repo.manifests() if flt.matches(m)]


def latest_for_volume(repo: Repository, volume_uuid: str) -> Manifest | None:
    found = list_backups(repo, BackupFilter(volume_uuid=volume_uuid))
    return found[-1] if found else None
