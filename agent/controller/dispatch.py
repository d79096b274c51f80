"""The dispatcher: places waiting tasks on agents and follows them.

- Placement: an online, not draining host that serves the task's pool (and
  its target pool), honouring the pool's AvailHosts/LimitHost (the hosts a
  pool is attached on) and each host's max_jobs; the least loaded first.
  A task of a backup point alone (verify, gc) goes to a host whose
  heartbeat reports that backup point (it reaches its data). A backup
  point is attached on the chosen host first (idempotent).
- Running tasks are followed by a WatchJob stream each (a thread per
  running task): progress as the agent reports it, then the result or the
  error, land in the task and in the object it creates the moment the
  agent's job ends.
- A host that stops sending heartbeats: its running tasks fail with a
  reason naming it, and run again on another eligible host when the
  operation is idempotent (up to MAX_ATTEMPTS); waiting tasks simply go to
  another host. This is safe on shared storage because an agent cut off
  from the controller cancels its own jobs after [controller] fence_after
  (below host_dead_after), and a cancelled job leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from google.protobuf.json_format import MessageToDict, ParseDict
from sqlalchemy import BigInteger, Text, bindparam, delete, func, select, update

from agent.api.v1 import backups_pb2, jobs_pb2
from agent.client import JobStream
from agent.controller.agents import backup_point_request
from agent.controller.health import host_state
from agent.controller.inventory import reporting_hosts
from agent.controller.models import Backup, BackupPoint, Host, Pool, Task, Volume
from agent.errors import BlockferryError, Busy, NotFound, TargetUnreachable

log = logging.getLogger("controller.dispatch")
MAX_ATTEMPTS = 3
WAIT_LIMIT = 3600.0  # a task nobody could run for this long: timeout
FOLLOW_EVERY = 0.25  # seconds between two progress writes of one running task
STREAM_RETRY = 1.0  # seconds before a dropped WatchJob stream is opened again
SPECS = {
    "clone": jobs_pb2.CloneSpec,
    "backup": jobs_pb2.BackupSpec,
    "restore": jobs_pb2.RestoreSpec,
    "gc": jobs_pb2.GcSpec,
    "verify": jobs_pb2.VerifySpec,
    "vm_backup": jobs_pb2.VmBackupSpec,
    "copy": jobs_pb2.CopySpec,
}
FINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}

# A task's end is on the path a REST caller waits on: these statements are
# built once (building and compiling one costs more than SQLite's write).
_task, _backup, _point, _volume = Task.__table__.c, Backup.__table__.c, BackupPoint.__table__.c, Volume.__table__.c
_ENDED = {
    succeeded: update(Task.__table__)
    .where(_task.id == bindparam("task_id"))
    .values(
        status=bindparam("new_status"),
        ended_at=bindparam("ended"),
        error_code=bindparam("code"),
        error_message=bindparam("message"),
        result_json=bindparam("result"),
        **({"progress": 100.0} if succeeded else {}),
    )
    for succeeded in (True, False)
}
_ENDED_OWNED = {  # only while this job owns the task
    k: q.where(_task.status == "running", _task.agent_job_id == bindparam("job_id")) for k, q in _ENDED.items()
}
_BACKUP_FAILED = (
    update(Backup.__table__)
    .where(_backup.uuid == bindparam("key"))
    .values(status="BackupFailed", mtime=bindparam("at"))
)
_BACKUP_MADE = (
    update(Backup.__table__)
    .where(_backup.uuid == bindparam("key"))
    .values(
        status="BackupSucceeded",
        mtime=bindparam("at"),
        mode=bindparam("new_mode"),
        mode_reason=bindparam("new_mode_reason"),
        consistency=bindparam("new_consistency"),
        size=bindparam("new_size"),
        stored_bytes=bindparam("new_stored_bytes"),
        image_digest=bindparam("new_image_digest"),
    )
)
_COPY_MADE = (
    update(Backup.__table__)
    .where(_backup.uuid == bindparam("key"))
    .values(status="BackupSucceeded", mtime=bindparam("at"))
)
_POINT_REF = (
    update(BackupPoint.__table__)
    .where(_point.uuid == select(_backup.backup_point_uuid).where(_backup.uuid == bindparam("key")).scalar_subquery())
    .values(ref=_point.ref + 1)
)
_VOLUME_MADE = (
    update(Volume.__table__)
    .where(_volume.uuid == bindparam("key"))
    .values(
        state="ready",
        mtime=bindparam("at"),
        host_uuid=bindparam("host"),
        capacity=func.coalesce(bindparam("new_capacity", type_=BigInteger), _volume.capacity),
        access_path=func.coalesce(bindparam("new_access_path", type_=Text), _volume.access_path),
    )
)
_LIVE = select(Task).where(Task.status.in_(("waiting", "running"))).order_by(Task.created_at)
_VOLUME_GONE = delete(Volume.__table__).where(_volume.uuid == bindparam("key"))


def _backup_made(db, backup_uuid: str, result: dict, now: int) -> None:
    """A backup job's result (BackupResult as a dict) on its backup's row."""
    made = {
        "key": backup_uuid,
        "at": now,
        "new_mode": result.get("mode", ""),
        "new_mode_reason": result.get("mode_reason", ""),
        "new_consistency": result.get("consistency", ""),
        "new_size": int(result.get("size", 0)),
        "new_stored_bytes": int(result.get("stored_bytes", 0)),
        "new_image_digest": result.get("image_digest", ""),
    }
    if db.execute(_BACKUP_MADE, made).rowcount:
        db.execute(_POINT_REF, {"key": backup_uuid})


def _runs_vm(host: Host, vm_uuid: str) -> bool:
    """Whether the host's last heartbeat reported the VM running."""
    return any(vm.get("UUID") == vm_uuid for vm in json.loads(host.vms_json or "[]"))


