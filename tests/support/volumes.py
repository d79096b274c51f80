"""Volumes through a real agent: a helper over its VolumeService, guest
writes through qemu-nbd, reference digests, and how a failed call went over
the wire."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest

from agent import native
from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.errors import BlockferryError
from agent.volumes.nbd import NbdClient, QemuNbd

from support.agents import POOL_UUID

MiB = 1 << 20


CAP = 64 * MiB


def new_id() -> str:
    return str(uuid.uuid4())


def ref_digest_of(path: str, tmp: Path) -> str:
    """Independent check: qemu-img converts to raw, the pure-Python reference hashes it."""
    raw = tmp / f"ref-{uuid.uuid4().hex}.raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, str(raw)], check=True)
    r = native.RefImageHash()
    r.update(raw.read_bytes())
    raw.unlink()
    return r.digest().hex()


def write(path: str, writes: dict[int, bytes], run_dir: Path, zeros: dict[int, int] | None = None) -> None:
    """Write through a real writable qemu-nbd, as a VM's writes would land."""
    with QemuNbd(path, readonly=False, run_dir=str(run_dir)) as srv:
        with NbdClient(srv.socket) as c:
            for off, data in writes.items():
                c.pwrite(data, off)
            for off, length in (zeros or {}).items():
                c.zero(length, off)
            c.flush()


class Vol:
    """Small helper around the VolumeService for one agent."""

    def __init__(self, agent, client, pool: str = POOL_UUID):
        self.agent = agent
        self.c = client
        self.pool = pool
        self.run_dir = agent.workdir / "testrun"
        self.run_dir.mkdir(exist_ok=True)

    def call(self, method, **kw):
        req_type = {
            "CreateVolume": v.CreateVolumeRequest,
            "DeleteVolume": v.DeleteVolumeRequest,
            "GetVolume": v.VolumeRef,
            "ListVolumes": v.ListVolumesRequest,
            "ResizeVolume": v.ResizeVolumeRequest,
            "CreateSnapshot": v.CreateSnapshotRequest,
            "DeleteSnapshot": v.SnapshotRef,
            "RollbackSnapshot": v.SnapshotRef,
            "ListSnapshots": v.VolumeRef,
            "GetSnapshotTree": v.VolumeRef,
            "GetExtents": v.GetExtentsRequest,
            "GetChangedExtents": v.GetChangedExtentsRequest,
        }[method]
        kw.setdefault("pool_uuid", self.pool)
        return getattr(self.c, re.sub(r"(?<!^)(?=[A-Z])", "_", method).lower())(req_type(**kw))

    def create(self, capacity=CAP, name="vol", **kw):
        vid = kw.pop("volume_uuid", new_id())
        return self.call("CreateVolume", volume_uuid=vid, name=name, capacity=capacity, **kw)

    def snap(self, vol, name):
        return self.call("CreateSnapshot", volume_uuid=vol, snapshot_uuid=new_id(), name=name)

    def head(self, vol, pool=None) -> str:
        return self.call("GetVolume", volume_uuid=vol, pool_uuid=pool or self.pool).access_path

    def layer(self, vol, snap) -> str:
        return str(self.agent.pool_root / f"pool-{POOL_UUID}" / "snapshot" / vol / snap)

    def write(self, vol, writes, zeros=None, pool=None):
        write(self.head(vol, pool), writes, self.run_dir, zeros)

    def digest(self, vol, snap="", pool=None) -> str:
        job = self.c.run(
            f"sum-{new_id()}",
            checksum=jobs_pb2.ChecksumSpec(pool_uuid=pool or self.pool, volume_uuid=vol, snapshot_uuid=snap),
        )
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        return job.checksum_result.image_digest

    def changed(self, vol, snap, since=""):
        r = self.call("GetChangedExtents", volume_uuid=vol, snapshot_uuid=snap, since_snapshot_uuid=since)
        return [(e.start, e.length) for e in r.extents]

    def clone(self, vol, snap, target, name="clone", linked=True, target_pool=None, job_id=None):
        return self.c.run(
            job_id or f"clone-{target}",
            clone=jobs_pb2.CloneSpec(
                pool_uuid=self.pool,
                volume_uuid=vol,
                snapshot_uuid=snap,
                target_pool_uuid=target_pool or self.pool,
                target_volume_uuid=target,
                target_name=name,
                linked=linked,
            ),
        )


class WireError:
    """How a failed agent call went over the wire: its gRPC status (code())
    and details ("CODE: message", as the agent sent them)."""

    def __init__(self, error: BlockferryError):
        self.error = error

    def code(self) -> grpc.StatusCode:
        return self.error.status

    def details(self) -> str:
        return f"{self.error.code}: {self.error.message}"


def rpc_error(fn, *a, **kw) -> WireError:
    with pytest.raises(BlockferryError) as e:
        fn(*a, **kw)
    assert e.value.status is not None, "not an agent's answer"
    return WireError(e.value)
