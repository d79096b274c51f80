"""Backups: in-process helpers around the repository engine, and a helper over an agent's backup jobs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from agent.api.v1 import backups_pb2 as b
from agent.api.v1 import jobs_pb2
from agent.repo.repository import Repository
from agent.repo.restore import restore
from agent.volumes.nbd import NbdClient, QemuNbd
from agent.volumes.qcow2 import Qcow2Pool

from support.agents import BP_UUID
from support.volumes import MiB, Vol, new_id

CS = 1 << 20  # small chunks keep the tests quick


def nid() -> str:
    return str(uuid.uuid4())


def restore_to_qcow2(pool: Qcow2Pool, repo: Repository, m, run_dir) -> tuple[str, str]:
    vol = nid()
    info = pool.create_volume(vol, "restored", m.size)
    with QemuNbd(info.access_path, readonly=False, run_dir=str(run_dir)) as srv, NbdClient(srv.socket) as c:
        written = restore(repo, m, lambda off, data: c.pwrite(data, off))
        c.flush()
    return vol, written


OK = jobs_pb2.JOB_STATE_SUCCEEDED


FINAL = (OK, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)


class Bk(Vol):
    """Backups on the agent's backup point, next to the volume helpers."""

    def __init__(self, agent, client, bp=BP_UUID):
        super().__init__(agent, client)
        self.bp = bp

    def backup(
        self, vol, snap, *, pool=None, full=False, parent="", name="", description="", job_id=None, lock_until=0
    ):
        bid = new_id()
        job = self.c.run(
            job_id or f"backup-{bid}",
            backup=jobs_pb2.BackupSpec(
                backup_point_uuid=self.bp,
                pool_uuid=pool or self.pool,
                volume_uuid=vol,
                snapshot_uuid=snap,
                backup_uuid=bid,
                name=name,
                description=description,
                parent_backup_uuid=parent,
                full=full,
                lock_until=int(lock_until),
            ),
        )
        assert job.state == OK, job.error
        return job.backup_result

    def restore(self, backup_uuid, *, pool=None, name=None):
        vol = new_id()
        job = self.c.run(
            f"restore-{vol}",
            restore=jobs_pb2.RestoreSpec(
                backup_point_uuid=self.bp,
                backup_uuid=backup_uuid,
                pool_uuid=pool or self.pool,
                volume_uuid=vol,
                name=name or f"restored-{vol[:8]}",
            ),
        )
        assert job.state == OK, job.error
        return job.restore_result

    def verify(self, backup_uuid, deep=True):
        return self.c.run(
            f"verify-{new_id()}",
            verify=jobs_pb2.VerifySpec(backup_point_uuid=self.bp, backup_uuid=backup_uuid, deep=deep),
        )

    def gc(self):
        job = self.c.run(f"gc-{new_id()}", gc=jobs_pb2.GcSpec(backup_point_uuid=self.bp))
        assert job.state == OK, job.error
        return job.gc_result

    def list(self, **filters):
        return list(self.c.list_backups(b.ListBackupsRequest(backup_point_uuid=self.bp, **filters)).backups)

    def delete(self, backup_uuid):
        self.c.delete_backup(b.DeleteBackupRequest(backup_point_uuid=self.bp, backup_uuid=backup_uuid))

    def stats(self):
        return self.c.get_repository_stats(b.RepositoryStatsRequest(backup_point_uuid=self.bp))


def bp_files(agent) -> list[Path]:
    return [p for p in (agent.workdir / "bp").rglob("*") if p.is_file()]


def three_generations(bk: Bk):
    """A volume with a full and two incremental backups: [(snapshot, backup, digest)]."""
    vol = bk.create(capacity=24 * MiB, name="src").uuid
    bk.write(vol, {0: os.urandom(3 * MiB), 9 * MiB: os.urandom(MiB), 20 * MiB + 7: b"tail" * 1000})
    out = []
    for gen in range(3):
        if gen:
            bk.write(vol, {MiB + 100: os.urandom(5000), 15 * MiB: os.urandom(4096 * gen)})
        s = bk.snap(vol, f"s{gen}").uuid
        r = bk.backup(vol, s, description=f"generation {gen}")
        assert r.mode == ("full" if gen == 0 else "incremental")
        assert r.image_digest == bk.digest(vol, s)
        out.append((s, r, r.image_digest))
    return vol, out


NFS_POOL = "3c5e0f7a-9d1b-4c2e-8f4a-6b7c8d9e0f1a"


def nfs_section(nfs_server, pool: str = NFS_POOL) -> str:
    return f'[pools.{pool}]\ntype = "nfs"\nip = "127.0.0.1"\nexport = "{nfs_server.export}"\ntimeout = 5.0\n'


class NfsBk(Bk):
    """The volume and backup helpers on the NFS pool."""

    def __init__(self, agent, client, nfs_server, pool: str):
        super().__init__(agent, client)
        self.pool = pool
        self.server_dir = Path(nfs_server.export) / f"pool-{pool}"  # the server's own view
        self.url = f"nfs://127.0.0.1{nfs_server.export}/pool-{pool}"

    def layer(self, vol, snap) -> str:
        return f"{self.url}/snapshot/{vol}/{snap}"
