"""Health that is true, from real processes: a controller records what
each agent's heartbeats say of its pools and backup points; a backup
point whose directory disappears turns unreachable with the reason while
the agent's other objects keep reporting; it comes back healthy; a host
gone silent turns what it reported unknown, naming it. Shown in REST,
blockferry-ctl and the controller's metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from support.agents import BP_UUID, POOL_UUID
from support.controller import (
    CLUSTER,
    TOKENS,
    Controller,
    agent_section,
    check_ok,
    eventually,
    hosts_online,
    local_backup_point,
    reconnect,
)
from support.metrics import scrape, value


def test_heartbeats_carry_true_health(short_tmp, make_agent):
    from support.cephcluster import free_port

    port = free_port()
    c = Controller(short_tmp / "ctl", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    host = str(uuid.uuid4())
    a = make_agent(agent_section(c, host)).start()
    op = c.client("op")
    try:
        hosts_online(op)
        where = a.roots[0] / "nightly"
        bp = local_backup_point(op, where, attach=False)
        labels = {"backup_point": bp, "name": "nightly", "type": "local"}

        def listed() -> dict:
            rows = check_ok(op.get("/v1/volume/internal/backuppoint/list", params={"cluster_uuid": CLUSTER}))["list"]
            return next(x for x in rows if x["UUID"] == bp)

        # no host serves it yet: unknown, and why
        row = listed()
        assert row["Bpstate"] == "unknown" and "no host reports it" in row["Health"]["reason"], row
        # a reconnect attaches it to the host; from then on every heartbeat reports it
        reconnect(op, bp)
        row = eventually(listed, lambda x: x["Bpstate"] == "healthy")
        assert row["Health"]["total_bytes"] > 0 and row["Health"]["hosts"][0]["host_uuid"] == host, row
        m = eventually(
            lambda: scrape(port), lambda m: value(m, "blockferry_backup_point_state", **labels, state="healthy")
        )
        assert value(m, "blockferry_backup_point_state", **labels, state="unknown") == 0
        assert value(m, "blockferry_backup_point_capacity_bytes", backup_point=bp, name="nightly") > 0

        # its disk goes away (the directory moves aside, as an unmount would leave it): that backup point
        # alone turns unreachable, with the reason, and nothing recreates the directory
        aside = where.with_name("nightly-unmounted")
        where.rename(aside)
        row = eventually(listed, lambda x: x["Bpstate"] == "unreachable")
        reason = row["Health"]["reason"]
        assert "held repository" in reason and "mounted" in reason and os.uname().nodename in reason, row
        seen = row["Health"]["seen_at"]
        h = eventually(
            lambda: check_ok(op.get(f"/v1/hosts/{host}")), lambda h: h["LastSeen"] > seen + 1
        )  # still heartbeating
        reports = {x["backup_point_uuid"]: x for x in h["BackupPoints"]}
        assert reports[BP_UUID]["status"] == "healthy" and reports[bp]["status"] == "unreachable", reports
        assert reports[bp]["error_code"] == "TARGET_UNREACHABLE" and "held repository" in reports[bp]["reason"]
        assert {x["pool_uuid"]: x["status"] for x in h["Pools"]}[POOL_UUID] == "healthy"
        assert not where.exists()  # never recreated: a new, empty repository would hide the real one
        m = eventually(
            lambda: scrape(port),
            lambda m: value(m, "blockferry_backup_point_state", **labels, state="unreachable"),
        )
        assert value(m, "blockferry_backup_point_state", **labels, state="healthy") == 0
        # the CLI shows it, with the reason
        env = {
            **{k: x for k, x in os.environ.items() if not k.startswith("BLOCKFERRY_")},
            "BLOCKFERRY_URL": c.url,
            "BLOCKFERRY_CLUSTER": CLUSTER,
            "BLOCKFERRY_CTL_TOKEN": TOKENS["op"],
            "COLUMNS": "400",
        }
        out = subprocess.run(
            [sys.executable, "-m", "agent.ctl", "backup-points"], capture_output=True, text=True, env=env, timeout=60
        ).stdout
        line = next(x for x in out.splitlines() if bp in x)
        assert "unreachable" in line and "held repository" in line, out

        # the disk comes back: healthy again
        aside.rename(where)
        eventually(listed, lambda x: x["Bpstate"] == "healthy")

        # the host goes silent: what it reported turns unknown, naming it
        assert a.stop() == 0
        row = eventually(listed, lambda x: x["Bpstate"] == "unknown", timeout=30)
        assert "silent" in row["Health"]["reason"] and os.uname().nodename in row["Health"]["reason"], row
        m = scrape(port)
        assert value(m, "blockferry_backup_point_state", **labels, state="unknown") == 1
    finally:
        op.close()
        c.stop()
