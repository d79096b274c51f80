"""The blockferry client against a real agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent import native

from support.agents import BP_UUID, POOL_UUID, sparse_image
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
    """Exit statuses by class (docs/errors.md), the code printed once."""
    r = cli(agent, "checksum", "/etc/passwd", check=False)
    assert r.returncode == 6 and r.stderr.count("PATH_NOT_ALLOWED") == 1 and "path" in r.stderr, r.stderr
    r = cli(agent, "jobs", "show", "missing", check=False)
    assert r.returncode == 3 and r.stderr.count("NOT_FOUND") == 1, r.stderr
    r = cli(agent, "volume", "create", POOL_UUID, "x", "12Q", check=False)  # usage: argparse
    assert r.returncode == 2 and "12Q" in r.stderr and "Traceback" not in r.stderr
    r = cli(agent, "volume", "create", POOL_UUID, "dup", "1M")
    r = cli(agent, "volume", "create", POOL_UUID, "dup", "1M", "--uuid", json.loads(r.stdout)["uuid"], check=False)
    assert r.returncode == 4 and "ALREADY_EXISTS" in r.stderr, r.stderr  # conflict
    gone = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.workdir / "nothing.sock"), "info"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 5 and "is blockferry-agent running" in gone.stderr, gone.stderr
    assert "nothing.sock" in gone.stderr and "Traceback" not in gone.stderr


def on_a_terminal(agent, columns: int, *args: str) -> list[str]:
    """What `blockferry ARGS` shows on a pseudo-terminal of that width, as
    the frames a person sees (split at carriage returns and newlines)."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: x for k, x in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.socket), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert p.wait(60) == 0, shown
    return [x.rstrip() for x in re.split(r"[\r\n]+", shown.decode()) if x.strip()]


def test_backup_restore_verify_from_the_shell(agent):
    """An operator's round trip with `blockferry` alone: a volume by name
    (size with a suffix), written; a backup of it as it is, a change, an
    incremental, both listed and shown; a restore into a new volume whose
    checksum (of the volume, by name) equals the backup's image digest;
    verify, the backup point's health and stats; a closed pipe."""
    from support.volumes import write

    run = agent.workdir / "clirun"
    run.mkdir()
    vol = json.loads(cli(agent, "--json", "volume", "create", POOL_UUID, "web-disk", "8M").stdout)
    assert vol["capacity"] == str(8 * MiB) or vol["capacity"] == 8 * MiB
    write(vol["access_path"], {0: os.urandom(MiB), 5 * MiB: os.urandom(4096)}, run)

    def final(out: str) -> dict:
        return json.loads(out.strip().splitlines()[-1])

    first = final(cli(agent, "--json", "backup", BP_UUID, f"{POOL_UUID}:web-disk", "--name", "monday").stdout)
    assert first["state"] == "JOB_STATE_SUCCEEDED" and first["backup_result"]["mode"] == "full", first
    b1 = first["backup_result"]
    write(vol["access_path"], {2 * MiB: os.urandom(MiB)}, run)
    out = cli(agent, "backup", BP_UUID, f"{POOL_UUID}:web-disk", "--name", "tuesday").stdout
    header, row = out.splitlines()
    assert header.split()[:4] == ["backup", "mode", "snapshot", "size"] and "incremental" in row, out
    assert "8.0 MiB" in row  # human units
    b2 = row.split()[0]
    listed = cli(agent, "backups", "list", BP_UUID).stdout.splitlines()
    assert [x.split()[1] for x in listed[1:]] == ["monday", "tuesday"], listed
    as_json = [json.loads(x) for x in cli(agent, "--json", "backups", "list", BP_UUID).stdout.splitlines()]
    assert [x["uuid"] for x in as_json] == [b1["backup_uuid"], b2]
    shown = cli(agent, "backups", "show", BP_UUID, b2).stdout
    assert "incremental" in shown and b2 in shown
    # the snapshot each backup was taken of, by name: its checksum is the backup's image digest
    snap = as_json[1]["snapshot_name"]
    assert cli(agent, "checksum", f"{POOL_UUID}:web-disk@{snap}").stdout.split()[0] == as_json[1]["image_digest"]
    # restore the first backup into a new volume, by the pool's uuid and a name
    restored = cli(agent, "restore", BP_UUID, b1["backup_uuid"], POOL_UUID, "--name", "web-disk-monday").stdout
    assert b1["image_digest"] in restored and "8.0 MiB" in restored, restored
    assert cli(agent, "checksum", f"{POOL_UUID}:web-disk-monday").stdout.split()[0] == b1["image_digest"]
    assert "ok: backup" in cli(agent, "verify", BP_UUID, b2, "--deep").stdout
    points = cli(agent, "backup-point", "list").stdout
    assert BP_UUID in points and "healthy" in points
    assert "healthy" in cli(agent, "backup-point", "check", BP_UUID).stdout
    stats = cli(agent, "backup-point", "stats", BP_UUID).stdout
    assert "backups" in stats and "2" in stats
    # errors by class: an unknown backup (3), an unknown volume name (3)
    r = cli(agent, "backups", "show", BP_UUID, "7a4f2d8e-0000-4e5f-9a6b-1c2d3e4f5a6b", check=False)
    assert r.returncode == 3 and r.stderr.count("NOT_FOUND") == 1, r.stderr
    r = cli(agent, "backup", BP_UUID, f"{POOL_UUID}:no-such-disk", check=False)
    assert r.returncode == 3 and "no-such-disk" in r.stderr, r.stderr
    # on a terminal of 80 columns no line wraps: tables are cut, the progress bar fits
    lines = on_a_terminal(agent, 80, "backups", "list", BP_UUID)
    assert len(lines) == 3 and all(len(x) <= 80 for x in lines), lines
    assert lines[1].endswith("…")  # cut, not wrapped
    frames = on_a_terminal(agent, 80, "backup", BP_UUID, f"{POOL_UUID}:web-disk", "--full")
    assert any(x.startswith("[") and "%" in x for x in frames) and all(len(x) <= 80 for x in frames), frames
    # a reader that went away: no traceback
    p = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.socket), "backups", "list", BP_UUID],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # before it writes a byte
    err = p.stderr.read().decode()
    assert p.wait(60) == 141 and "Traceback" not in err, err


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


def test_man_pages_and_completions_are_generated_from_the_parsers():
    """man/*.1 and completions/* (installed by the wheel) are what the
    parsers say; `completion bash` prints the same script."""
    from agent import manpages

    for path, text in manpages.files().items():
        assert path.read_text() == text, f"{path}: stale; run .venv/bin/python -m agent.manpages"
    for prog, mod in (("blockferry", "agent.cli"), ("blockferry-ctl", "agent.ctl")):
        out = subprocess.run(
            [sys.executable, "-m", mod, "completion", "bash"], capture_output=True, text=True, check=True
        ).stdout
        assert f"-F _shtab_{prog.replace('-', '_')} {prog}" in out
        assert "backup" in out
