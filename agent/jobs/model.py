"""Job records: state machine, progress and error, as typed dataclasses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from agent.jobs.locks import LockMode


class JobState(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Allowed transitions of the state machine.
TRANSITIONS: dict[JobState, set[JobState]] = {
    JobState.WAITING: {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.WAITING},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


@dataclass
class Progress:
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0  # bytes per second
    eta: float = -1.0  # seconds; -1 when unknown

    @property
    def percent(self) -> float:
        if self.bytes_total <= 0:
            return 0.0
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass
class Job:
    id: str
    kind: str
    resource: str
    spec: Any  # the kind's spec dataclass, as submitted
    lock_mode: LockMode = LockMode.EXCLUSIVE
    state: JobState = JobState.WAITING
    progress: Progress = field(default_factory=Progress)
    error: JobError | None = None
    result: Any = None  # the kind's result dataclass: once succeeded, or what a failed job found
    created_at: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    version: int = 0  # bumped on every change, for watchers
