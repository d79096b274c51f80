"""Answers under /zstack/v1/backup-storage (seed 004)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from agent.controller.api.shapes import Shape


class BackupStorageInventory(Shape):
    uuid: str  # 32 hex digits in the seed's spelling; dashed uuids are accepted in paths
    name: str
    url: str
    description: str
    totalCapacity: int
    availableCapacity: int
    type: str
    state: str  # Enabled
    status: str  # Connected or Disconnected
    createDate: str
    lastOpDate: str
    attachedZoneUuids: list[str]


class Inventories(Shape):
    """A query's answer; with count=true only total; with replyWithCount
    the page and the total."""

    inventories: list[BackupStorageInventory] | None = None
    success: bool
    total: int | None = None


class InventoryAnswer(Shape):
    inventory: BackupStorageInventory


class Deleted(Shape):
    """A DELETE's answer: {}."""


class ZStackErrorCode(Shape):
    code: str  # SYS.xxxx, BS.xxxx or ID.xxxx (docs/errors.md)
    description: str
    details: str
    elaboration: str | None
    opaque: dict[str, Any] | None
    cause: dict[str, Any] | None


class ZStackError(Shape):
    error: ZStackErrorCode


class ReconnectBody(Shape):
    reconnectBackupStorage: dict[str, Any] = Field(description="{} (the only action)")
    systemTags: list[str] | None = None
    userTags: list[str] | None = None
