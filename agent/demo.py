"""The README's main job, on the embedded default.

It starts a private blockferry-controller (SQLite, REST on 127.0.0.1) and a
private blockferry-agent (unix socket, SQLite job journal) that registers
with it. Through the controller's REST API (the seeds' endpoints) it adds a
local directory pool and a local directory backup point, creates a qcow2
volume, writes data as a guest would (through qemu-nbd), snapshots it, takes
a full backup (a task, with progress), changes a little, snapshots again,
shows the changed extents from the dirty bitmaps (agent gRPC), takes an
incremental backup that reads only those, lists the backups, restores both
into new volumes, deep-verifies them (agent jobs), checks every digest
against an independent reading, and stops both daemons with SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

from agent import native
from agent.api.v1 import jobs_pb2
from agent.api.v1 import volumes_pb2 as v
from agent.client import AgentClient, Target
from agent.progress import follow, human

POOL_UUID = "6f1c2b0e-0d7a-4c55-9a38-000000000001"
BP_UUID = "6f1c2b0e-0d7a-4c55-9a38-000000000002"
CAPACITY = 1 << 30
MiB = 1 << 20


def reference_digest(path: str, workdir: str) -> str:
    """Independent check: qemu-img converts to raw, hashlib hashes it (streamed)."""
    import hashlib

    raw = os.path.join(workdir, "reference.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
    outer = hashlib.sha256()
    size = 0
    try:
        with open(raw, "rb") as f:
            while block := f.read(native.IMAGE_BLOCK_SIZE):
                outer.update(hashlib.sha256(block).digest())
                size += len(block)
    finally:
        os.unlink(raw)
    outer.update(size.to_bytes(8, "little"))
    return outer.hexdigest()


def guest_write(path: str, writes: dict[int, bytes], run_dir: str) -> None:
    """Write as a VM would: through a writable qemu-nbd (dirty bitmap on)."""
    from agent.volumes.nbd import NbdClient, QemuNbd

    with QemuNbd(path, readonly=False, run_dir=run_dir) as srv, NbdClient(srv.socket) as c:
        for off, data in writes.items():
            c.pwrite(data, off)
        c.flush()


def step(text: str) -> None:
    print(f"== {text}", flush=True)


class Rest:
    """The controller's REST API with the standard library (the seeds' envelope)."""

    def __init__(self, url: str, token: str):
        self.url = url
        self.token = token

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> dict:
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                envelope = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            envelope = json.loads(e.read() or b"{}")
        if envelope.get("scode") != 0:
            raise RuntimeError(f"{method} {path}: {envelope.get('message')}")
        return envelope["data"]

    def wait_task(self, task_id: str, label: str) -> dict:
        last = -1.0
        while True:
            t = self.call("GET", f"/v1/tasks/{task_id}")
            if t["progress"] != last:
                print(f"   task {task_id[:8]} {label}: {t['status']:<8} {t['progress']:5.1f} %", flush=True)
                last = t["progress"]
            if t["status"] not in ("waiting", "running"):
                return t
            time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MARKER = ".blockferry-demo"
# what the demo of earlier versions left, before it marked its directory
_LEGACY = {"agent.toml", "controller.toml", "controller.sqlite3"}


def fresh_workdir(workdir: str) -> bool:
    """Start every run from nothing: the previous run's inventory, pool and
    backups are removed, but only from a directory the demo made (marked),
    never from someone else's (then say so and stop)."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        names = set(os.listdir(workdir))
        if MARKER not in names and not _LEGACY <= names:
            print(f"!! {workdir} is not empty and was not made by the demo; give --workdir an empty or new directory")
            return False
        step(f"removing the previous demo run in {workdir}")
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, MARKER), "w") as f:
        f.write("made by `blockferry demo`; removed by its next run\n")
    return True


