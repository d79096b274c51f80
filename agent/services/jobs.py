from __future__ import annotations

from google.protobuf import json_format

from agent import errors
from agent.api.v1 import jobs_pb2, jobs_pb2_grpc
from agent.jobs.engine import JobEngine
from agent.jobs.model import Job, JobState
from agent.kinds.backups import (
    BackupResult,
    BackupSpec,
    GcResult,
    GcSpec,
    RestoreResult,
    RestoreSpec,
    VerifyResult,
    VerifySpec,
)
from agent.kinds.checksum import ChecksumResult, ChecksumSpec
from agent.kinds.copy import CopyResult, CopySpec
from agent.kinds.vm_backup import VmBackupResult, VmBackupSpec
from agent.kinds.volumes import CloneResult, CloneSpec, FlattenResult, FlattenSpec
from agent.services.common import Auth, rpc

STATE_TO_PB = {
    JobState.WAITING: jobs_pb2.JOB_STATE_WAITING,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}

# spec/result dataclass <-> (oneof field, proto message class); the fields match by name.
SPECS = {
    ChecksumSpec: ("checksum", jobs_pb2.ChecksumSpec),
    CloneSpec: ("clone", jobs_pb2.CloneSpec),
    FlattenSpec: ("flatten", jobs_pb2.FlattenSpec),
    BackupSpec: ("backup", jobs_pb2.BackupSpec),
    RestoreSpec: ("restore", jobs_pb2.RestoreSpec),
    VerifySpec: ("verify", jobs_pb2.VerifySpec),
    GcSpec: ("gc", jobs_pb2.GcSpec),
    VmBackupSpec: ("vm_backup", jobs_pb2.VmBackupSpec),
    CopySpec: ("copy", jobs_pb2.CopySpec),
}
RESULTS = {
    ChecksumResult: ("checksum_result", jobs_pb2.ChecksumResult),
    CloneResult: ("clone_result", jobs_pb2.CloneResult),
    FlattenResult: ("flatten_result", jobs_pb2.FlattenResult),
    BackupResult: ("backup_result", jobs_pb2.BackupResult),
    RestoreResult: ("restore_result", jobs_pb2.RestoreResult),
    VerifyResult: ("verify_result", jobs_pb2.VerifyResult),
    GcResult: ("gc_result", jobs_pb2.GcResult),
    VmBackupResult: ("vm_backup_result", jobs_pb2.VmBackupResult),
    CopyResult: ("copy_result", jobs_pb2.CopyResult),
}
SPEC_BY_FIELD = {name: cls for cls, (name, _) in SPECS.items()}


def _to_pb(obj, msg):
    """A spec or result dataclass (nested ones too) as its proto message."""
    import dataclasses

    def plain(v):
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v

    return json_format.ParseDict({k: plain(v) for k, v in dataclasses.asdict(obj).items()}, msg())


def _ts(msg, seconds: float | None) -> None:
    if seconds is not None:
        msg.FromNanoseconds(int(seconds * 1e9))


def job_to_pb(job: Job) -> jobs_pb2.Job:
    p = job.progress
    out = jobs_pb2.Job(
        id=job.id,
        kind=job.kind,
        resource=job.resource,
        state=STATE_TO_PB[job.state],
        progress=jobs_pb2.Progress(
            phase=p.phase,
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            rate_bytes_per_second=p.rate,
            eta_seconds=p.eta,
            percent=p.percent,
        ),
    )
    if job.error:
        out.error.code, out.error.message = job.error.code, job.error.message
    _ts(out.created_at, job.created_at)
    _ts(out.started_at, job.started_at)
    _ts(out.ended_at, job.ended_at)
    name, msg = SPECS[type(job.spec)]
    getattr(out, name).CopyFrom(_to_pb(job.spec, msg))
    if job.result is not None:
        name, msg = RESULTS[type(job.result)]
        getattr(out, name).CopyFrom(_to_pb(job.result, msg))
    return out


def spec_from_pb(request: jobs_pb2.SubmitJobRequest) -> tuple[str, object]:
    which = request.WhichOneof("spec")
    if which is None:
        raise errors.InvalidArgument("spec: missing; set one job spec (" + ", ".join(SPEC_BY_FIELD) + ")", field="spec")
    cls = SPEC_BY_FIELD[which]
    pb = getattr(request, which)
    import dataclasses

    return which, cls(**{f.name: getattr(pb, f.name) for f in dataclasses.fields(cls)})


class JobService(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, engine: JobEngine, auth: Auth):
        self.engine = engine
        self.auth = auth

    @rpc
    def SubmitJob(self, request, context):
        kind, spec = spec_from_pb(request)
        return job_to_pb(self.engine.submit(request.job_id, kind, spec))

    @rpc
    def GetJob(self, request, context):
        return job_to_pb(self.engine.get(request.job_id))

    @rpc
    def ListJobs(self, request, context):
        states = set()
        for s in request.states:
            if s not in STATE_FROM_PB:
                raise errors.InvalidArgument(f"states: unknown job state {s}", field="states")
            states.add(STATE_FROM_PB[s])
        jobs = self.engine.list(states, request.kind, request.limit)
        return jobs_pb2.ListJobsResponse(jobs=[job_to_pb(j) for j in jobs])

    @rpc
    def WatchJob(self, request, context):
        for job in self.engine.watch(request.job_id, is_active=context.is_active):
            yield job_to_pb(job)

    @rpc
    def CancelJob(self, request, context):
        return job_to_pb(self.engine.cancel(request.job_id))
