"""The one typed client of blockferry-agent's gRPC API, used by the
`blockferry` CLI, the demo and the controller: one method per RPC, typed
requests and answers (the generated messages), and a failed call raised as
the BlockferryError the agent raised (its class from the code the agent
sends in the call's trailing metadata; agent.errors.from_grpc)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from agent import errors
from agent.api.v1 import (
    backups_pb2,
    backups_pb2_grpc,
    host_pb2,
    host_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    volumes_pb2,
    volumes_pb2_grpc,
)

DEFAULT_SOCKET = "/run/blockferry/agent.sock"
FINAL_STATES = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
R = TypeVar("R")


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


def open_channel(target: Target) -> grpc.Channel:
    """A channel to an agent: its unix socket, or host:port over TLS."""
    if target.address:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(target.tls_ca),
            private_key=_read(target.tls_key),
            certificate_chain=_read(target.tls_cert),
        )
        return grpc.secure_channel(target.address, creds)
    path = target.socket or os.environ.get("BLOCKFERRY_SOCKET") or DEFAULT_SOCKET
    return grpc.insecure_channel(f"unix:{path}")


class AgentClient:
    """An agent's API. Built from a Target (it opens and owns the channel),
    or on a channel someone else keeps (the controller's, one per agent);
    `where` names the agent in the errors ("host h1"); `timeout` bounds
    every unary call unless a call says otherwise."""

    def __init__(
        self,
        target: Target | None = None,
        *,
        channel: grpc.Channel | None = None,
        token: str = "",
        where: str = "",
        timeout: float | None = None,
    ):
        self._owned = channel is None
        self.channel = channel if channel is not None else open_channel(target or Target())
        token = token or (target.token if target else "") or ""
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.where = where
        self.timeout = timeout
        self._jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self._host = host_pb2_grpc.HostServiceStub(self.channel)
        self._volumes = volumes_pb2_grpc.VolumeServiceStub(self.channel)
        self._backups = backups_pb2_grpc.BackupServiceStub(self.channel)

    def close(self) -> None:
        if self._owned:
            self.channel.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _error(self, e: Any) -> errors.BlockferryError:
        """The error a failed call (a grpc.RpcError that is also a Call) stands for."""
        return errors.from_grpc(e.code(), e.details() or "", e.trailing_metadata(), where=self.where)

    def _call(self, method: Callable[..., Any], request: Message, answer: type[R], timeout: float | None = None) -> R:
        """method(request) as answer (the generated stubs are untyped: the
        answer's type is checked here)."""
        try:
            result = method(request, metadata=self.metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        if not isinstance(result, answer):
            raise TypeError(f"{method} answered {type(result).__name__}, not {answer.__name__}")
        return result

    # ---- jobs ----

    def submit(self, job_id: str, *, timeout: float | None = None, **spec: Any) -> jobs_pb2.Job:
        """submit("id", clone=jobs_pb2.CloneSpec(...)) and the like."""
        return self._call(self._jobs.SubmitJob, jobs_pb2.SubmitJobRequest(job_id=job_id, **spec), jobs_pb2.Job, timeout)

    def submit_checksum(self, job_id: str, path: str, offset: int = 0, length: int = 0) -> jobs_pb2.Job:
        return self.submit(job_id, checksum=jobs_pb2.ChecksumSpec(path=path, offset=offset, length=length))

    def run(self, job_id: str, **spec: Any) -> jobs_pb2.Job:
        """Submit and follow to a final state."""
        last = self.submit(job_id, **spec)
        for last in self.watch(job_id):  # noqa: B007 - the last state is the final one
            pass
        return last

    def get(self, job_id: str, *, timeout: float | None = None) -> jobs_pb2.Job:
        return self._call(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), jobs_pb2.Job, timeout)

    def list(self, states: Iterable[jobs_pb2.JobState] = (), kind: str = "", limit: int = 0) -> list[jobs_pb2.Job]:
        req = jobs_pb2.ListJobsRequest(states=list(states), kind=kind, limit=limit)
        return list(self._call(self._jobs.ListJobs, req, jobs_pb2.ListJobsResponse).jobs)

    def watch(self, job_id: str, *, timeout: float | None = None) -> JobStream:
        """The job on every change of progress or state, from its current
        one to a final state (the stream ends there); cancel() from
        another thread ends it early."""
        call = self._jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=self.metadata, timeout=timeout)
        return JobStream(call, self._error)

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        return self._call(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id), jobs_pb2.Job)

    # ---- host ----

    def host_info(self) -> host_pb2.HostInfo:
        return self._call(self._host.GetHostInfo, host_pb2.GetHostInfoRequest(), host_pb2.HostInfo)

    def host_facts(self) -> host_pb2.HostFacts:
        return self._call(self._host.GetHostFacts, host_pb2.GetHostFactsRequest(), host_pb2.HostFacts)

    def list_vms(self) -> host_pb2.ListVmsResponse:
        return self._call(self._host.ListVms, host_pb2.ListVmsRequest(), host_pb2.ListVmsResponse)

    def list_fc_devices(
        self, request: host_pb2.ListFcDevicesRequest, *, timeout: float | None = None
    ) -> host_pb2.ListFcDevicesResponse:
        return self._call(self._host.ListFcDevices, request, host_pb2.ListFcDevicesResponse, timeout)

    def discover_iscsi(self, request: host_pb2.DiscoverIscsiRequest) -> host_pb2.DiscoverIscsiResponse:
        return self._call(self._host.DiscoverIscsi, request, host_pb2.DiscoverIscsiResponse)

    def discover_s3(self, request: host_pb2.DiscoverS3Request) -> host_pb2.DiscoverS3Response:
        return self._call(self._host.DiscoverS3, request, host_pb2.DiscoverS3Response)

    # ---- pools and volumes ----

    def get_pool_status(self, request: volumes_pb2.PoolRef, *, timeout: float | None = None) -> volumes_pb2.PoolStatus:
        return self._call(self._volumes.GetPoolStatus, request, volumes_pb2.PoolStatus, timeout)

    def attach_pool(self, request: volumes_pb2.AttachPoolRequest) -> volumes_pb2.PoolStatus:
        return self._call(self._volumes.AttachPool, request, volumes_pb2.PoolStatus)

    def detach_pool(self, request: volumes_pb2.DetachPoolRequest) -> volumes_pb2.DetachPoolResponse:
        return self._call(self._volumes.DetachPool, request, volumes_pb2.DetachPoolResponse)

    def create_volume(self, request: volumes_pb2.CreateVolumeRequest) -> volumes_pb2.Volume:
        return self._call(self._volumes.CreateVolume, request, volumes_pb2.Volume)

    def delete_volume(self, request: volumes_pb2.DeleteVolumeRequest) -> volumes_pb2.DeleteVolumeResponse:
        return self._call(self._volumes.DeleteVolume, request, volumes_pb2.DeleteVolumeResponse)

    def get_volume(self, request: volumes_pb2.VolumeRef, *, timeout: float | None = None) -> volumes_pb2.Volume:
        return self._call(self._volumes.GetVolume, request, volumes_pb2.Volume, timeout)

    def list_volumes(self, request: volumes_pb2.ListVolumesRequest) -> volumes_pb2.ListVolumesResponse:
        return self._call(self._volumes.ListVolumes, request, volumes_pb2.ListVolumesResponse)

    def resize_volume(self, request: volumes_pb2.ResizeVolumeRequest) -> volumes_pb2.Volume:
        return self._call(self._volumes.ResizeVolume, request, volumes_pb2.Volume)

    def create_snapshot(self, request: volumes_pb2.CreateSnapshotRequest) -> volumes_pb2.Snapshot:
        return self._call(self._volumes.CreateSnapshot, request, volumes_pb2.Snapshot)

    def create_snapshot_set(self, request: volumes_pb2.CreateSnapshotSetRequest) -> volumes_pb2.SnapshotSet:
        return self._call(self._volumes.CreateSnapshotSet, request, volumes_pb2.SnapshotSet)

    def delete_snapshot(self, request: volumes_pb2.SnapshotRef) -> volumes_pb2.DeleteSnapshotResponse:
        return self._call(self._volumes.DeleteSnapshot, request, volumes_pb2.DeleteSnapshotResponse)

    def rollback_snapshot(self, request: volumes_pb2.SnapshotRef) -> volumes_pb2.Volume:
        return self._call(self._volumes.RollbackSnapshot, request, volumes_pb2.Volume)

    def list_snapshots(self, request: volumes_pb2.VolumeRef) -> volumes_pb2.ListSnapshotsResponse:
        return self._call(self._volumes.ListSnapshots, request, volumes_pb2.ListSnapshotsResponse)

    def get_snapshot_tree(self, request: volumes_pb2.VolumeRef) -> volumes_pb2.SnapshotTree:
        return self._call(self._volumes.GetSnapshotTree, request, volumes_pb2.SnapshotTree)

    def get_extents(self, request: volumes_pb2.GetExtentsRequest) -> volumes_pb2.ExtentList:
        return self._call(self._volumes.GetExtents, request, volumes_pb2.ExtentList)

    def get_changed_extents(self, request: volumes_pb2.GetChangedExtentsRequest) -> volumes_pb2.ExtentList:
        return self._call(self._volumes.GetChangedExtents, request, volumes_pb2.ExtentList)

    # ---- backup points and backups ----

    def list_backup_points(self, request: backups_pb2.ListBackupPointsRequest) -> backups_pb2.ListBackupPointsResponse:
        return self._call(self._backups.ListBackupPoints, request, backups_pb2.ListBackupPointsResponse)

    def export_backup(self, request: backups_pb2.ExportBackupRequest) -> backups_pb2.BackupExport:
        return self._call(self._backups.ExportBackup, request, backups_pb2.BackupExport)

    def unexport_backup(self, export_id: str) -> None:
        self._call(
            self._backups.UnexportBackup,
            backups_pb2.UnexportBackupRequest(export_id=export_id),
            backups_pb2.UnexportBackupResponse,
        )

    def list_exports(self) -> backups_pb2.ListExportsResponse:
        return self._call(self._backups.ListExports, backups_pb2.ListExportsRequest(), backups_pb2.ListExportsResponse)

    def check_backup_point(self, request: backups_pb2.BackupPointRef) -> backups_pb2.BackupPointStatus:
        return self._call(self._backups.CheckBackupPoint, request, backups_pb2.BackupPointStatus)

    def reconnect_backup_point(self, request: backups_pb2.BackupPointRef) -> backups_pb2.BackupPointStatus:
        return self._call(self._backups.ReconnectBackupPoint, request, backups_pb2.BackupPointStatus)

    def attach_backup_point(self, request: backups_pb2.AttachBackupPointRequest) -> backups_pb2.BackupPointStatus:
        return self._call(self._backups.AttachBackupPoint, request, backups_pb2.BackupPointStatus)

    def detach_backup_point(self, request: backups_pb2.BackupPointRef) -> backups_pb2.DetachBackupPointResponse:
        return self._call(self._backups.DetachBackupPoint, request, backups_pb2.DetachBackupPointResponse)

    def list_backups(self, request: backups_pb2.ListBackupsRequest) -> backups_pb2.ListBackupsResponse:
        return self._call(self._backups.ListBackups, request, backups_pb2.ListBackupsResponse)

    def get_backup(self, request: backups_pb2.GetBackupRequest, *, timeout: float | None = None) -> backups_pb2.Backup:
        return self._call(self._backups.GetBackup, request, backups_pb2.Backup, timeout)

    def delete_backup(self, request: backups_pb2.DeleteBackupRequest) -> backups_pb2.DeleteBackupResponse:
        return self._call(self._backups.DeleteBackup, request, backups_pb2.DeleteBackupResponse)

    def lock_backup(self, request: backups_pb2.LockBackupRequest) -> backups_pb2.Backup:
        return self._call(self._backups.LockBackup, request, backups_pb2.Backup)

    def get_repository_stats(self, request: backups_pb2.RepositoryStatsRequest) -> backups_pb2.RepositoryStats:
        return self._call(self._backups.GetRepositoryStats, request, backups_pb2.RepositoryStats)


class JobStream:
    """A WatchJob stream: iterate it for the job's states; cancel() it from
    another thread (its iteration then simply ends)."""

    def __init__(self, call: Any, error: Callable[[Any], errors.BlockferryError]):
        self._call = call
        self._error = error
        self._cancelled = False

    def __iter__(self) -> Iterator[jobs_pb2.Job]:
        try:
            yield from self._call
        except grpc.RpcError as e:
            if self._cancelled:
                return
            raise self._error(e) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


def state_name(state: int) -> str:
    name: str = jobs_pb2.JobState.Name(state)
    return name.removeprefix("JOB_STATE_").lower()