def run_demo(workdir: str | None) -> int:
    import secrets

    workdir = os.path.abspath(workdir or os.path.join(os.path.expanduser("~"), ".local/share/blockferry-demo"))
    if not fresh_workdir(workdir):
        return 2
    run_dir = os.path.join(workdir, "run")
    os.makedirs(run_dir, exist_ok=True)
    sock = os.path.join(workdir, "agent.sock")
    registry = os.path.join(workdir, "controller.sock")
    token, agent_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    port = _free_port()
    host_uuid = str(uuid.uuid4())
    tenant = "8b69bb2f-2a6e-4149-9f43-8d2e2b780df1"
    cluster = "b088822c-1176-4c79-9df7-5fad80c7fd1d"

    def private(path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)

    ctl_conf = os.path.join(workdir, "controller.toml")
    private(
        ctl_conf,
        f'[controller]\nlisten = "127.0.0.1:{port}"\n'
        f'database_url = "sqlite:///{workdir}/controller.sqlite3"\n'
        f'secret_key_file = "{workdir}/controller.key"\ngrpc_listen = "unix:{registry}"\n'
        f'agent_token = "{agent_token}"\nheartbeat_interval = 2\nhost_dead_after = 10\n'
        f'[[tokens]]\ntoken = "{token}"\ntenant = "*"\n',
    )
    conf = os.path.join(workdir, "agent.toml")
    private(
        conf,
        f'[agent]\nstate_dir = "{workdir}/state"\nrun_dir = "{run_dir}"\nroots = ["{workdir}"]\n'
        f'log_format = "text"\n[grpc]\nunix_socket = "{sock}"\n'
        f'[controller]\naddress = "unix:{registry}"\ntoken = "{agent_token}"\n'
        f'host_uuid = "{host_uuid}"\nheartbeat_interval = 2.0\nfence_after = 0\n',
    )
    step(f"blockferry demo in {workdir}")
    controller = subprocess.Popen(
        [sys.executable, "-m", "agent.controller.server", "-c", ctl_conf],
        stdout=open(os.path.join(workdir, "controller.log"), "ab"),
        stderr=subprocess.STDOUT,
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent.server", "-c", conf], stderr=open(os.path.join(workdir, "agent.log"), "ab")
    )
    rest = Rest(f"http://127.0.0.1:{port}", token)
    ok = True
    rc = ctl_rc = 1
    try:
        deadline = time.monotonic() + 60
        while True:  # the controller answers and the agent has registered
            try:
                hosts = rest.call("GET", "/v1/hosts")["list"]
                if any(h["UUID"] == host_uuid and h["State"] == "online" for h in hosts):
                    break
            except (OSError, RuntimeError):
                pass
            if controller.poll() is not None or agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the controller or the agent did not come up (logs in {workdir})")
            time.sleep(0.2)
        step(
            f"controller on http://127.0.0.1:{port} (SQLite {workdir}/controller.sqlite3); agent {host_uuid} registered"
        )
        pool = rest.call(
            "POST",
            "/v1/pool/share/create",
            {
                "cluster_uuid": cluster,
                "pool_name": "demo-pool",
                "pool_type": 4,
                "zone_uuid": cluster,
                "ip": "127.0.0.1",
                "source": os.path.join(workdir, "pool"),
                "limit_host": True,
                "avail_host": [host_uuid],
                "attr": {"overAllocationThreshold": "1.0"},
            },
        )["pool"]
        pid = pool["UUID"]
        step(f"POST /v1/pool/share/create: local directory pool {pid} ({human(pool['Capacity'])}, {pool['Status']})")
        bp = rest.call(
            "POST",
            "/v1/volume/internal/backuppoint/add",
            {
                "cluster_uuid": cluster,
                "tenant": tenant,
                "name": "demo-backups",
                "btype": "local",
                "ip": "127.0.0.1",
                "root_dir": os.path.join(workdir, "backups"),
                "pass_word": "",
            },
        )["uuid"]
        step(f"POST /v1/volume/internal/backuppoint/add: local backup point {bp}")
        vol = rest.call(
            "POST",
            "/v1/volume/share/create",
            {
                "cluster_uuid": cluster,
                "tenant": tenant,
                "pool_uuid": pid,
                "volume_name": "demo-disk",
                "volume_type": "block",
                "capacity": CAPACITY,
                "snap_capacity": 3 * CAPACITY,
            },
        )["volume"]
        vid, head = vol["UUID"], vol["AccessPath"][host_uuid]
        step(f"POST /v1/volume/share/create: qcow2 volume {vid} ({human(vol['Capacity'])}) at {head}")
        ref = {"tenant": tenant, "cluster_uuid": cluster, "volume_uuid": vid}

        first = {off: os.urandom(MiB) for off in range(0, CAPACITY, 16 * MiB)}  # 64 MiB scattered
        guest_write(head, first, run_dir)
        s1 = rest.call("POST", "/v1/volume/share/snapshot/create", dict(ref, snapshot_name="s1"))["snapshot"]
        step(f"wrote {len(first)} MiB as a guest would; POST .../snapshot/create: s1 {s1['UUID']}")

        def backup(snap, label):
            step(f"POST /v1/volume/share/backup/add: {label} backup of {snap['Name']} (a task, with progress)")
            started = rest.call(
                "POST",
                "/v1/volume/share/backup/add",
                {
                    "cluster_uuid": cluster,
                    "volume_uuid": vid,
                    "snapshot_uuid": snap["UUID"],
                    "backup_name": f"demo-{snap['Name']}",
                    "backup_point_uuid": bp,
                    "desc": f"demo {snap['Name']}",
                },
            )
            t = rest.wait_task(started["task_id"], "backup")
            r = t.get("result") or {}
            print(
                f"   {t['status']}: mode {r.get('mode')}, read {r.get('chunks_read', 0)} chunks "
                f"({human(int(r.get('read_bytes', 0)))}), stored {r.get('new_chunks', 0)} new "
                f"({human(int(r.get('stored_bytes', 0)))} after zstd), {r.get('changed_chunks', 0)} changed"
            )
            return started["backup"]["UUID"], t

        b1, t1 = backup(s1, "full")
        change = {off: os.urandom(64 << 10) for off in range(8 * MiB, CAPACITY, 64 * MiB)}
        guest_write(head, change, run_dir)
        s2 = rest.call("POST", "/v1/volume/share/snapshot/create", dict(ref, snapshot_name="s2"))["snapshot"]
        step(f"changed {len(change)} x 64 KiB; snapshot s2 {s2['UUID']}")
        with AgentClient(Target(socket=sock)) as client:
            t0 = time.monotonic()
            changed = client.get_changed_extents(
                v.GetChangedExtentsRequest(
                    pool_uuid=pid, volume_uuid=vid, snapshot_uuid=s2["UUID"], since_snapshot_uuid=s1["UUID"]
                )
            )
            got = [(e.start, e.length) for e in changed.extents]
            want = sorted((off, 64 << 10) for off in change)
            step(
                f"changed extents s1 -> s2 from the dirty bitmaps (agent gRPC, "
                f"{(time.monotonic() - t0) * 1000:.0f} ms): {len(got)} extents, {human(sum(n for _, n in got))}"
            )
            for start, length in got[:4]:
                print(f"   {start:>12}  +{length}")
            print(f"   ... {'exactly what was written' if got == want else 'MISMATCH with what was written'}")
            ok &= got == want
            b2, t2 = backup(s2, "incremental")
            ok &= t1["status"] == t2["status"] == "success"
            ok &= (t1.get("result") or {}).get("mode") == "full" and (t2.get("result") or {}).get(
                "mode"
            ) == "incremental"
            listed = rest.call(
                "GET",
                "/v1/volume/share/backup/list",
                params={"cluster_uuid": cluster, "tenant": tenant, "filter_volume_uuid": vid},
            )
            step(f"GET /v1/volume/share/backup/list: {listed['total_count']} backups")
            for x in listed["list"]:
                print(f"   {x['UUID']}  {x['Status']:<16} {x['Name']}  snapshot={x['SnapshotUUID'][:8]}")

            restored = {}
            for bid, snap in ((b1, s1), (b2, s2)):
                step(f"POST /v1/volume/share/backup/restore: backup {bid} ({snap['Name']}) into a new volume")
                r = rest.call(
                    "POST",
                    "/v1/volume/share/backup/restore",
                    {
                        "backup_uuid": bid,
                        "new_volume_name": f"restored-{snap['Name']}",
                        "new_pool_uuid": pid,
                        "new_volume_tenant": tenant,
                        "cluster_uuid": cluster,
                    },
                )
                t = rest.wait_task(r["task_id"], "restore")
                ok &= t["status"] == "success"
                restored[snap["UUID"]] = (
                    r["volume"]["UUID"],
                    (t.get("result") or {}).get("access_path", ""),
                    (t.get("result") or {}).get("image_digest", ""),
                )

            for bid in (b1, b2):
                step(f"deep verify of backup {bid} (agent job)")
                job_id = f"demo-verify-{bid}"
                client.submit(job_id, verify=jobs_pb2.VerifySpec(backup_point_uuid=bp, backup_uuid=bid, deep=True))
                job = follow(client, job_id, json_out=False)
                ok &= job.state == jobs_pb2.JOB_STATE_SUCCEEDED
                print(
                    f"   {job.verify_result.chunks_checked} chunks, {human(job.verify_result.bytes_checked)} "
                    "checked; image digest recomputed from the chunks matches the manifest"
                )

            def digest(volume, snapshot=""):
                j = client.run(
                    f"demo-sum-{uuid.uuid4()}",
                    checksum=jobs_pb2.ChecksumSpec(pool_uuid=pid, volume_uuid=volume, snapshot_uuid=snapshot),
                )
                return j.checksum_result.image_digest

            for snap in (s1, s2):
                new_vol, path, manifest_digest = restored[snap["UUID"]]
                d_snap = digest(vid, snap["UUID"])
                d_restored = digest(new_vol)
                d_ref = reference_digest(path, workdir)
                match = d_snap == manifest_digest == d_restored == d_ref
                step(
                    f"{snap['Name']}: snapshot {d_snap}\n   backup manifest  {manifest_digest}\n"
                    f"   restored volume  {d_restored}\n   reference (qemu-img convert + hashlib of the restored "
                    f"volume) {d_ref}: {'MATCH' if match else 'MISMATCH'}"
                )
                ok &= match
    except RuntimeError as e:
        print(f"!! {e}")
        ok = False
    finally:
        agent.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = agent.wait(timeout=60)
        step(f"agent drained and exited with {rc} in {time.monotonic() - t0:.1f}s")
        controller.send_signal(signal.SIGTERM)
        ctl_rc = controller.wait(timeout=30)
        step(f"controller exited with {ctl_rc}")
    if not ok:
        print("!! the demo found a mismatch")
    return 0 if ok and rc == 0 and ctl_rc == 0 else 1
