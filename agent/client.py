"""A small typed client for blockferry-agent, used by the CLI and tests."""
from __future__ import annotations

import os
from dataclasses import dataclass

import grpc

from agent.api.v1 import (backups_pb2_grpc, host_pb2, host_pb2_grpc, jobs_pb2, jobs_pb2_grpc,
                          volumes_pb2_grpc)

DEFAULT_SOCKET = "/run/blockferry/agent.sock"


@dataclass
class Target:
    socket: str | None = None
    address: str | None = None  # host:port, TLS
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    token: str | None = None


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


class AgentClient:
    def __init__(self, target: Target):
        self.target = target
        if target.address:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(target.tls_ca),
                                                 private_key=_read(target.tls_key),
                                                 certificate_chain=_read(target.tls_cert))
            self.channel = grpc.secure_channel(target.address, creds)
        else:
            path = target.socket or os.environ.get("BLOCKFERRY_SOCKET") or DEFAULT_SOCKET
            self.channel = grpc.insecure_channel(f"unix:{path}")
        self.metadata = [("authorization", f"Bearer {target.token}")] if target.token else None
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.host = host_pb2_grpc.HostServiceStub(self.channel)
        self.volumes = volumes_pb2_grpc.VolumeServiceStub(self.channel)
        self.backups = backups_pb2_grpc.BackupServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def submit_checksum(self, job_id: str, path: str, offset: int = 0, length: int = 0) -> jobs_pb2.Job:
        req = jobs_pb2.SubmitJobRequest(job_id=job_id,
                                        checksum=jobs_pb2.ChecksumSpec(path=path, offset=offset, length=length))
        return self.jobs.SubmitJob(req, metadata=self.metadata)

    def submit(self, job_id: str, **spec) -> jobs_pb2.Job:
        """submit("id", clone=jobs_pb2.CloneSpec(...)) and the like."""
        return self.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(job_id=job_id, **spec), metadata=self.metadata)

    def run(self, job_id: str, **spec) -> jobs_pb2.Job:
        """Submit and wait for a final state."""
        self.submit(job_id, **spec)
        job = None
        for job in self.watch(job_id):
            pass
        return job

    def volume_call(self, method: str, request):
        return getattr(self.volumes, method)(request, metadata=self.metadata)

    def backup_call(self, method: str, request):
        return getattr(self.backups, method)(request, metadata=self.metadata)

    def get(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=self.metadata)

    def list(self, states=(), kind: str = "", limit: int = 0) -> list[jobs_pb2.Job]:
        req = jobs_pb2.ListJobsRequest(states=list(states), kind=kind, limit=limit)
        return list(self.jobs.ListJobs(req, metadata=self.metadata).jobs)

    def watch(self, job_id: str):
        return self.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=self.metadata)

    def host_info(self) -> host_pb2.HostInfo:
        return self.host.GetHostInfo(host_pb2.GetHostInfoRequest(), metadata=self.metadata)


FINAL_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_").lower()