def new_task(
    s,
    *,
    task_id: str,
    operation: str,
    tenant: str,
    resource_type: str,
    resource_uuid: str,
    job_kind: str,
    spec,
    pool_uuid: str,
    target_pool_uuid: str = "",
    backup_point_uuid: str = "",
    idempotent: bool = True,
) -> Task:
    t = Task(
        id=task_id,
        operation_type=operation,
        status="waiting",
        progress=0.0,
        tenant=tenant,
        resource_type=resource_type,
        resource_uuid=resource_uuid,
        pool_uuid=pool_uuid,
        target_pool_uuid=target_pool_uuid,
        backup_point_uuid=backup_point_uuid,
        job_kind=job_kind,
        spec_json=json.dumps(MessageToDict(spec, preserving_proto_field_name=True)),
        idempotent=idempotent,
        created_at=time.time(),
    )
    s.add(t)
    return t


HOST_BOUND = ("local", "disk", "fc")  # backup point types one host holds


def _copy_target(t: Task) -> str:
    return str(json.loads(t.spec_json).get("target_backup_point_uuid", ""))


def queue_backup_point_task(
    s, *, operation: str, tenant: str, bp_uuid: str, spec, resource_uuid: str = "", resource_type: str = "backup_point"
) -> str:
    """A verify or gc task of a backup point (its id). A gc already waiting
    or running for the backup point takes the new request: one at a time."""
    import uuid as uuidlib

    if operation == "gc":
        pending = s.scalar(
            select(Task.id).where(
                Task.backup_point_uuid == bp_uuid, Task.job_kind == "gc", Task.status.in_(("waiting", "running"))
            )
        )
        if pending:
            return pending
    task_id = str(uuidlib.uuid4())
    new_task(
        s,
        task_id=task_id,
        operation=operation,
        tenant=tenant,
        resource_type=resource_type,
        resource_uuid=resource_uuid or bp_uuid,
        job_kind=operation,
        spec=spec,
        pool_uuid="",
        backup_point_uuid=bp_uuid,
    )
    return task_id


