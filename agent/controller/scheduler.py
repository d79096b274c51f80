"""The policy scheduler, inside the controller: at each due time of a
vault's enabled policy it makes a checkpoint (agent.controller.checkpoints),
and it finishes the checkpoints whose backups ended. It also queues the
garbage collection of every backup point: `gc_after_delete` seconds after
its last backup deletion, and every `gc_interval` seconds, on a host whose
heartbeat reports the backup point.

Durable by construction, with no state of its own: the due times come from
the policy's patterns (dateutil), the runs made are the checkpoints in the
database, unique per (vault, due time). After a restart the scheduler looks
for the due times since the vault's last scheduled checkpoint: only the
newest is made, if it is at most `schedule_grace` seconds old (older ones
are counted as missed and logged, never made late in a burst); a due time
that has its
checkpoint is never made again. A newest due time older than the grace is
recorded as a missed checkpoint (status error, with the reason) and not run.
The clock is injectable so tests can run days in seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import func, select

from agent.api.v1 import jobs_pb2
from agent.controller import checkpoints
from agent.controller.context import ControllerContext
from agent.controller.dispatch import queue_backup_point_task
from agent.controller.health import host_state
from agent.controller.inventory import reported_backup_points
from agent.controller.models import BackupPoint, Checkpoint, Host, Policy, Vault
from agent.controller.policy import schedule
from agent.errors import BlockferryError

log = logging.getLogger("controller.scheduler")
GC_WAIT = 600  # seconds a scheduled GC waits for backups and restores to let go of the repository


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


class Scheduler:
    def __init__(
        self,
        ctx: ControllerContext,
        *,
        clock: Callable[[], float] = time.time,
        interval: float = 5.0,
        grace: float = 3600.0,
    ):
        self.ctx = ctx
        self.clock = clock
        self.interval = interval
        self.grace = grace
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Scheduler:
        checkpoints.recover(self.ctx)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep scheduling; the next tick retries
                log.exception("scheduler tick failed")

    def due(self, now: float) -> list[tuple[str, float, int, bool]]:
        """(vault id, newest due time, runs missed before it, too late) for
        every vault with a run due since its last one."""
        out = []
        with self.ctx.db.session() as s:
            rows = s.execute(
                select(Vault, Policy)
                .join(Policy, Policy.id == Vault.policy_id)
                .where(Policy.enabled.is_(True), Vault.status == "available")
            ).all()
            for vault, policy in rows:
                last = (
                    s.scalar(
                        select(func.max(Checkpoint.due_at)).where(
                            Checkpoint.vault_id == vault.id, Checkpoint.manual.is_(False)
                        )
                    )
                    or 0.0
                )
                since = max(vault.policy_since, last)
                rs = schedule(json.loads(policy.patterns_json), _utc(policy.start_time))
                times = [t.timestamp() for t in rs.between(_utc(since), _utc(now), inc=True)]
                times = [t for t in times if since < t <= now]
                if times:
                    out.append((vault.id, times[-1], len(times) - 1, times[-1] < now - self.grace))
        return out

    def tick(self, now: float | None = None) -> list[str]:
        """Make the due checkpoints and finish the ready ones; returns the ids made."""
        now = self.clock() if now is None else now
        made = []
        for vault_id, due_at, missed, late in self.due(now):
            if missed or late:
                log.warning("scheduled runs missed", extra={"vault": vault_id, "missed": missed + late})
            try:
                if late:  # recorded, not run: the window moves on
                    self._missed(vault_id, due_at, missed + 1)
                    continue
                cp = checkpoints.create(self.ctx, vault_id, due_at=due_at, manual=False)
            except BlockferryError as e:
                log.warning("checkpoint not made", extra={"vault": vault_id, "error": e.message})
                continue
            if cp:
                made.append(cp)
        checkpoints.finish_ready(self.ctx, now)
        if self.collect_garbage(now) and self.ctx.dispatcher is not None:
            self.ctx.dispatcher.wake()
        return made

    def collect_garbage(self, now: float) -> list[str]:
        """Queue a GC (one per backup point at a time) where deletions want
        one or the last is gc_interval old; returns the task ids."""
        cfg = self.ctx.cfg
        queued = []
        with self.ctx.db.session() as s:
            reported = reported_backup_points(
                h for h in s.scalars(select(Host)) if host_state(h, cfg.host_dead_after) == "online"
            )
            for bp in s.scalars(select(BackupPoint)):
                wanted = bool(bp.gc_wanted_at) and now >= bp.gc_wanted_at + cfg.gc_after_delete
                periodic = bool(cfg.gc_interval) and now >= (bp.last_gc_at or bp.ctime) + cfg.gc_interval
                if not (wanted or periodic) or bp.uuid not in reported:
                    continue  # nothing to do, or no host reaches it now (none ever wrote to it, or all are down)
                queued.append(
                    queue_backup_point_task(
                        s,
                        operation="gc",
                        tenant=bp.tenant,
                        bp_uuid=bp.uuid,
                        spec=jobs_pb2.GcSpec(backup_point_uuid=bp.uuid, wait_seconds=GC_WAIT),
                    )
                )
                if periodic:
                    bp.last_gc_at = now
        if queued:
            log.info("garbage collections queued", extra={"tasks": len(queued)})
        return queued

    def _missed(self, vault_id: str, due_at: float, missed: int) -> None:
        with self.ctx.db.session() as s:
            if s.scalar(select(Checkpoint.id).where(Checkpoint.vault_id == vault_id, Checkpoint.due_at == due_at)):
                return
            vault = s.get(Vault, vault_id)
            reason = (
                f"{missed} scheduled run(s) missed while the controller was down, the newest more than "
                f"{self.grace:.0f} s (schedule_grace) ago"
            )
            s.add(
                Checkpoint(
                    id=str(uuid.uuid4()),
                    vault_id=vault_id,
                    tenant=vault.tenant,
                    policy_id=vault.policy_id,
                    due_at=due_at,
                    status="error",
                    manual=False,
                    created_at=time.time(),
                    skipped_json=json.dumps([{"id": "", "type": "", "name": "", "code": "", "reason": reason}]),
                )
            )
