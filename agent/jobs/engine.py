"""The job engine: accepts, schedules, runs, journals and reports jobs."""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import re
import threading
import time
from collections.abc import Iterator

from agent.errors import BlockferryError, Busy, Cancelled, Draining, Interrupted, InvalidArgument, JobConflict, NotFound
from agent.jobs.journal import Journal
from agent.jobs.kinds import Claim, JobKind
from agent.jobs.limits import BandwidthLimiter, Limits
from agent.jobs.locks import ResourceLocks
from agent.jobs.model import TRANSITIONS, Job, JobError, JobState, Progress

log = logging.getLogger("agent.jobs")

JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
PROGRESS_SAVE_INTERVAL = 1.0
RATE_WINDOW = 5.0
DEFAULT_LIST_LIMIT = 1000


class JobContext:
    """What a running job sees of the engine."""

    def __init__(self, engine: JobEngine, job: Job):
        self._engine = engine
        self._job = job
        self._cancel = threading.Event()
        self._interrupt = threading.Event()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._last_save = 0.0
        self._own: BandwidthLimiter | None = None  # the job's own limit (a policy's), made at first use

    @property
    def job_id(self) -> str:
        return self._job.id

    @property
    def bandwidth_limit(self) -> int:
        """The host limit in bytes per second (0: none), for tools that take a
        rate of their own (qemu-img convert -r)."""
        return self._engine.limiter.rate

    def _limiters(self) -> list[BandwidthLimiter]:
        out = []
        bp = getattr(self._job.spec, "backup_point_uuid", "")
        named = self._engine.limits.get(f"backup_point:{bp}") if bp else None
        if named is not None:
            out.append(named)
        own = int(getattr(self._job.spec, "bandwidth_limit", 0) or 0)
        if own > 0:
            if self._own is None or self._own.rate != own:
                self._own = BandwidthLimiter(own)
            out.append(self._own)
        return out

    def checkpoint(self) -> None:
        """A safe point: stop here if the job was cancelled or the agent drains."""
        if self._cancel.is_set():
            raise Cancelled("job cancelled by request")
        if self._interrupt.is_set():
            raise Interrupted("the agent shut down while the job was running")

    def progress(self, bytes_done: int | None = None, bytes_total: int | None = None, phase: str | None = None) -> None:
        self._engine._update_progress(self, bytes_done, bytes_total, phase)

    def throttle(self, nbytes: int) -> None:
        """Account nbytes against every limit that applies (the host's, the
        job's backup point's, the job's own); sleeps off the longest,
        staying responsive to cancel."""
        delay = self._engine.limiter.delay_for(nbytes)
        for limiter in self._limiters():
            delay = max(delay, limiter.delay_for(nbytes))
        deadline = time.monotonic() + delay
        while True:
            self.checkpoint()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cancel.wait(min(left, 0.1))