def queue_copy(s, src: Backup, target_uuid: str, *, checkpoint_id: str = "") -> dict:
    """A copy task of a backup to another backup point, and the row of the
    copy: a backup of its own there (its own uuid, copy_of the original),
    outside any vault; checkpoint_id: the checkpoint whose policy copies
    it (the copy's retention finds it by that)."""
    import uuid as uuidlib

    copy_id, task_id, now = str(uuidlib.uuid4()), str(uuidlib.uuid4()), int(time.time())
    row = Backup(**{c.name: getattr(src, c.name) for c in Backup.__table__.columns if c.name != "uuid"})
    row.uuid, row.backup_point_uuid, row.copy_of = copy_id, target_uuid, src.copy_of or src.uuid
    row.status, row.task_id, row.ctime, row.mtime = "BackupStarted", task_id, now, now
    row.vault_id, row.checkpoint_id = "", checkpoint_id
    s.add(row)
    spec = jobs_pb2.CopySpec(
        source_backup_point_uuid=src.backup_point_uuid,
        target_backup_point_uuid=target_uuid,
        backup_uuids=[src.uuid],
        target_backup_uuids=[copy_id],
        verify=True,
    )
    new_task(
        s,
        task_id=task_id,
        operation="copy",
        tenant=src.tenant,
        resource_type="backup",
        resource_uuid=copy_id,
        job_kind="copy",
        spec=spec,
        pool_uuid="",
        backup_point_uuid=src.backup_point_uuid,
    )
    return {"backup_uuid": src.uuid, "copy_uuid": copy_id, "task_id": task_id}


def held_at(s, target_uuid: str) -> set[str]:
    """The backups a backup point holds or holds a copy of (original ids)."""
    there = s.scalars(
        select(Backup).where(Backup.backup_point_uuid == target_uuid, Backup.status != "BackupFailed")
    ).all()
    return {b.copy_of for b in there} | {b.uuid for b in there}


