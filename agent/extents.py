"""Extent types shared by drivers, the native core and the backup engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range [start, start + length)."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length
