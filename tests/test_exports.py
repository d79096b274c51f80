"""Read-only NBD exports of backups, served by a real agent through
Debian's nbdkit (python plugin) and read with nbdinfo and nbdcopy
(libnbd): block status shows the backup's zero chunks as holes, the
bytes equal the source snapshot's, two readers at once, a damaged chunk
is a read error (never wrong data), and an export ends when unexported,
when its lease ends, and when the agent stops."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from agent.api.v1 import backups_pb2 as b
from agent.errors import NotFound

from support.agents import BP_UUID
from support.backups import Bk
from support.volumes import MiB


def blockferry(agent, *args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def nbd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=check)


def test_backup_export_over_nbd(make_agent, short_tmp):
    a = make_agent().start()
    size = 8 * MiB
    data = {0: os.urandom(MiB), 5 * MiB: os.urandom(2 * MiB)}  # 1 MiB chunks: 0, 5 and 6 hold data
    want = bytearray(size)
    for off, chunk in data.items():
        want[off : off + len(chunk)] = chunk
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=size, name="exported").uuid
        bk.write(vol, data)
        result = bk.backup(vol, bk.snap(vol, "s").uuid)
        started = time.monotonic()
        e = c.export_backup(b.ExportBackupRequest(backup_point_uuid=BP_UUID, backup_uuid=result.backup_uuid))
        first_byte = time.monotonic() - started
        assert e.size == size and e.uri.startswith("nbd+unix:///?socket=") and os.path.exists(e.socket)
        print(f"export ready in {first_byte:.2f} s")
        # block status: the zero chunks are holes that read as zeros
        extents = json.loads(nbd("nbdinfo", "--map", "--json", e.uri).stdout)
        data_ranges = [(x["offset"], x["length"]) for x in extents if not x["type"] & 2]
        assert data_ranges == [(0, MiB), (5 * MiB, 2 * MiB)], extents
        # the bytes, twice at once (two connections)
        outs = [short_tmp / f"copy{i}.raw" for i in range(2)]
        procs = [subprocess.Popen(["nbdcopy", e.uri, str(o)]) for o in outs]
        assert [p.wait(120) for p in procs] == [0, 0]
        for o in outs:
            assert hashlib.sha256(o.read_bytes()).digest() == hashlib.sha256(want).digest()
        assert [x.export_id for x in c.list_exports().exports] == [e.export_id]
        # no secret file stays behind, and unexport ends it
        assert not [f for f in (a.workdir / "run" / "exports").iterdir() if f.suffix == ".json"]
        c.unexport_backup(e.export_id)
        assert not os.path.exists(e.socket) and not c.list_exports().exports
        with pytest.raises(NotFound):
            c.unexport_backup(e.export_id)

        # a damaged chunk: reads of it fail, other chunks still read
        packs = [f for f in (a.workdir / "bp" / "packs").rglob("*") if f.is_file() and f.suffix != ".idx"]
        for pack in packs:
            raw = bytearray(pack.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            pack.write_bytes(raw)
        e = c.export_backup(b.ExportBackupRequest(backup_point_uuid=BP_UUID, backup_uuid=result.backup_uuid))
        r = nbd("nbdcopy", e.uri, str(short_tmp / "broken.raw"), check=False)
        assert r.returncode != 0, "a damaged backup read without an error"
        # the lease ends: the export with it
        short = c.export_backup(
            b.ExportBackupRequest(backup_point_uuid=BP_UUID, backup_uuid=result.backup_uuid, lease_seconds=1)
        )
        deadline = time.monotonic() + 15
        while os.path.exists(short.socket):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [x.export_id for x in c.list_exports().exports] == [e.export_id]
        with pytest.raises(NotFound):
            c.export_backup(b.ExportBackupRequest(backup_point_uuid=BP_UUID, backup_uuid=str(uuid.uuid4())))
        # the same from the host CLI
        out = blockferry(a, "--json", "backups", "export", BP_UUID, result.backup_uuid, "--lease", "600")
        made = json.loads(out)
        assert made["size"] == str(size) and made["uri"].startswith("nbd+unix://")
        assert made["export_id"] in blockferry(a, "backups", "exports")
        assert "ended" in blockferry(a, "backups", "unexport", made["export_id"])
    # the agent stops: so do its exports
    pid_socket = e.socket
    assert a.stop() == 0
    assert not os.path.exists(pid_socket)
    assert not nbd("pgrep", "-f", f"nbdkit.*{os.path.basename(pid_socket)}", check=False).stdout.strip()


def test_export_from_an_encrypted_nfs_backup_point(make_agent, short_tmp, nfs_server):
    """The export reads any backup point type the agent does: here an
    encrypted repository on the real NFS server (libnfs in the plugin)."""
    bp = str(uuid.uuid4())
    sub = f"export-{uuid.uuid4().hex[:8]}"
    a = make_agent(nfs_server.section(bp, sub_dir=sub, extra=f'password = "{uuid.uuid4().hex}"\n'))
    a.config.chmod(0o600)
    a.start()
    data = {MiB: os.urandom(2 * MiB)}
    want = bytearray(4 * MiB)
    want[MiB : 3 * MiB] = data[MiB]
    with a.client() as c:
        bk = Bk(a, c, bp=bp)
        vol = bk.create(capacity=4 * MiB, name="nfs-export").uuid
        bk.write(vol, data)
        result = bk.backup(vol, bk.snap(vol, "s").uuid)
        e = c.export_backup(b.ExportBackupRequest(backup_point_uuid=bp, backup_uuid=result.backup_uuid))
        out = short_tmp / "nfs-export.raw"
        nbd("nbdcopy", e.uri, str(out))
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(want).digest()
        c.unexport_backup(e.export_id)
    assert a.stop() == 0


def test_backup_export_over_rest(cluster, short_tmp):
    """The controller's export task: the export's address on the host whose
    agent reaches the backup point; read there with nbdcopy; ended by
    unexport; bad input named."""
    from test_vaults import make_env

    from support.controller import check_error, check_ok, wait_task
    from support.volumes import write

    c, a, host = cluster
    env = make_env(c, a, host)
    vol = env["vols"][0]
    run = short_tmp / "run-test"
    run.mkdir()
    want = bytearray(vol["Capacity"])
    want[MiB : 3 * MiB] = os.urandom(2 * MiB)
    write(vol["AccessPath"][host], {MiB: bytes(want[MiB : 3 * MiB])}, run)
    ref = {"cluster_uuid": env["cluster"], "volume_uuid": vol["UUID"]}
    with c.client("op") as op:
        snap = check_ok(
            op.post(
                "/v1/volume/share/snapshot/create",
                json={**ref, "tenant": env["tenant"], "desc": "", "snapshot_name": "s1"},
            )
        )["snapshot"]
        started = check_ok(
            op.post(
                "/v1/volume/share/backup/add",
                json={**ref, "backup_name": "b1", "backup_point_uuid": env["bp"], "snapshot_uuid": snap["UUID"]},
            )
        )
        assert wait_task(op, started["task_id"], 120)["status"] == "success"
        backup = started["backup"]["UUID"]
        body = {"cluster_uuid": env["cluster"], "tenant": env["tenant"], "backup_uuid": backup}
        check_error(op.post("/v1/volume/share/backup/export", json={**body, "lease_seconds": 0}), 400, "lease_seconds")
        e = check_ok(op.post("/v1/volume/share/backup/export", json={**body, "lease_seconds": 600}))
        x = e["export"]
        assert (x["host_uuid"], x["size"]) == (host, vol["Capacity"]) and x["uri"].startswith("nbd+unix://")
        task = check_ok(op.get(f"/v1/tasks/{e['task_id']}"))
        assert (task["operation_type"], task["status"], task["result"]["uri"]) == ("export", "success", x["uri"])
        out = short_tmp / "exported.raw"
        nbd("nbdcopy", x["uri"], str(out))
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(want).digest()
        unexport = {"cluster_uuid": env["cluster"], "tenant": env["tenant"], "task_id": e["task_id"]}
        check_ok(op.post("/v1/volume/share/backup/unexport", json=unexport))
        with a.client() as ac:
            assert not ac.list_exports().exports
        check_error(op.post("/v1/volume/share/backup/unexport", json=unexport), 404)