class Dispatcher:
    def __init__(self, cfg, db, agents, secrets, *, interval: float = 0.2):
        self.cfg = cfg
        self.db = db
        self.agents = agents
        self.secrets = secrets
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.metrics = None  # agent.controller.metrics.ControllerMetrics, when served
        self.notifier = None  # agent.controller.notify.Notifier: told of failed tasks
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._submitting: dict[str, str] = {}  # task id -> host, while its SubmitJob is on the way
        self._watching: dict[str, JobStream | None] = {}  # agent job id -> the WatchJob stream following it
        self._retry_at: dict[str, float] = {}  # task id -> when its broken stream may be opened again
        self._lock = threading.Lock()
        self._submit_pool = ThreadPoolExecutor(8, thread_name_prefix="submit")
        self._attached: dict[tuple[str, str], tuple] = {}  # (host, backup point) -> the row fields sent
        self._changed = threading.Condition()
        self._version = 0  # bumped when a task's progress or state is written
        self._backlog = False  # the last round left a task waiting for a free slot

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._submit_pool.shutdown(wait=False)

    def wake(self) -> None:
        """A new task: look now instead of at the next tick."""
        self._wake.set()

    @property
    def version(self) -> int:
        """Changes so far: pass it to wait_for_change before reading a task."""
        return self._version

    def wait_for_change(self, seen: int, timeout: float) -> None:
        """Return when a task's progress or state was written after version
        `seen` (a REST caller waiting for a task's end), or after timeout."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != seen, timeout)

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("dispatch tick failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    # --- one round ---
    def tick(self) -> None:
        """Place waiting tasks first (dispatch latency is what callers feel);
        then make sure every running task is followed by a WatchJob stream
        (after a controller restart, or a stream the agent dropped), and
        move the tasks of hosts that stopped answering."""
        # one session: a tick after a new task is on its caller's path
        with self.db.session() as s:
            hosts = {h.uuid: h for h in s.scalars(select(Host)).all()}
            rows = s.scalars(_LIVE).all()
            waiting = [t for t in rows if t.status == "waiting" and t.id not in self._submitting]
            serving, points = self._needs(s, waiting)
        running = [t for t in rows if t.status == "running"]
        load = Counter(t.host_uuid for t in running)
        for host_uuid in self._submitting.values():
            load[host_uuid] += 1
        backlog = False
        for t in waiting:
            backlog |= not self._place(t, hosts, load, serving, points.get(t.backup_point_uuid), points)
        self._backlog = backlog
        now = time.monotonic()
        for t in running:
            host = hosts.get(t.host_uuid)
            if not self._online(host):
                self._host_lost(t, host)
            elif t.agent_job_id not in self._watching and now >= self._retry_at.get(t.id, 0.0):
                self._follow(t, host)
        live = {t.id for t in running}
        for tid in [k for k in self._retry_at if k not in live]:
            del self._retry_at[tid]

    def _online(self, h: Host | None) -> bool:
        return h is not None and host_state(h, self.cfg.host_dead_after) == "online"

    @staticmethod
    def _needs(s, waiting: list[Task]) -> tuple[dict[str, set[str]], dict[str, BackupPoint]]:
        """What placing the waiting tasks reads: the hosts each of their pools
        is attached on, and their backup points' rows."""
        pids = {p for t in waiting for p in (t.pool_uuid, t.target_pool_uuid) if p}
        bpids = {t.backup_point_uuid for t in waiting if t.backup_point_uuid}
        bpids |= {_copy_target(t) for t in waiting if t.job_kind == "copy"}
        serving = (
            {p.uuid: set(json.loads(p.avail_hosts_json)) for p in s.scalars(select(Pool).where(Pool.uuid.in_(pids)))}
            if pids
            else {}
        )
        points = {b.uuid: b for b in s.scalars(select(BackupPoint).where(BackupPoint.uuid.in_(bpids)))} if bpids else {}
        return serving, points

    def _candidates(
        self,
        t: Task,
        hosts: dict[str, Host],
        load: Counter,
        serving_pools: dict[str, set[str]],
        points: dict[str, BackupPoint] | None = None,
    ) -> list[Host]:
        serving = None
        for pid in filter(None, (t.pool_uuid, t.target_pool_uuid)):
            ids = serving_pools.get(pid, set())
            serving = ids if serving is None else serving & ids
        if serving is None and t.backup_point_uuid:
            serving = reporting_hosts(hosts.values(), t.backup_point_uuid)
        if t.job_kind == "copy":
            # a directory or a device is one host's: attached anywhere else it would be
            # another repository, so a copy there runs only where the target is served
            target = (points or {}).get(_copy_target(t))
            if target is None or target.btype in HOST_BOUND:
                there = reporting_hosts(hosts.values(), _copy_target(t))
                both = (serving or set()) & there
                # none serves both: a host serving the target reads from one serving the source
                serving = both or (there if serving else set())
        if t.job_kind == "vm_backup":  # only the host that runs the VM reaches it
            serving = {hid for hid in serving or hosts if hid in hosts and _runs_vm(hosts[hid], t.resource_uuid)}
        ok = [
            h
            for hid, h in hosts.items()
            if (serving is None or hid in serving) and self._online(h) and load[hid] < max(1, h.max_jobs)
        ]
        return sorted(ok, key=lambda h: (load[h.uuid] / max(1, h.max_jobs), h.uuid))

    def _place(
        self,
        t: Task,
        hosts: dict[str, Host],
        load: Counter,
        serving: dict[str, set[str]],
        point: BackupPoint | None,
        points: dict[str, BackupPoint] | None = None,
    ) -> bool:
        """Pick a host now; submit in the background (an RPC takes tens of
        milliseconds, and tasks queued behind it should not wait for it).
        Returns whether a host was found."""
        candidates = self._candidates(t, hosts, load, serving, points)
        if not candidates:
            if time.time() - t.created_at > WAIT_LIMIT:
                self._finish(t, "timeout", "NO_HOST", f"no eligible host could run it within {int(WAIT_LIMIT)} s")
            return False
        load[candidates[0].uuid] += 1
        self._submitting[t.id] = candidates[0].uuid
        self._submit_pool.submit(self._submit, t, candidates, point)
        return True

    def _submit(self, t: Task, candidates: list[Host], point: BackupPoint | None) -> None:
        try:
            for host in candidates:
                try:
                    # a copy on a host that does not serve its source reads it from one that does
                    peer = self._copy_source(t, host) if t.job_kind == "copy" else ""
                    attached = False if peer else self._attach(t, host, point)
                    if t.job_kind == "copy":  # the target backup point too
                        attached = self._attach_target(t, host) or attached
                    job_id = f"{t.id}.{t.attempts}"
                    spec = ParseDict(json.loads(t.spec_json), SPECS[t.job_kind]())
                    if peer:
                        spec.source_address = peer
                    try:
                        self.agents.client(host).submit(job_id, **{t.job_kind: spec})
                    except NotFound as e:  # the agent lost a definition we sent it before: once more, with it
                        if attached or e.field != "backup_point_uuid":
                            raise
                        if not peer:
                            self._attach(t, host, point, force=True)
                        if t.job_kind == "copy":
                            self._attach_target(t, host, force=True)
                        self.agents.client(host).submit(job_id, **{t.job_kind: spec})
                except (TargetUnreachable, Busy) as e:
                    log.info("host cannot take the task now", extra={"task": t.id, "host": host.uuid, "why": e.message})
                    continue
                except BlockferryError as e:  # the request itself is refused: no other host will do better
                    if t.attempts and e.code == "ALREADY_EXISTS" and (adopted := self._adopt(t, host)) is not None:
                        with self.db.session() as s:
                            s.get(Task, t.id).host_uuid = host.uuid
                        t.host_uuid = host.uuid
                        self._finish(t, "success", result=adopted)  # the lost attempt completed after all
                        return
                    self._finish(t, "failed", e.code, e.message)
                    return
                with self.db.session() as s:
                    row = s.get(Task, t.id)
                    row.status, row.host_uuid, row.agent_job_id = "running", host.uuid, job_id
                    row.started_at = row.started_at or time.time()
                    t.started_at = row.started_at
                log.info("task dispatched", extra={"task": t.id, "host": host.uuid, "kind": t.job_kind})
                t.status, t.host_uuid, t.agent_job_id = "running", host.uuid, job_id
                self._follow(t, host)  # at once: the job may be over in milliseconds
                return
        except Exception:
            log.exception("dispatching a task failed", extra={"task": t.id})
        finally:
            self._submitting.pop(t.id, None)

    def _attach(self, t: Task, host: Host, bp: BackupPoint | None, *, force: bool = False) -> bool:
        """Send the task's backup point (its row, read by the tick that placed
        the task) to the host unless it has this very definition from us
        already (the agent keeps what it was sent across restarts; a changed
        definition, a new password, is sent again). Returns whether it was
        sent now."""
        if not t.backup_point_uuid:
            return False
        if bp is None:
            raise BlockferryError(f"backup point {t.backup_point_uuid} was deleted")
        return self._send(host, bp, force)

    def _copy_source(self, t: Task, host: Host) -> str:
        """ "" when the host serves the copy's source backup point itself;
        otherwise the TCP address of an online host that does."""
        with self.db.session() as s:
            hosts = s.scalars(select(Host).order_by(Host.uuid)).all()
            for h in hosts:
                s.expunge(h)
        src = reporting_hosts(hosts, t.backup_point_uuid)
        if host.uuid in src:
            return ""
        for h in hosts:
            if h.uuid in src and self._online(h) and h.address and not h.address.startswith("unix:"):
                return h.address
        raise TargetUnreachable(
            f"backup_point_uuid: no online host that serves backup point {t.backup_point_uuid} listens on TCP, "
            "where another host's agent could read it",
            field="backup_point_uuid",
        )

    def _attach_target(self, t: Task, host: Host, *, force: bool = False) -> bool:
        """A copy task's target backup point, sent like its source."""
        target = json.loads(t.spec_json).get("target_backup_point_uuid", "")
        with self.db.session() as s:
            bp = s.get(BackupPoint, target)
            if bp is not None:
                s.expunge(bp)
        if bp is None:
            raise NotFound(
                f"target_backup_point_uuid: backup point {target} was deleted", field="target_backup_point_uuid"
            )
        return self._send(host, bp, force)

    def _send(self, host: Host, bp: BackupPoint, force: bool) -> bool:
        # the fields the definition is made of, secrets still sealed: comparing
        # them needs no unsealing and no request built for an agent that has it
        sent = (bp.btype, bp.ip, bp.port, bp.root_dir, bp.sub_dir, bp.password_sealed, bp.env_sealed)
        key = (host.uuid, bp.uuid)
        if not force and self._attached.get(key) == sent:
            return False
        self.agents.client(host).attach_backup_point(backup_point_request(bp, self.secrets))
        self._attached[key] = sent
        return True

    def _host_lost(self, t: Task, host: Host | None) -> None:
        with self._lock:  # its stream may hang on a cut link: end it
            stream = self._watching.get(t.agent_job_id)
        if stream is not None:
            stream.cancel()
        name = host.hostname if host else t.host_uuid
        if t.idempotent and t.attempts + 1 < MAX_ATTEMPTS:
            with self.db.session() as s:
                row = s.get(Task, t.id)
                row.status, row.attempts, row.host_uuid, row.progress = "waiting", row.attempts + 1, "", 0.0
                row.error_message = f"host {name} stopped answering; running it again on another host"
            log.warning("host lost: task re-queued", extra={"task": t.id, "host": t.host_uuid})
        else:
            self._finish(t, "failed", "HOST_LOST", f"host {name} stopped answering while the task ran")

    def _follow(self, t: Task, host: Host) -> None:
        """Follow a running task's job through a WatchJob stream of its own
        thread: progress as the agent reports it (written at most every
        FOLLOW_EVERY seconds), and the end at once."""
        with self._lock:
            if t.agent_job_id in self._watching:
                return
            self._watching[t.agent_job_id] = None
        threading.Thread(target=self._watch, args=(t, host), name=f"watch-{t.id[:8]}", daemon=True).start()

    def _watch(self, t: Task, host: Host) -> None:
        written, percent = time.monotonic(), t.progress  # a job over within FOLLOW_EVERY writes only its end
        try:
            stream = self.agents.client(host).watch(t.agent_job_id)
            with self._lock:
                self._watching[t.agent_job_id] = stream
            for job in stream:
                if self._stop.is_set():
                    return
                if job.state in FINAL:
                    self._ended(t, host, job)
                    return
                now = time.monotonic()
                if round(job.progress.percent, 1) != percent and now - written >= FOLLOW_EVERY:
                    written, percent = now, round(job.progress.percent, 1)
                    with self.db.session() as s:
                        s.get(Task, t.id).progress = percent
                    self._notify()
            self._retry_at[t.id] = time.monotonic() + STREAM_RETRY  # ended without a final state
        except TargetUnreachable:  # the agent restarts, or is away: the heartbeat decides whether it is gone
            self._retry_at[t.id] = time.monotonic() + STREAM_RETRY
        except BlockferryError as e:  # the agent no longer knows the job (its journal was lost)
            self._finish(t, "failed", e.code, e.message)
        except Exception:
            log.exception("following a task failed", extra={"task": t.id})
            self._retry_at[t.id] = time.monotonic() + STREAM_RETRY
        finally:
            with self._lock:
                self._watching.pop(t.agent_job_id, None)

    def _ended(self, t: Task, host: Host, job: jobs_pb2.Job) -> None:
        field = f"{t.job_kind}_result"
        result = (
            MessageToDict(getattr(job, field), preserving_proto_field_name=True) if job.HasField(field) else None
        )  # a failed verify lists what it found damaged
        job_id = t.agent_job_id
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            self._finish(t, "success", result=result, job_id=job_id)
        elif t.attempts and job.error.code == "ALREADY_EXISTS" and (adopted := self._adopt(t, host)) is not None:
            # a re-run whose first attempt finished on the lost host after all: its
            # result is complete (targets appear atomically), so it is this task's
            self._finish(t, "success", result=adopted, job_id=job_id)
        else:
            code, message = job.error.code or "FAILED", job.error.message or "the job failed"
            self._finish(t, "failed", code, message, result=result, job_id=job_id)

    def _adopt(self, t: Task, host: Host) -> dict | None:
        """The object a lost attempt made, if it is there and complete."""
        from agent.api.v1 import volumes_pb2

        spec = json.loads(t.spec_json)
        try:
            if t.resource_type == "volume":
                pool = spec.get("target_pool_uuid") or spec.get("pool_uuid")
                info = self.agents.client(host).get_volume(
                    volumes_pb2.VolumeRef(pool_uuid=pool, volume_uuid=t.resource_uuid), timeout=30
                )
                return {
                    "pool_uuid": pool,
                    "volume_uuid": info.uuid,
                    "access_path": info.access_path,
                    "capacity": info.capacity,
                    "adopted": True,
                }
            if t.resource_type == "backup":
                b = self.agents.client(host).get_backup(
                    backups_pb2.GetBackupRequest(backup_point_uuid=t.backup_point_uuid, backup_uuid=t.resource_uuid),
                    timeout=30,
                )
                return {
                    "backup_uuid": b.uuid,
                    "mode": b.mode,
                    "size": b.size,
                    "image_digest": b.image_digest,
                    "adopted": True,
                }
        except BlockferryError:
            return None
        return None

    def _finish(
        self,
        t: Task,
        status: str,
        code: str = "",
        message: str = "",
        result: dict | None = None,
        job_id: str = "",
    ) -> None:
        """The task's end. With job_id (the end an agent's job reported): only
        while that job still owns the task; when its host was taken for lost
        meanwhile, another attempt owns it now."""
        now = time.time()
        values = {
            "task_id": t.id,
            "new_status": status,
            "ended": now,
            "code": code,
            "message": message,
            "result": json.dumps(result or {}),
            "job_id": job_id,
        }
        with self.db.session() as s:
            if s.connection().execute((_ENDED_OWNED if job_id else _ENDED)[status == "success"], values).rowcount == 0:
                return
            self._apply(s, t, status, result or {})
        t.status, t.ended_at = status, now
        self._notify()
        if self.metrics is not None:
            self.metrics.task_ended(t.operation_type, status, now - (t.started_at or now), result or {})
        if self.notifier is not None:
            self.notifier.task_ended(t, status, code, message)
        log.info("task ended", extra={"task": t.id, "status": status, "code": code})
        if self._backlog:
            self._wake.set()  # its slot on the host is free: place what waits for it now

    @staticmethod
    def _apply(s, t: Task, status: str, result: dict) -> None:
        """What a task's end means for the object it made (a verify of a
        backup makes nothing: the backup stays as it is)."""
        now, db = int(time.time()), s.connection()
        if t.resource_type == "volume" and t.job_kind in ("clone", "restore"):
            if status != "success":  # a failed clone or restore leaves no volume behind
                db.execute(_VOLUME_GONE, {"key": t.resource_uuid})
                return
            capacity = result.get("capacity")
            db.execute(
                _VOLUME_MADE,
                {
                    "key": t.resource_uuid,
                    "at": now,
                    "host": t.host_uuid,
                    "new_capacity": None if capacity is None else int(capacity),
                    "new_access_path": result.get("access_path"),
                },
            )
        elif t.job_kind == "gc":
            bp = s.get(BackupPoint, t.backup_point_uuid)
            if bp is not None and status == "success":
                bp.last_gc_at = time.time()
                if bp.gc_wanted_at <= t.created_at:  # deletions before this GC was asked for: reclaimed
                    bp.gc_wanted_at = 0.0
            elif bp is not None and bp.gc_wanted_at:  # busy or away: again gc_after_delete from now
                bp.gc_wanted_at = max(bp.gc_wanted_at, time.time())
        elif t.job_kind == "vm_backup":  # one backup per disk, in the spec's order
            disks = json.loads(t.spec_json).get("disks", [])
            results = result.get("backups", []) if status == "success" else []
            for i, d in enumerate(disks):
                if i >= len(results):
                    db.execute(_BACKUP_FAILED, {"key": d["backup_uuid"], "at": now})
                else:
                    _backup_made(db, d["backup_uuid"], results[i], now)
        elif t.job_kind == "copy":  # the copy is a backup of its own on the target
            if status != "success":
                db.execute(_BACKUP_FAILED, {"key": t.resource_uuid, "at": now})
            elif db.execute(_COPY_MADE, {"key": t.resource_uuid, "at": now}).rowcount:
                db.execute(_POINT_REF, {"key": t.resource_uuid})
        elif t.resource_type == "backup" and t.job_kind == "backup":
            if status != "success":
                db.execute(_BACKUP_FAILED, {"key": t.resource_uuid, "at": now})
                return
            _backup_made(db, t.resource_uuid, result, now)
