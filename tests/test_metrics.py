"""Prometheus metrics of both daemons, scraped over HTTP from real processes:
jobs by kind and state, bytes moved, durations, throughput, backup point
health, tasks, heartbeat age per host; loopback only."""

from __future__ import annotations

import os
import uuid

import pytest

from agent import __version__
from agent.api.v1 import jobs_pb2

from support.agents import BP_UUID
from support.controller import Controller, agent_section, eventually
from support.metrics import promtool_lint, scrape, value
from support.volumes import MiB, Vol, new_id


def test_agent_metrics(make_agent):
    from support.cephcluster import free_port

    port = free_port()
    a = make_agent(f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    with a.client() as c:
        vol = Vol(a, c)
        vid = vol.create(capacity=8 * MiB).uuid
        vol.write(vid, {0: os.urandom(2 * MiB)})
        job = c.run(f"sum-{new_id()}", checksum=jobs_pb2.ChecksumSpec(pool_uuid=vol.pool, volume_uuid=vid))
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        job = c.run(f"sum-{new_id()}", checksum=jobs_pb2.ChecksumSpec(pool_uuid=vol.pool, volume_uuid=vid))
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    m = scrape(port)
    assert value(m, "blockferry_jobs_ended_total", kind="checksum", state="succeeded") == 2
    assert value(m, "blockferry_jobs_ended_total", kind="checksum", state="failed") == 0
    assert value(m, "blockferry_jobs_running", kind="checksum") == 0
    assert value(m, "blockferry_job_duration_seconds_count", kind="checksum") == 2
    assert value(m, "blockferry_job_moved_bytes_total", kind="checksum") >= 4 * MiB
    assert value(m, "blockferry_job_throughput_bytes_per_second", kind="checksum") > 0
    bp = {"backup_point": BP_UUID, "location": str(a.workdir / "bp")}
    assert value(m, "blockferry_agent_backup_point_state", **bp, type="local", state="healthy") == 1
    assert value(m, "blockferry_agent_backup_point_state", **bp, type="local", state="unreachable") == 0
    assert value(m, "blockferry_agent_backup_point_available_bytes", **bp) > 0
    assert value(m, "blockferry_build_info", component="agent", version=__version__) == 1
    assert value(m, "process_resident_memory_bytes") > 0
    assert not [name for name, _ in m if name.endswith("_created")]
    assert promtool_lint(port) == ""  # the conventions, as Prometheus's own linter reads them
    assert a.stop() == 0


def test_metrics_listen_only_on_loopback(make_agent):
    a = make_agent('[metrics]\nlisten = "0.0.0.0:9464"\n')
    with pytest.raises(RuntimeError) as e:
        a.start()
    assert "metrics.listen" in str(e.value) and "loopback" in str(e.value)


def test_controller_metrics(short_tmp, make_agent):
    from support.cephcluster import free_port

    port = free_port()
    c = Controller(short_tmp / "ctl", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    host = str(uuid.uuid4())
    a = make_agent(agent_section(c, host)).start()
    up = {"host": host, "hostname": os.uname().nodename}
    try:
        m = eventually(lambda: scrape(port), lambda m: value(m, "blockferry_host_up", **up) == 1)
        assert value(m, "blockferry_host_heartbeat_age_seconds", **up) < 5
        assert a.stop() == 0
        # host_dead_after = 4 in the tests' controller config
        m = eventually(lambda: scrape(port), lambda m: value(m, "blockferry_host_up", **up) == 0, interval=0.5)
        assert value(m, "blockferry_host_heartbeat_age_seconds", **up) >= 4
    finally:
        c.stop()
