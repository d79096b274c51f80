"""A real blockferry-agent process, over gRPC on a unix socket."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from agent import native
from agent.api.v1 import backups_pb2, jobs_pb2

from support.agents import sparse_image
from support.volumes import rpc_error

MiB = 1 << 20


def ref_digest(content: bytes) -> str:
    r = native.RefImageHash()
    r.update(content)
    return r.digest().hex()


def wait_state(client, job_id, states, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.02)
    raise TimeoutError(f"{job_id} stayed {job.state}")


def test_health_and_reflection(agent):
    with agent.client() as c:
        health = health_pb2_grpc.HealthStub(c.channel)
        for service in ("", "blockferry.agent.v1.JobService", "blockferry.agent.v1.HostService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {
            "blockferry.agent.v1.JobService",
            "blockferry.agent.v1.HostService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        info = c.host_info()
        assert info.version and {b.module for b in info.bindings if b.ok} >= {"agent._native", "rados", "rbd", "nbd"}
    # the socket is not world-accessible
    assert oct(agent.socket.stat().st_mode & 0o777) == "0o660"


def test_checksum_job_matches_reference_and_skips_holes(agent):
    img = agent.roots[0] / "disk.raw"
    content = sparse_image(
        img, 64 * MiB + 12345, {0: os.urandom(MiB), 10 * MiB + 7: b"x" * 100000, 64 * MiB: os.urandom(12345)}
    )
    with agent.client() as c:
        job = c.submit_checksum("sum-1", str(img))
        assert job.kind == "checksum" and job.state in (
            jobs_pb2.JOB_STATE_WAITING,
            jobs_pb2.JOB_STATE_RUNNING,
            jobs_pb2.JOB_STATE_SUCCEEDED,
        )
        events = list(c.watch("sum-1"))
        final = events[-1]
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error
        r = final.checksum_result
        assert r.image_digest == ref_digest(content)
        assert r.format == "bf-image-sha256-v1" and r.length == len(content)
        assert r.hole_bytes > 50 * MiB  # the holes were not read
        assert r.data_bytes + r.hole_bytes == len(content)
        assert final.progress.percent == 100 and final.progress.bytes_done == len(content)
        assert final.started_at.seconds and final.ended_at.seconds

        # a range of the file
        job = c.submit_checksum("sum-range", str(img), offset=10 * MiB, length=MiB)
        final = list(c.watch(job.id))[-1]
        assert final.checksum_result.image_digest == ref_digest(content[10 * MiB : 11 * MiB])


def test_idempotent_submit_and_conflict(agent):
    img = agent.roots[0] / "a.raw"
    sparse_image(img, MiB, {0: b"hello"})
    with agent.client() as c:
        first = c.submit_checksum("same-id", str(img))
        wait_state(c, "same-id", [jobs_pb2.JOB_STATE_SUCCEEDED])
        again = c.submit_checksum("same-id", str(img))
        assert again.id == first.id and again.created_at == first.created_at
        assert again.state == jobs_pb2.JOB_STATE_SUCCEEDED
        e = rpc_error(lambda: c.submit_checksum("same-id", str(img), offset=5))
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "job_id" in e.details()
        assert len([j for j in c.list() if j.id == "same-id"]) == 1


@pytest.mark.parametrize(
    "submit,code,field",
    [
        (dict(job_id="bad/id", path="{root}/f"), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
        (dict(job_id="", path="{root}/f"), grpc.StatusCode.INVALID_ARGUMENT, "job_id"),
        (dict(job_id="j", path="/etc/passwd"), grpc.StatusCode.PERMISSION_DENIED, "path"),
        (dict(job_id="j", path="{root}/../../etc/passwd"), grpc.StatusCode.PERMISSION_DENIED, "path"),
        (dict(job_id="j", path="{root}/link-out"), grpc.StatusCode.PERMISSION_DENIED, "path"),
        (dict(job_id="j", path="relative/f"), grpc.StatusCode.INVALID_ARGUMENT, "path"),
        (dict(job_id="j", path="{root}/missing"), grpc.StatusCode.NOT_FOUND, "path"),
        (dict(job_id="j", path="{root}"), grpc.StatusCode.INVALID_ARGUMENT, "path"),
        (dict(job_id="j", path="{root}/f", offset=-1), grpc.StatusCode.INVALID_ARGUMENT, "offset"),
        (dict(job_id="j", path="{root}/f", length=-5), grpc.StatusCode.INVALID_ARGUMENT, "length"),
        (dict(job_id="j", path="{root}/f", offset=2**63 - 10, length=100), grpc.StatusCode.OUT_OF_RANGE, "length"),
        (dict(job_id="j", path="{root}/f", offset=4097), grpc.StatusCode.OUT_OF_RANGE, "offset"),
        (dict(job_id="j", path="{root}/f", offset=1, length=4096), grpc.StatusCode.OUT_OF_RANGE, "length"),
    ],
)
def test_bad_input_gets_the_right_status_and_names_the_field(agent, submit, code, field):
    root = agent.roots[0]
    (root / "f").write_bytes(b"a" * 4096)
    if not (root / "link-out").exists():
        os.symlink("/etc/passwd", root / "link-out")
    args = {k: (v.format(root=root) if isinstance(v, str) else v) for k, v in submit.items()}
    with agent.client() as c:
        e = rpc_error(lambda: c.submit_checksum(args.pop("job_id"), args.pop("path"), **args))
        assert e.code() == code
        assert field in e.details()
        assert c.list() == []  # nothing was recorded
        assert c.host_info().version  # and the daemon is still up


def test_unknown_job_and_missing_spec(agent):
    with agent.client() as c:
        for call in (c.get, c.cancel, lambda j: list(c.watch(j))):
            e = rpc_error(lambda: call("nope"))
            assert e.code() == grpc.StatusCode.NOT_FOUND and "job_id" in e.details()
        e = rpc_error(lambda: c.submit("x"))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "spec" in e.details()
        e = rpc_error(lambda: c.list(limit=-1))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in e.details()


def slow_agent(make_agent, name="a", extra=""):
    # 8 MiB/s shared limit: a 64 MiB checksum takes ~8 s, long enough to act on.
    return make_agent(f"[jobs]\nbandwidth_limit = {8 * MiB}\n{extra}", name=name)


def test_cancel_running_job(make_agent):
    a = slow_agent(make_agent).start()
    img = a.roots[0] / "big.raw"
    sparse_image(img, 64 * MiB, {0: os.urandom(64 * MiB)})
    with a.client() as c:
        c.submit_checksum("slow", str(img))
        job = wait_state(c, "slow", [jobs_pb2.JOB_STATE_RUNNING])
        while c.get("slow").progress.bytes_done == 0:
            time.sleep(0.05)
        c.cancel("slow")
        job = wait_state(c, "slow", [jobs_pb2.JOB_STATE_CANCELLED], timeout=5)
        assert job.error.code == "CANCELLED"
        assert 0 < job.progress.bytes_done < 64 * MiB
        # cancelling again is harmless
        assert c.cancel("slow").state == jobs_pb2.JOB_STATE_CANCELLED
    assert a.stop() == 0


def test_bandwidth_limit_and_progress_rate(make_agent):
    a = slow_agent(make_agent).start()
    img = a.roots[0] / "r.raw"
    sparse_image(img, 24 * MiB, {0: os.urandom(24 * MiB)})
    with a.client() as c:
        t0 = time.monotonic()
        c.submit_checksum("rate", str(img))
        rates, etas = [], []
        for job in c.watch("rate"):
            if job.state == jobs_pb2.JOB_STATE_RUNNING and job.progress.rate_bytes_per_second:
                rates.append(job.progress.rate_bytes_per_second)
                etas.append(job.progress.eta_seconds)
        elapsed = time.monotonic() - t0
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert elapsed >= 2.0  # 24 MiB at 8 MiB/s with a 2 MiB burst
        assert rates and max(rates) < 16 * MiB and all(e >= 0 for e in etas)
    assert a.stop() == 0


def test_concurrency_limit_makes_jobs_wait(make_agent):
    a = slow_agent(make_agent, extra="max_concurrent = 1\n").start()
    img = a.roots[0] / "c.raw"
    sparse_image(img, 16 * MiB, {0: os.urandom(16 * MiB)})
    with a.client() as c:
        c.submit_checksum("first", str(img))
        c.submit_checksum("second", str(img))
        wait_state(c, "first", [jobs_pb2.JOB_STATE_RUNNING])
        assert c.get("second").state == jobs_pb2.JOB_STATE_WAITING
        waiting = c.list(states=[jobs_pb2.JOB_STATE_WAITING])
        assert [j.id for j in waiting] == ["second"]
        wait_state(c, "second", [jobs_pb2.JOB_STATE_SUCCEEDED], timeout=30)
        first = c.get("first")
        assert first.state == jobs_pb2.JOB_STATE_SUCCEEDED
        second = c.get("second")
        assert second.started_at.ToNanoseconds() >= first.ended_at.ToNanoseconds()
    assert a.stop() == 0


def test_journal_survives_restart(agent):
    img = agent.roots[0] / "j.raw"
    content = sparse_image(img, MiB, {100: b"data"})
    with agent.client() as c:
        c.submit_checksum("kept", str(img))
        wait_state(c, "kept", [jobs_pb2.JOB_STATE_SUCCEEDED])
    assert agent.stop() == 0
    agent.start()
    with agent.client() as c:
        job = c.get("kept")
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert job.checksum_result.image_digest == ref_digest(content)


def test_kill_9_while_running_marks_job_failed(make_agent):
    a = slow_agent(make_agent).start()
    img = a.roots[0] / "k.raw"
    sparse_image(img, 64 * MiB, {0: os.urandom(64 * MiB)})
    with a.client() as c:
        c.submit_checksum("victim", str(img))
        wait_state(c, "victim", [jobs_pb2.JOB_STATE_RUNNING])
        while c.get("victim").progress.bytes_done < 8 * MiB:
            time.sleep(0.05)
        time.sleep(1.5)  # progress reaches the journal at least once a second
    a.proc.kill()
    a.proc.wait()
    a.start()
    with a.client() as c:
        job = c.get("victim")
        assert job.state == jobs_pb2.JOB_STATE_FAILED
        assert job.error.code == "INTERRUPTED" and "while the job was running" in job.error.message
        assert job.progress.bytes_done > 0  # the last progress was journaled
        # the agent takes new work
        c.submit_checksum("after", str(img), length=MiB)
        assert wait_state(c, "after", [jobs_pb2.JOB_STATE_SUCCEEDED]).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert a.stop() == 0


def test_sigterm_drains_refuses_new_jobs_and_requeues_waiting(make_agent):
    a = slow_agent(make_agent, extra="max_concurrent = 1\ndrain_timeout = 1.0\n").start()
    img = a.roots[0] / "d.raw"
    content = sparse_image(img, 32 * MiB, {0: os.urandom(32 * MiB)})
    with a.client() as c:
        c.submit_checksum("running", str(img))
        c.submit_checksum("queued", str(img))
        wait_state(c, "running", [jobs_pb2.JOB_STATE_RUNNING])
        a.proc.send_signal(signal.SIGTERM)
        # while draining: health says NOT_SERVING and new jobs are refused
        health = health_pb2_grpc.HealthStub(c.channel)
        deadline = time.monotonic() + 5
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        e = rpc_error(lambda: c.submit_checksum("late", str(img)))
        assert e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details()
    assert a.proc.wait(timeout=30) == 0
    a.start()
    with a.client() as c:
        running = c.get("running")
        assert running.state == jobs_pb2.JOB_STATE_FAILED and running.error.code == "INTERRUPTED"
        # the job that never started runs after the restart
        queued = wait_state(c, "queued", [jobs_pb2.JOB_STATE_SUCCEEDED], timeout=30)
        assert queued.checksum_result.image_digest == ref_digest(content)
        rpc_error(lambda: c.get("late"))
    assert a.stop() == 0


def test_journal_is_private_and_sqlite(agent):
    db = agent.workdir / "state" / "jobs.sqlite3"
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


def test_sd_notify_ready_after_bind_and_watchdog(make_agent, short_tmp):
    a = make_agent()
    notify_path = short_tmp / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(notify_path))
    s.settimeout(20)
    a.start(wait=False, extra_env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})
    msg = s.recv(4096).decode()
    assert "READY=1" in msg
    # READY came only once the socket accepts calls
    with a.client() as c:
        c.wait_ready(timeout=1)
    pings = 0
    deadline = time.monotonic() + 3
    while pings < 3 and time.monotonic() < deadline:
        if s.recv(4096).decode() == "WATCHDOG=1":
            pings += 1
    assert pings >= 3
    a.proc.send_signal(signal.SIGTERM)
    stopping = ""
    while "STOPPING=1" not in stopping:
        stopping = s.recv(4096).decode()
    assert a.proc.wait(timeout=30) == 0
    s.close()


def test_corrupt_config_is_refused_with_the_field(make_agent):
    a = make_agent()
    base = a.config.read_text()
    cases = [
        ("[jobs]\nmax_concurrent = 'many'\n", "max_concurrent"),
        ("[jobs]\nmax_concurrent = 0\n", "max_concurrent"),
        ("[jobs]\nspeed = 1\n", "speed"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[jobs\n", "not valid TOML"),
        ("tcp_listen = '127.0.0.1:1'\n", "tls_cert"),  # appended to [grpc]
    ]
    for extra, needle in cases:
        a.config.write_text(base + extra)
        r = subprocess.run(
            [sys.executable, "-m", "agent.server", "-c", str(a.config)], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 78, (extra, r.stderr)
        assert needle in r.stderr and str(a.config) in r.stderr


def test_conf_d_merges_in_name_order_and_show_config_masks_secrets(make_agent):
    a = make_agent()
    confd = a.config.with_name("agent.conf.d")
    confd.mkdir()
    (confd / "10-jobs.toml").write_text("[jobs]\nmax_concurrent = 7\nbandwidth_limit = 100\n")
    (confd / "20-more.toml").write_text("[jobs]\nmax_concurrent = 9\n[grpc]\nauth_token = 's3cret-token'\n")
    (confd / "ignored.txt").write_text("[jobs]\nmax_concurrent = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "agent.server", "-c", str(a.config), "--show-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "max_concurrent = 9" in r.stdout and "bandwidth_limit = 100" in r.stdout
    assert "s3cret-token" not in r.stdout and 'auth_token = "********"' in r.stdout
    assert "10-jobs.toml" in r.stdout and "20-more.toml" in r.stdout
    # the running agent uses the merged config, and never logs the secret
    a.start()
    with a.client() as c:
        assert c.host_info().max_concurrent_jobs == 9
    assert a.stop() == 0
    assert "s3cret-token" not in a.log_text()


def test_shipped_default_config_is_complete_and_commented():
    from agent import config

    shipped = (Path(__file__).resolve().parents[1] / "etc" / "blockferry" / "agent.toml").read_text()
    assert shipped == config.render(config.Config(), commented=True, mask_secrets=False)
    assert all(line.startswith("#") or line.startswith("[") or not line for line in shipped.splitlines())


def test_missing_or_wrong_abi_binding_names_the_package(make_agent, short_tmp):
    a = make_agent()
    bad = short_tmp / "badbindings"
    bad.mkdir()
    # A file that is not a loadable extension for this interpreter, as a
    # binding built for another Python ABI would be.
    (bad / "rbd.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF garbage")
    env = {**os.environ, "PYTHONPATH": f"{bad}:{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "agent.server", "-c", str(a.config)], capture_output=True, text=True, env=env, timeout=30
    )
    assert r.returncode == 69
    assert "python3-rbd" in r.stderr and "rbd" in r.stderr


def test_many_concurrent_watchers(agent):
    img = agent.roots[0] / "w.raw"
    sparse_image(img, 8 * MiB, {0: os.urandom(8 * MiB)})
    with agent.client() as c:
        c.submit_checksum("watched", str(img))
        results = []

        def watch():
            results.append(list(c.watch("watched"))[-1].state)

        threads = [threading.Thread(target=watch) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [jobs_pb2.JOB_STATE_SUCCEEDED] * 10


def test_the_error_catalogue_in_the_docs_is_current():
    from agent import errors

    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    assert doc.endswith(errors.markdown_table()), "regenerate docs/errors.md's table (see the page)"


def _rates(c, job_id: str) -> tuple[jobs_pb2.Job, list[float]]:
    """The job to its end, and the rates its progress reported meanwhile."""
    rates = []
    for job in c.watch(job_id):
        if job.state == jobs_pb2.JOB_STATE_RUNNING and job.progress.rate_bytes_per_second:
            rates.append(job.progress.rate_bytes_per_second)
    return job, rates


def test_bandwidth_limits_per_backup_point_and_job_and_reload(make_agent):
    """A backup point's own limit, a job's own limit (a policy's), and a
    SIGHUP that changes the host's limit and a backup point's while the
    agent runs; other changes are named as needing a restart."""
    from support.backups import Bk

    bp2 = str(uuid.uuid4())
    a = make_agent(f'[backup_points.{bp2}]\ntype = "local"\npath = "{{root}}/bp2"\nbandwidth_limit = {4 * MiB}\n')
    a.config.write_text(a.config.read_text().replace("{root}", str(a.workdir)))
    a.start()
    with a.client() as c:
        bk = Bk(a, c, bp=bp2)
        vol = bk.create(capacity=16 * MiB, name="limited").uuid
        bk.write(vol, {0: os.urandom(12 * MiB)})
        snap = bk.snap(vol, "s").uuid
        # the backup point's limit: 4 MiB/s
        bid = str(uuid.uuid4())
        spec = jobs_pb2.BackupSpec(backup_point_uuid=bp2, pool_uuid=bk.pool, volume_uuid=vol, snapshot_uuid=snap)
        spec.backup_uuid, spec.full = bid, True
        c.submit(f"b-{bid}", backup=spec)
        job, rates = _rates(c, f"b-{bid}")
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and rates and max(rates) < 6 * MiB, rates
        # a job's own limit (what a policy sets): 2 MiB/s, below the backup point's
        bid = str(uuid.uuid4())
        spec.backup_uuid, spec.bandwidth_limit = bid, 2 * MiB
        c.submit(f"b-{bid}", backup=spec)
        job, rates = _rates(c, f"b-{bid}")
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and max(rates) < 3 * MiB, rates
        # reload: the host's limit becomes 2 MiB/s, the backup point's is lifted; max_concurrent needs a restart
        # ... and bp2 locks new backups for a day from now on
        text = a.config.read_text().replace(f"bandwidth_limit = {4 * MiB}", "bandwidth_limit = 0\nlock_days = 1")
        a.config.write_text(text + f"[jobs]\nbandwidth_limit = {2 * MiB}\nmax_concurrent = 3\n")
        a.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "config reloaded" not in a.log_text():
            assert time.monotonic() < deadline, a.log_text()[-2000:]
            time.sleep(0.1)
        assert "jobs.max_concurrent" in a.log_text() and "need a restart" in a.log_text()
        img = a.roots[0] / "reload.raw"
        sparse_image(img, 8 * MiB, {0: os.urandom(8 * MiB)})
        c.submit_checksum("after-reload", str(img))
        job, rates = _rates(c, "after-reload")
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and max(rates) < 3 * MiB, rates
        assert "backup_points." not in a.log_text().split("need a restart")[-1].split("\n")[0]
        spec.backup_uuid, spec.full, spec.bandwidth_limit = str(uuid.uuid4()), False, 0  # nothing changed: quick
        job = c.run(f"b-{spec.backup_uuid}", backup=spec)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error
        got = c.get_backup(backups_pb2.GetBackupRequest(backup_point_uuid=bp2, backup_uuid=spec.backup_uuid))
        assert abs(got.locked_until - time.time() - 86400) < 60, got
        # a config that does not load is refused; the running one stays
        a.config.write_text(text + "[jobs]\nbandwidth_limit = -1\n")
        a.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in a.log_text():
            assert time.monotonic() < deadline, a.log_text()[-2000:]
            time.sleep(0.1)
        assert c.get("after-reload").state == jobs_pb2.JOB_STATE_SUCCEEDED  # it still answers
    assert a.stop() == 0