class JobEngine:
    def __init__(
        self,
        journal_path: str,
        kinds: list[JobKind],
        *,
        max_concurrent: int = 4,
        bandwidth_limit: int = 0,
        on_busy: str = "wait",
        keep_finished: int = 10000,
    ):
        self.kinds = {k.name: k for k in kinds}
        self.observer = None  # agent.metrics.AgentMetrics: job_started/job_paused/job_ended
        self.max_concurrent = max_concurrent
        self.on_busy = on_busy
        self.keep_finished = keep_finished
        self.limits = Limits(bandwidth_limit)
        self.limiter = self.limits.host
        self.locks = ResourceLocks()
        self.journal = Journal(journal_path, self._types)
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []  # waiting job ids, FIFO
        self._running: dict[str, tuple[JobContext, threading.Thread]] = {}
        self._draining = False
        self._stopped = False
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="job-dispatch", daemon=True)

    # ---- lifecycle ----

    def _types(self, kind: str) -> tuple[type, type]:
        k = self.kinds[kind]
        return k.spec_type, k.result_type

    def start(self) -> None:
        pruned = self.journal.prune(self.keep_finished)
        now = time.time()
        for job in self.journal.load_all():
            if job.kind not in self.kinds:
                continue
            if job.state is JobState.RUNNING:
                if self.kinds[job.kind].resumable:
                    job.state = JobState.WAITING
                    job.progress = Progress(phase="resuming after agent restart")
                else:
                    job.state = JobState.FAILED
                    job.ended_at = now
                    job.error = JobError(
                        Interrupted.code,
                        "the agent stopped (crashed or was killed) "
                        "while the job was running; submit it again with a new job id",
                    )
                self.journal.save(job)
                log.warning(
                    "job interrupted by agent restart",
                    extra={"job": job.id, "kind": job.kind, "state": job.state.value},
                )
            self._jobs[job.id] = job
            if job.state is JobState.WAITING:
                self._queue.append(job.id)
        log.info("job journal loaded", extra={"jobs": len(self._jobs), "waiting": len(self._queue), "pruned": pruned})
        self._dispatcher.start()

    @property
    def draining(self) -> bool:
        return self._draining

    def running_count(self) -> int:
        with self._cond:
            return len(self._running)

    def drain(self, timeout: float) -> None:
        """Stop taking jobs, let running jobs finish for `timeout` seconds,
        then stop them at their next safe point. Waiting jobs stay queued in
        the journal and start after the next start."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while self._running and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            if self._running:
                log.warning(
                    "drain timeout: interrupting running jobs at a safe point", extra={"jobs": ",".join(self._running)}
                )
                for ctx, _ in self._running.values():
                    ctx._interrupt.set()
            threads = [t for _, t in self._running.values()]
        for t in threads:
            t.join()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._dispatcher.join()
        self.journal.close()

    # ---- API ----

    def submit(self, job_id: str, kind: str, spec) -> Job:
        if not JOB_ID.match(job_id or ""):
            raise InvalidArgument(
                "job_id: must be 1-128 characters of letters, digits, '.', '_', ':' "
                "or '-', starting with a letter or digit",
                field="job_id",
            )
        if kind not in self.kinds:
            raise InvalidArgument(f"spec: unknown job kind {kind!r}", field="spec")
        job_kind = self.kinds[kind]
        with self._cond:
            existing = self._jobs.get(job_id)
            if existing is not None:
                if existing.kind == kind and existing.spec == spec:
                    return self._snapshot(existing)
                raise JobConflict(
                    f"job_id: {job_id!r} is already used by a {existing.kind} job with different parameters",
                    field="job_id",
                )
            if self._draining:
                raise Draining("the agent is shutting down and accepts no new jobs")
        claim: Claim = job_kind.prepare(spec)  # may raise; nothing is recorded then
        with self._cond:
            if job_id in self._jobs:  # lost a race with the same id
                return self.submit(job_id, kind, spec)
            if self._draining:
                raise Draining("the agent is shutting down and accepts no new jobs")
            if self.on_busy == "refuse" and self.locks.would_block(claim.resource, claim.mode):
                raise Busy(f"resource: {claim.resource} is in use by another job", field="resource")
            job = Job(
                id=job_id,
                kind=kind,
                resource=claim.resource,
                lock_mode=claim.mode,
                spec=spec,
                created_at=time.time(),
                progress=Progress(phase="waiting"),
            )
            self.journal.save(job)
            self._jobs[job_id] = job
            self._queue.append(job_id)
            self._cond.notify_all()
            log.info("job accepted", extra={"job": job_id, "kind": kind, "resource": claim.resource})
            return self._snapshot(job)

    def get(self, job_id: str) -> Job:
        with self._cond:
            return self._snapshot(self._get(job_id))

    def list(self, states: set[JobState] | None = None, kind: str = "", limit: int = 0) -> list[Job]:
        if limit < 0:
            raise InvalidArgument("limit: must not be negative", field="limit")
        with self._cond:
            jobs = [
                j for j in self._jobs.values() if (not states or j.state in states) and (not kind or j.kind == kind)
            ]
            jobs.sort(key=lambda j: j.created_at, reverse=True)
            return [self._snapshot(j) for j in jobs[: limit or DEFAULT_LIST_LIMIT]]

    def watch(self, job_id: str, is_active=lambda: True, poll: float = 0.5) -> Iterator[Job]:
        """Yield the job now and after every change, until a final state."""
        seen = -1
        while True:
            with self._cond:
                job = self._get(job_id)
                while job.version == seen and is_active():
                    self._cond.wait(poll)
                snap = self._snapshot(job)
            if not is_active():
                return
            seen = snap.version
            yield snap
            if snap.state.final:
                return

    def cancel(self, job_id: str) -> Job:
        with self._cond:
            job = self._get(job_id)
            if job.state is JobState.WAITING:
                self._queue.remove(job_id)
                self._finish(job, JobState.CANCELLED, JobError(Cancelled.code, "job cancelled by request"))
            elif job.state is JobState.RUNNING:
                self._running[job_id][0]._cancel.set()
                job.progress.phase = "cancelling"
                self._touch(job)
            return self._snapshot(job)

    # ---- internals ----

    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job_id: no job {job_id!r}", field="job_id")
        return job

    @staticmethod
    def _snapshot(job: Job) -> Job:
        return dataclasses.replace(job, progress=copy.copy(job.progress))

    def _touch(self, job: Job) -> None:
        job.version += 1
        self._cond.notify_all()

    def _set_state(self, job: Job, state: JobState) -> None:
        if state not in TRANSITIONS[job.state]:
            raise AssertionError(f"job {job.id}: illegal transition {job.state} -> {state}")
        job.state = state

    def _finish(self, job: Job, state: JobState, error: JobError | None = None, result=None) -> None:
        """Called with the condition held."""
        was_running = job.state is JobState.RUNNING
        self._set_state(job, state)
        job.error = error
        job.result = result
        job.ended_at = time.time()
        job.progress.rate = 0.0
        job.progress.eta = -1.0 if state is not JobState.SUCCEEDED else 0.0
        job.progress.phase = state.value
        self.journal.save(job)
        self._touch(job)
        if self.observer is not None:
            seconds = job.ended_at - job.started_at if job.started_at else 0.0
            self.observer.job_ended(
                job.kind, state.value, seconds, int(job.progress.bytes_done or 0), was_running=was_running
            )

    def _dispatch_loop(self) -> None:
        with self._cond:
            while not self._stopped:
                if not self._draining:
                    self._start_runnable()
                self._cond.wait(1.0)

    def _start_runnable(self) -> None:
        for job_id in list(self._queue):
            if len(self._running) >= self.max_concurrent:
                return
            job = self._jobs[job_id]
            if not self.locks.try_acquire(job.resource, job.lock_mode):
                if job.progress.phase != "waiting for lock":
                    job.progress.phase = "waiting for lock"
                    self._touch(job)
                continue
            self._queue.remove(job_id)
            self._set_state(job, JobState.RUNNING)
            job.started_at = time.time()
            job.progress = Progress(phase="starting")
            self.journal.save(job)
            self._touch(job)
            if self.observer is not None:
                self.observer.job_started(job.kind)
            ctx = JobContext(self, job)
            t = threading.Thread(target=self._run_job, args=(job, ctx), name=f"job-{job_id}", daemon=True)
            self._running[job_id] = (ctx, t)
            t.start()

    def _run_job(self, job: Job, ctx: JobContext) -> None:
        kind = self.kinds[job.kind]
        state, error, result = JobState.SUCCEEDED, None, None
        try:
            ctx.checkpoint()
            result = kind.run(job.spec, ctx)
        except Cancelled as e:
            state, error = JobState.CANCELLED, JobError(e.code, e.message)
        except Interrupted as e:
            if kind.resumable:
                state = JobState.WAITING
            else:
                state, error = JobState.FAILED, JobError(e.code, e.message + "; submit it again with a new job id")
        except BlockferryError as e:
            state, error, result = JobState.FAILED, JobError(e.code, e.message), e.result
        except Exception as e:  # a bug, or an unexpected OS error
            log.exception("job failed unexpectedly", extra={"job": job.id})
            state, error = JobState.FAILED, JobError("INTERNAL", f"unexpected error: {type(e).__name__}: {e}")
        with self._cond:
            self.locks.release(job.resource)
            del self._running[job.id]
            if state is JobState.WAITING:
                if self.observer is not None:
                    self.observer.job_paused(job.kind)
                self._set_state(job, state)
                job.progress = Progress(phase="waiting to resume")
                self.journal.save(job)
                self._queue.append(job.id)
                self._touch(job)
            else:
                if state is JobState.SUCCEEDED and job.progress.bytes_total:
                    job.progress.bytes_done = job.progress.bytes_total
                self._finish(job, state, error, result)
        log.info(
            "job ended",
            extra={"job": job.id, "kind": job.kind, "state": state.value, **({"code": error.code} if error else {})},
        )

    def _update_progress(self, ctx: JobContext, done, total, phase) -> None:
        now = time.monotonic()
        with self._cond:
            job = ctx._job
            p = job.progress
            if phase is not None:
                p.phase = phase
            if total is not None:
                p.bytes_total = total
            if done is not None:
                p.bytes_done = done
                ctx._samples.append((now, done))
                while len(ctx._samples) > 2 and now - ctx._samples[0][0] > RATE_WINDOW:
                    ctx._samples.popleft()
                t0, b0 = ctx._samples[0]
                if now - t0 > 0.05:
                    p.rate = (done - b0) / (now - t0)
                if p.rate > 0 and p.bytes_total:
                    p.eta = max(0.0, (p.bytes_total - p.bytes_done) / p.rate)
            self._touch(job)
            if now - ctx._last_save >= PROGRESS_SAVE_INTERVAL:
                ctx._last_save = now
                self.journal.save_progress(job)
