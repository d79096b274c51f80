"""The blockferry client against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent import native

from support.agents import sparse_image
from support.cli import cli

MiB = 1 << 20


def test_checksum_jobs_and_json(agent):
    img = agent.roots[0] / "cli.raw"
    content = sparse_image(img, 8 * MiB, {0: os.urandom(MiB), 5 * MiB: b"tail"})
    ref = native.RefImageHash()
    ref.update(content)
    r = cli(agent, "checksum", str(img), "--job-id", "cli-1")
    assert r.stdout.split()[0] == ref.digest().hex()
    assert "succeeded" in r.stderr  # plain progress lines when not on a terminal
    shown = json.loads(cli(agent, "--json", "jobs", "show", "cli-1").stdout)
    assert shown["state"] == "JOB_STATE_SUCCEEDED"
    assert shown["checksum_result"]["image_digest"] == ref.digest().hex()
    listed = cli(agent, "jobs", "list", "--state", "succeeded").stdout
    assert "cli-1" in listed
    assert cli(agent, "jobs", "list", "--state", "failed").stdout == ""
    lines = cli(agent, "--json", "jobs", "watch", "cli-1").stdout.splitlines()
    assert json.loads(lines[-1])["state"] == "JOB_STATE_SUCCEEDED"
    info = cli(agent, "info").stdout
    assert "blockferry-agent" in info and "rados: ok" in info


def test_errors_are_clear(agent):
    r = cli(agent, "checksum", "/etc/passwd", check=False)
    assert r.returncode == 2
    assert "PERMISSION_DENIED" in r.stderr and "path" in r.stderr
    r = cli(agent, "jobs", "show", "missing", check=False)
    assert r.returncode == 2 and "NOT_FOUND" in r.stderr


def test_demo_runs_the_main_job(short_tmp):
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--workdir", str(short_tmp / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.count(": MATCH") == 2 and "MISMATCH" not in out
    assert "agent drained and exited with 0" in out and "controller exited with 0" in out
    # it went through the controller's REST API and its tasks
    for step in (
        "POST /v1/pool/share/create",
        "POST /v1/volume/internal/backuppoint/add",
        "POST /v1/volume/share/create",
        "POST /v1/volume/share/backup/add",
        "GET /v1/volume/share/backup/list",
        "POST /v1/volume/share/backup/restore",
    ):
        assert step in out, step
    assert "mode full" in out and "mode incremental" in out and "exactly what was written" in out
    # a second run starts from nothing (the first run's inventory would refuse its pool name)
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--workdir", str(short_tmp / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "removing the previous demo run" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count(": MATCH") == 2
    # a directory the demo did not make is never emptied
    mine = short_tmp / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--workdir", str(mine)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "not made by the demo" in r.stdout, r.stdout + r.stderr
    assert (mine / "keep.txt").read_text() == "precious"
