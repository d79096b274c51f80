#!/usr/bin/env python3
"""Dispatch: small jobs through the controller's REST API across 3 agents.

  .venv/bin/python bench/dispatch_bench.py [--jobs 1000] [--dir /var/tmp]

A controller (SQLite) and three agents on this machine (each registered over
the controller's unix-socket registry) share a directory pool with three
qcow2 volumes spread over the agents. Then:
  - --jobs snapshot creates and deletes (half each) through the REST API,
    round robin over the volumes, 8 callers in parallel (never two on one
    volume at once: agents refuse that with RESOURCE_BUSY): the latency of each
    API call (the agent's work included: a qcow2 overlay) and the rate;
  - --jobs/5 linked clones (tasks), 10 a second (below what the agents can
    run, so this measures dispatch, not a queue): the dispatch latency, from
    the API call to the moment the job was submitted to an agent
    (started_at).
  - the REST overhead of a task, side by side with the agent's own job:
    linked clones and incremental backups (1 % of a 1 GiB volume changed,
    4 MiB chunks) run one at a time; a caller posts each task and follows
    it with GET /v1/tasks/{id}?wait=30 on one kept-alive connection, and the time
    it sees the task end, minus the agent job's own run time (its
    started_at to ended_at, from the agent), is the overhead. Targets:
    median overhead <= 20 ms; an incremental backup through REST <= 1.3x
    the agent's own job.
Prints p50, p99 and throughput. Target: p99 dispatch latency < 50 ms.

  --overhead-only   only the REST overhead rows
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(here, "..")]

from agent.api.v1 import jobs_pb2  # noqa: E402
from agent.client import AgentClient, Target  # noqa: E402
from agent.demo import Rest, _free_port, guest_write  # noqa: E402

CLUSTER = "b088822c-1176-4c79-9df7-5fad80c7fd1d"
TENANT = "8b69bb2f-2a6e-4149-9f43-8d2e2b780df1"


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--overhead-only", action="store_true")
    ap.add_argument("--runs", type=int, default=15, help="tasks per REST-overhead row")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bf-dbench-", dir=args.dir)
    procs = []
    try:
        token, agent_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        port = _free_port()
        registry = f"{work}/ctl.sock"

        def private(path, text):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)

        private(
            f"{work}/controller.toml",
            f'[controller]\nlisten = "127.0.0.1:{port}"\n'
            f'database_url = "sqlite:///{work}/controller.sqlite3"\nsecret_key_file = "{work}/controller.key"\n'
            f'grpc_listen = "unix:{registry}"\nagent_token = "{agent_token}"\nheartbeat_interval = 2\n'
            f'host_dead_after = 10\nlog_level = "warning"\n[[tokens]]\ntoken = "{token}"\ntenant = "*"\n',
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent.controller.server", "-c", f"{work}/controller.toml"],
                stdout=open(f"{work}/controller.log", "ab"),
                stderr=subprocess.STDOUT,
            )
        )
        hosts = []
        for i in range(3):
            d = f"{work}/agent{i}"
            os.makedirs(d)
            host = str(uuid.uuid4())
            hosts.append(host)
            private(
                f"{d}/agent.toml",
                f'[agent]\nstate_dir = "{d}/state"\nrun_dir = "{d}/run"\nroots = ["{work}"]\n'
                f'log_level = "warning"\nlog_format = "text"\n[grpc]\nunix_socket = "{d}/agent.sock"\n'
                f'[jobs]\nmax_concurrent = 8\n[controller]\naddress = "unix:{registry}"\n'
                f'token = "{agent_token}"\nhost_uuid = "{host}"\nheartbeat_interval = 2.0\nfence_after = 0\n',
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "agent.server", "-c", f"{d}/agent.toml"], stderr=open(f"{d}/agent.log", "ab")
                )
            )
        rest = Rest(f"http://127.0.0.1:{port}", token)
        deadline = time.monotonic() + 60
        while True:
            try:
                if sum(h["State"] == "online" for h in rest.call("GET", "/v1/hosts")["list"]) == 3:
                    break
            except (OSError, RuntimeError):
                pass
            assert time.monotonic() < deadline, "agents did not register"
            time.sleep(0.2)
        pool = rest.call(
            "POST",
            "/v1/pool/share/create",
            {
                "cluster_uuid": CLUSTER,
                "pool_name": "bench",
                "pool_type": 4,
                "zone_uuid": CLUSTER,
                "ip": "127.0.0.1",
                "source": f"{work}/pool",
                "limit_host": False,
                "attr": {},
            },
        )["pool"]
        vols = [
            rest.call(
                "POST",
                "/v1/volume/share/create",
                {
                    "cluster_uuid": CLUSTER,
                    "tenant": TENANT,
                    "pool_uuid": pool["UUID"],
                    "volume_name": f"v{i}",
                    "volume_type": "block",
                    "capacity": 64 << 20,
                    "snap_capacity": 0,
                },
            )["volume"]["UUID"]
            for i in range(24)
        ]

        if args.overhead_only:
            rest_overhead(rest, work, pool, hosts, args.runs)
            return 0

        def snap_cycle(i):
            ref = {"tenant": TENANT, "cluster_uuid": CLUSTER, "volume_uuid": vols[i % len(vols)]}
            t0 = time.perf_counter()
            s = rest.call("POST", "/v1/volume/share/snapshot/create", dict(ref, snapshot_name=f"s{i}"))["snapshot"]
            t1 = time.perf_counter()
            rest.call(
                "POST", "/v1/volume/share/snapshot/delete", dict(ref, snapshot_uuid=s["UUID"], snapshot_name=f"s{i}")
            )
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1

        n = args.jobs // 2
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(snap_cycle, range(n)))
        elapsed = time.perf_counter() - t0
        lat = [x * 1000 for pair in results for x in pair]
        print(
            f"\n{len(lat)} snapshot creates and deletes over REST, 3 agents, 8 callers: "
            f"{len(lat) / elapsed:.0f} calls/s; latency p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms "
            "(the agent's qcow2 work included)"
        )
        # linked clones as tasks: dispatch latency
        base = {"tenant": TENANT, "cluster_uuid": CLUSTER, "volume_uuid": vols[0]}
        s = rest.call("POST", "/v1/volume/share/snapshot/create", dict(base, snapshot_name="clone-base"))["snapshot"]
        calls = []
        for i in range(max(1, args.jobs // 5)):
            time.sleep(max(0.0, 0.1 - (time.time() - calls[-1][0])) if calls else 0)  # 10/s: under capacity
            t_call = time.time()
            r = rest.call(
                "POST",
                "/v1/volume/share/clone",
                {
                    "cluster_uuid": CLUSTER,
                    "volume_uuid": vols[0],
                    "volume_name": "v0",
                    "clone_dst_pool_uuid": pool["UUID"],
                    "clone_dst_vol_name": f"c{i}",
                    "clone_dst_vol_tenant": TENANT,
                    "snapshot_uuid": s["UUID"],
                    "is_link": True,
                },
            )
            calls.append((t_call, r["task_id"]))
        deadline = time.monotonic() + 600
        while True:
            tasks = rest.call("GET", "/v1/tasks", params={"operation_type": "clone"})["tasks"]
            if all(t["status"] not in ("waiting", "running") for t in tasks) and len(tasks) == len(calls):
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        by_id = {t["id"]: t for t in tasks}
        dispatch = [(by_id[tid]["started_at"] - t_call) * 1000 for t_call, tid in calls]
        ok = sum(by_id[tid]["status"] == "success" for _, tid in calls)
        spread = {by_id[tid]["host_uuid"] for _, tid in calls}
        errors = Counter(
            (by_id[tid]["error_info"] or {}).get("code") for _, tid in calls if by_id[tid]["status"] != "success"
        )
        if errors:
            print(
                "failed clones:",
                dict(errors),
                next(by_id[tid]["error_info"]["message"] for _, tid in calls if by_id[tid]["status"] != "success"),
            )
        print(
            f"{len(calls)} linked clones as tasks on {len(spread)} hosts ({ok} succeeded): dispatch latency "
            f"(API call -> job started on an agent) p50 {pct(dispatch, 50):.1f} ms, "
            f"p99 {pct(dispatch, 99):.1f} ms, max {max(dispatch):.1f} ms (target p99 < 50 ms)"
        )
        rest_overhead(rest, work, pool, hosts, args.runs)
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def rest_overhead(rest: Rest, work: str, pool: dict, hosts: list[str], runs: int) -> None:
    """Tasks one at a time: when the REST caller sees each end, against the
    agent job's own run time."""
    import http.client
    import json
    import statistics

    conn = http.client.HTTPConnection(rest.url.split("//", 1)[1], timeout=60)
    headers = {"Authorization": f"Bearer {rest.token}", "Content-Type": "application/json"}

    def call(method: str, path: str, body: dict | None = None) -> dict:
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        envelope = json.loads(conn.getresponse().read())
        assert envelope["scode"] == 0, envelope
        return envelope["data"]

    def task(task_id: str) -> dict:
        while True:  # each answer comes when the task moved (or after 30 s)
            t = call("GET", f"/v1/tasks/{task_id}?wait=30")
            if t["status"] not in ("waiting", "running"):
                return t

    def agent_job(t: dict):
        sock = f"{work}/agent{hosts.index(t['host_uuid'])}/agent.sock"
        with AgentClient(Target(socket=sock)) as c:
            job = c.get(f"{t['id']}.0")
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        return job

    phases: dict[str, list[float]] = {}

    def timed(method: str, path: str, body: dict) -> tuple[float, float]:
        t0 = time.time()
        r = call(method, path, body)
        t1 = time.time()
        t = task(r["task_id"])
        seen = time.time()
        assert t["status"] == "success", t
        job = agent_job(t)
        created, started, ended = (x.ToNanoseconds() / 1e9 for x in (job.created_at, job.started_at, job.ended_at))
        for name, value in (
            ("REST call", t1 - t0),
            ("placed and submitted", created - t["created_at"]),
            ("agent queue", started - created),
            ("job end seen by the controller", t["ended_at"] - ended),
            ("task end seen by the caller", seen - t["ended_at"]),
        ):
            phases.setdefault(name, []).append(value)
        return seen - t0, ended - started

    vol = rest.call(
        "POST",
        "/v1/volume/share/create",
        {
            "cluster_uuid": CLUSTER,
            "tenant": TENANT,
            "pool_uuid": pool["UUID"],
            "volume_name": "overhead",
            "volume_type": "block",
            "capacity": 1 << 30,
            "snap_capacity": 0,
        },
    )["volume"]
    head = next(iter(vol["AccessPath"].values()))
    run_dir = f"{work}/run-bench"
    os.makedirs(run_dir, exist_ok=True)
    guest_write(head, {i << 20: os.urandom(1 << 20) for i in range(0, 1024, 4)}, run_dir)  # a quarter of the disk
    ref = {"tenant": TENANT, "cluster_uuid": CLUSTER, "volume_uuid": vol["UUID"]}
    bp = rest.call(
        "POST",
        "/v1/volume/internal/backuppoint/add",
        {
            "cluster_uuid": CLUSTER,
            "tenant": TENANT,
            "zone_uuid": CLUSTER,
            "name": "overhead",
            "btype": "local",
            "ip": "127.0.0.1",
            "root_dir": f"{work}/bp",
            "sub_dir": "",
        },
    )["uuid"]
    snap = rest.call("POST", "/v1/volume/share/snapshot/create", dict(ref, snapshot_name="base"))["snapshot"]
    full = rest.call(
        "POST",
        "/v1/volume/share/backup/add",
        {
            "cluster_uuid": CLUSTER,
            "volume_uuid": vol["UUID"],
            "backup_name": "full",
            "backup_point_uuid": bp,
            "snapshot_uuid": snap["UUID"],
        },
    )
    task(full["task_id"])
    rows = {"linked clone": [], "incremental backup (1 % changed)": []}
    for i in range(runs):
        rows["linked clone"].append(
            timed(
                "POST",
                "/v1/volume/share/clone",
                {
                    "cluster_uuid": CLUSTER,
                    "volume_uuid": vol["UUID"],
                    "volume_name": "overhead",
                    "clone_dst_pool_uuid": pool["UUID"],
                    "clone_dst_vol_name": f"oc{i}",
                    "clone_dst_vol_tenant": TENANT,
                    "snapshot_uuid": snap["UUID"],
                    "is_link": True,
                },
            )
        )
        guest_write(head, {(i * 97 % 1000) << 20: os.urandom(10 << 20)}, run_dir)  # 10 MiB: 1 % of the disk
        s = rest.call("POST", "/v1/volume/share/snapshot/create", dict(ref, snapshot_name=f"i{i}"))["snapshot"]
        rows["incremental backup (1 % changed)"].append(
            timed(
                "POST",
                "/v1/volume/share/backup/add",
                {
                    "cluster_uuid": CLUSTER,
                    "volume_uuid": vol["UUID"],
                    "backup_name": f"i{i}",
                    "backup_point_uuid": bp,
                    "snapshot_uuid": s["UUID"],
                },
            )
        )
    print(f"\nREST overhead of a task, {runs} runs each, one at a time (seen through REST vs the agent's job):")
    print(f"{'task':34} {'REST ms':>9} {'agent job ms':>13} {'overhead ms':>12} {'ratio':>6}")
    for name, pairs in rows.items():
        seen = statistics.median(p[0] for p in pairs) * 1000
        job = statistics.median(p[1] for p in pairs) * 1000
        over = statistics.median((p[0] - p[1]) for p in pairs) * 1000
        ratio = statistics.median(p[0] / p[1] for p in pairs)
        print(f"{name:34} {seen:9.1f} {job:13.1f} {over:12.1f} {ratio:5.2f}x")
    print("targets: median overhead <= 20 ms; the incremental backup through REST <= 1.3x the agent's job")
    print(
        "where the overhead goes (medians, ms): "
        + ", ".join(f"{name} {statistics.median(v) * 1000:.1f}" for name, v in phases.items())
    )


if __name__ == "__main__":
    sys.exit(main())
