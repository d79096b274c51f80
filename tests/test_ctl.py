"""blockferry-ctl, the controller's CLI, run as an operator would against a
real controller and agent: settings from the environment and a config
file (the token never in argv), tables and --json, a volume, snapshot,
backup and restore followed as tasks, the restored data equal to the
snapshot's, and exit statuses by class."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_vaults import volume_digest

from support.controller import TOKENS, seed_example
from support.volumes import write


def ctl(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "agent.ctl", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**{k: x for k, x in os.environ.items() if not k.startswith("BLOCKFERRY_")}, **env},
    )
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
def test_blockferry_ctl_round_trip(cluster, short_tmp):
    c, a, host = cluster
    cluster_uuid = seed_example("002", "/v1/pool/share/create")["cluster_uuid"]
    tenant = seed_example("001", "/v1/volume/share/create")["tenant"]
    # the settings: URL, cluster and tenant from a config file, the token from the environment
    conf = short_tmp / "ctl.toml"
    conf.write_text(f'url = "{c.url}"\ncluster = "{cluster_uuid}"\ntenant = "{tenant}"\n')
    env = {"BLOCKFERRY_CTL_CONFIG": str(conf), "BLOCKFERRY_CTL_TOKEN": TOKENS["op"]}
    # the operator guide's first steps: a directory pool on the host, a local backup point
    made = json.loads(ctl(env, "--json", "pools", "create", "first", str(a.roots[0] / "ctl"), "--host", host).stdout)
    pool = made["UUID"]
    bp = json.loads(
        ctl(
            env, "--json", "backup-points", "add", "nightly", "local", str(a.roots[0] / "backups"), "--sub-dir", "ctl"
        ).stdout
    )["uuid"]
    hosts = ctl(env, "hosts").stdout
    assert host in hosts and "online" in hosts
    assert pool in ctl(env, "pools").stdout and bp in ctl(env, "backup-points").stdout
    assert cluster_uuid in ctl(env, "zones").stdout
    vol = json.loads(ctl(env, "--json", "volumes", "create", pool, "web", "16M").stdout)
    assert vol["Capacity"] == 16 << 20 and vol["Name"] == "web"
    shown = ctl(env, "volumes", "show", "web").stdout
    assert "16.0 MiB" in shown and vol["UUID"] in shown
    run = short_tmp / "run-ctl"
    run.mkdir()
    write(vol["AccessPath"][host], {0: os.urandom(2 << 20), 9 << 20: os.urandom(4096)}, run)
    ctl(env, "snapshots", "create", "web", "s1")
    snaps = ctl(env, "snapshots", "list", "web").stdout
    assert "s1" in snaps
    want = volume_digest(a, pool, vol["UUID"], [x for x in snaps.split() if len(x) == 36][0])
    # a backup of s1, followed to its end (progress on stderr), then restored into a new volume
    r = ctl(env, "backups", "create", "web", "s1", bp, "--name", "nightly")
    assert "success" in r.stdout and "backup" in r.stderr, (r.stdout, r.stderr)
    listed = ctl(env, "--json", "backups", "list", "--volume", "web").stdout
    (b,) = json.loads(listed)["list"]
    assert (b["Name"], b["Snapshot"], b["Status"]) == ("nightly", "s1", "BackupSucceeded")
    table = ctl(env, "backups", "list").stdout
    assert b["UUID"] in table and "nightly" in table
    done = json.loads(ctl(env, "--json", "backups", "restore", b["UUID"], pool, "web-restored").stdout)
    assert done["status"] == "success" and done["operation_type"] == "restore"
    restored = json.loads(ctl(env, "--json", "volumes", "show", "web-restored").stdout)
    assert volume_digest(a, pool, restored["UUID"]) == want
    tasks = ctl(env, "tasks", "list", "--status", "success").stdout
    assert done["id"] in tasks
    assert "restore" in ctl(env, "tasks", "show", done["id"]).stdout
    # --no-wait: the task id at once; watch follows it
    tid = ctl(env, "--no-wait", "backups", "create", "web", "s1", bp, "--name", "again").stdout.strip()
    assert "success" in ctl(env, "tasks", "watch", tid).stdout
    ctl(env, "volumes", "delete", "web-restored")
    # the demo's change and incremental backup, then verify (deep) and gc, backup point and pool by name
    write(vol["AccessPath"][host], {4 << 20: os.urandom(65536)}, run)
    ctl(env, "snapshots", "create", "web", "s2")
    inc = json.loads(ctl(env, "--json", "backups", "create", "web", "s2", "nightly", "--name", "inc").stdout)
    assert inc["result"]["mode"] == "incremental" and inc["result"]["parent_backup_uuid"], inc["result"]
    assert "success" in ctl(env, "backup-points", "verify", "nightly", "--backup", inc["result"]["backup_uuid"]).stdout
    deep = json.loads(ctl(env, "--json", "backup-points", "verify", "nightly", "--deep").stdout)
    assert deep["status"] == "success" and deep["operation_type"] == "verify", deep
    assert "success" in ctl(env, "backup-points", "gc", "nightly").stdout
    done = json.loads(ctl(env, "--json", "backups", "restore", inc["result"]["backup_uuid"], "first", "web-s2").stdout)
    want2 = volume_digest(
        a, pool, vol["UUID"], json.loads(ctl(env, "--json", "snapshots", "list", "web").stdout)["list"][1]["UUID"]
    )
    assert volume_digest(a, pool, done["result"]["volume_uuid"]) == want2
    # seed 003 from the shell: a policy, a vault of the volume that follows it, a checkpoint now
    made = json.loads(
        ctl(
            env, "--json", "policies", "create", "daily", "--rrule", "FREQ=DAILY;BYHOUR=2;BYMINUTE=0", "--keep", "7"
        ).stdout
    )["policy"]
    assert made["operation_definition"]["max_backups"] == 7
    assert "FREQ=DAILY" in ctl(env, "policies").stdout and "7 newest" in ctl(env, "policies", "show", "daily").stdout
    vault = json.loads(
        ctl(
            env,
            "--json",
            "vaults",
            "create",
            "web-vault",
            "--size",
            "10",
            "--backup-point",
            "nightly",
            "--volume",
            "web",
            "--policy",
            "daily",
        ).stdout
    )["vault"]
    assert vault["policy_id"] == made["id"] and [r["id"] for r in vault["resources"]] == [vol["UUID"]]
    cp = json.loads(ctl(env, "--json", "checkpoints", "create", "web-vault").stdout)["checkpoint"]
    (res,) = cp["vault"]["resources"]
    assert "success" in ctl(env, "tasks", "watch", res["task_id"]).stdout
    shown = ctl(env, "vaults", "show", "web-vault").stdout
    assert "web-vault" in shown and vol["UUID"] in shown
    r = ctl(env, "policies", "delete", "daily", check=False)  # a vault still follows it
    assert r.returncode != 0 and r.stderr.count("blockferry-ctl:") == 1, r.stderr
    ctl(env, "vaults", "dissociate", "web-vault", "daily")
    ctl(env, "policies", "delete", "daily")
    r = ctl(env, "vaults", "delete", "web-vault", check=False)  # it holds a backup
    assert r.returncode != 0 and "Enforcing" in r.stderr, r.stderr
    ctl(env, "vaults", "delete", "web-vault", "--with-backups")
    assert "web-vault" not in ctl(env, "vaults", "list").stdout
    ctl(env, "volumes", "delete", "web-s2")
    # errors by class, the code printed once, never a traceback
    r = ctl(env, "volumes", "show", "nothing-here", check=False)
    assert r.returncode == 3 and r.stderr.count("NOT_FOUND") == 1, r.stderr
    r = ctl(env, "volumes", "create", pool, "web", "lots", check=False)
    assert r.returncode == 2 and "lots" in r.stderr
    r = ctl({"BLOCKFERRY_CTL_CONFIG": str(conf)}, "hosts", check=False)  # no token anywhere
    assert r.returncode == 6 and "BLOCKFERRY_CTL_TOKEN" in r.stderr, r.stderr
    r = ctl({**env, "BLOCKFERRY_CTL_TOKEN": "wrong-token-0123456789"}, "hosts", check=False)
    assert r.returncode == 6 and "UNAUTHENTICATED" in r.stderr, r.stderr
    r = ctl({**env, "BLOCKFERRY_URL": "http://127.0.0.1:9"}, "hosts", check=False)
    assert r.returncode == 5 and "is blockferry-controller running" in r.stderr, r.stderr
    # a token in a file others can read is refused
    leaky = short_tmp / "leaky.toml"
    leaky.write_text(f'url = "{c.url}"\ntoken = "{TOKENS["op"]}"\n')
    leaky.chmod(0o644)
    r = ctl({"BLOCKFERRY_CTL_CONFIG": str(leaky)}, "hosts", check=False)
    assert r.returncode == 4 and "0600" in r.stderr, r.stderr
    leaky.chmod(0o600)
    assert host in ctl({"BLOCKFERRY_CTL_CONFIG": str(leaky)}, "hosts").stdout
    assert ctl(env, "--version").stdout.startswith("blockferry-ctl ")
