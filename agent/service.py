"""gRPC servicers: translate between proto messages and domain objects.

Nothing here decides anything: validation lives in the job kinds and the
engine, and the error -> status mapping in agent.errors.
"""
from __future__ import annotations

import functools
import hmac
import inspect
import logging
import socket

import grpc

from agent import __version__, errors
from agent.api.v1 import host_pb2, host_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from agent.bindings import BindingStatus
from agent.checksum import ChecksumResult, ChecksumSpec
from agent.jobs.engine import JobEngine
from agent.jobs.model import Job, JobState

log = logging.getLogger("agent.service")

STATE_TO_PB = {
    JobState.WAITING: jobs_pb2.JOB_STATE_WAITING,
    JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED,
    JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}


class Auth:
    """Bearer-token check for TCP callers; unix-socket callers are trusted by
    the socket's file permissions."""

    def __init__(self, token: str):
        self.token = token

    def check(self, context: grpc.ServicerContext) -> None:
        if not self.token or context.peer().startswith("unix:"):
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED: missing or wrong bearer token")


def rpc(method):
    """Run a servicer method: authenticate, and map any error to a status."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        self.auth.check(context)
        try:
            return method(self, request, context)
        except Exception as e:
            code, message = errors.grpc_status(e)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("RPC failed", extra={"rpc": method.__name__})
            else:
                log.info("RPC refused", extra={"rpc": method.__name__, "code": code.name})
            context.abort(code, message)

    @functools.wraps(method)
    def stream_wrapper(self, request, context):
        self.auth.check(context)
        try:
            yield from method(self, request, context)
        except Exception as e:
            code, message = errors.grpc_status(e)
            context.abort(code, message)

    return stream_wrapper if inspect.isgeneratorfunction(method) else wrapper


def _ts(msg, seconds: float | None) -> None:
    if seconds is not None:
        msg.FromNanoseconds(int(seconds * 1e9))


def job_to_pb(job: Job) -> jobs_pb2.Job:
    p = job.progress
    out = jobs_pb2.Job(
        id=job.id, kind=job.kind, resource=job.resource, state=STATE_TO_PB[job.state],
        progress=jobs_pb2.Progress(phase=p.phase, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                                   rate_bytes_per_second=p.rate, eta_seconds=p.eta, percent=p.percent),
    )
    if job.error:
        out.error.code, out.error.message = job.error.code, job.error.message
    _ts(out.created_at, job.created_at)
    _ts(out.started_at, job.started_at)
    _ts(out.ended_at, job.ended_at)
    if isinstance(job.spec, ChecksumSpec):
        out.checksum.CopyFrom(jobs_pb2.ChecksumSpec(path=job.spec.path, offset=job.spec.offset,
                                                    length=job.spec.length))
    if isinstance(job.result, ChecksumResult):
        r = job.result
        out.checksum_result.CopyFrom(jobs_pb2.ChecksumResult(
            image_digest=r.image_digest, format=r.format, length=r.length, data_bytes=r.data_bytes,
            hole_bytes=r.hole_bytes))
    return out


def spec_from_pb(request: jobs_pb2.SubmitJobRequest) -> tuple[str, object]:
    which = request.WhichOneof("spec")
    if which == "checksum":
        c = request.checksum
        return "checksum", ChecksumSpec(path=c.path, offset=c.offset, length=c.length)
    raise errors.InvalidArgument("spec: missing; set one job spec (e.g. checksum)", field="spec")


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


class HostService(host_pb2_grpc.HostServiceServicer):
    def __init__(self, engine: JobEngine, auth: Auth, bindings: list[BindingStatus], roots: list[str]):
        self.engine = engine
        self.auth = auth
        self.bindings = bindings
        self.roots = roots

    @rpc
    def GetHostInfo(self, request, context):
        return host_pb2.HostInfo(
            version=__version__, hostname=socket.gethostname(),
            max_concurrent_jobs=self.engine.max_concurrent,
            bandwidth_limit_bytes_per_second=self.engine.limiter.rate,
            draining=self.engine.draining,
            bindings=[host_pb2.Binding(module=b.module, debian_package=b.package, ok=b.ok, error=b.error)
                      for b in self.bindings],
            roots=self.roots,
        )
