"""What a job kind provides to the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from agent.jobs.locks import LockMode


class Context(Protocol):
    """What a running job sees of the engine (agent.jobs.engine.JobContext,
    or NullContext outside it)."""

    job_id: str
    bandwidth_limit: int

    def checkpoint(self) -> None:
        """Raise Cancelled or Interrupted here when the job must stop."""

    def throttle(self, nbytes: int) -> None:
        """Sleep as the bandwidth limit asks for nbytes more."""

    def progress(self, bytes_done: int | None = None, bytes_total: int | None = None, phase: str | None = None) -> None:
        """Report progress (None: unchanged)."""


@dataclass(frozen=True)
class Claim:
    """The resource a job locks while it runs, and how."""

    resource: str
    mode: LockMode


class JobKind(ABC):
    name: ClassVar[str]
    spec_type: ClassVar[type]
    result_type: ClassVar[type]
    # True if a job interrupted by a shutdown or crash may simply run again.
    resumable: ClassVar[bool] = False

    @abstractmethod
    def prepare(self, spec: Any) -> Claim:
        """Validate a spec before the job is accepted (raise a
        BlockferryError naming the bad field) and say what it locks."""

    @abstractmethod
    def run(self, spec: Any, ctx: Context) -> Any:
        """Do the work; report progress and call ctx.checkpoint() at safe
        points. Returns the kind's result dataclass."""


class NullContext:
    """A job context for callers outside the job engine (benchmarks, tools):
    no progress, no cancellation, no bandwidth limit."""

    job_id = "local"
    bandwidth_limit = 0

    def checkpoint(self) -> None:
        pass

    def throttle(self, nbytes: int) -> None:
        pass

    def progress(self, bytes_done: int | None = None, bytes_total: int | None = None, phase: str | None = None) -> None:
        pass
