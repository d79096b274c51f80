"""The shipped unit files pass systemd-analyze verify."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.agents import REPO

UNITS = sorted((REPO / "systemd").glob("*.service"))


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit, tmp_path):
    assert shutil.which("systemd-analyze"), "setup.sh installs the systemd package"
    # ExecStart must exist for verify: point it at this venv's entry point.
    venv = Path(sys.prefix)
    text = unit.read_text().replace("/opt/blockferry/venv", str(venv))
    copy = tmp_path / unit.name
    copy.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_agent_unit_settings():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(REPO / "systemd" / "blockferry-agent.service")
    svc = cp["Service"]
    assert svc["Type"] == "notify"
    assert svc["Restart"] == "on-failure"
    assert svc["WatchdogSec"]
    assert svc["StateDirectory"] == "blockferry" and svc["RuntimeDirectory"] == "blockferry"
    # the stop timeout leaves room for the default drain timeout (30 s)
    assert int(svc["TimeoutStopSec"].rstrip("s")) > 30
    # reload is SIGHUP; a config error (78) or a missing binding (69) is not restarted over and over
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert set(svc["RestartPreventExitStatus"].split()) == {"69", "78"}
    r = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=true",
            "--no-pager",
            str(REPO / "systemd" / "blockferry-agent.service"),
        ],
        capture_output=True,
        text=True,
    )
    line = next(x for x in r.stdout.splitlines() if "Overall exposure level" in x)
    assert float(line.split(":")[1].split()[0]) <= 4.5, line  # 5.4 before the system call filter


def test_controller_unit_is_hardened():
    """Type=notify with a watchdog, a service user, and an exposure score of
    at most 5.0 from systemd-analyze security (offline: no PID 1 needed)."""
    unit = REPO / "systemd" / "blockferry-controller.service"
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(unit)
    svc = cp["Service"]
    assert svc["Type"] == "notify" and svc["WatchdogSec"] and svc["Restart"] == "on-failure"
    assert svc["User"] == "blockferry" and svc["StateDirectory"] == "blockferry-controller"
    assert svc["RestartPreventExitStatus"] == "78"
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True
    )
    line = next(x for x in r.stdout.splitlines() if "Overall exposure level" in x)
    score = float(line.split(":")[1].split()[0])
    assert score <= 5.0, line
    sysusers = (REPO / "systemd" / "blockferry.sysusers").read_text()
    assert "u blockferry " in sysusers


def _unit(name: str):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(REPO / "systemd" / name)
    return cp["Service"]


def test_agent_does_its_work_inside_the_units_sandbox(make_agent):
    """The agent unit's NoNewPrivileges and capability bounding set, applied
    with setpriv, and its SystemCallFilter deny list, applied with
    libseccomp (no systemd as PID 1 here): a qcow2 volume is written
    (through qemu-nbd), snapshotted, backed up and restored, and the data
    checks out; a call the filter denies fails with EPERM."""
    import os

    from agent.api.v1 import jobs_pb2

    from support.backups import Bk
    from support.volumes import MiB

    svc = _unit("blockferry-agent.service")
    assert svc["NoNewPrivileges"] == "yes"
    caps = svc["CapabilityBoundingSet"].split()
    assert caps and "CAP_SYS_MODULE" not in caps and "CAP_NET_ADMIN" not in caps
    bounding = "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    denied = svc["SystemCallFilter"]
    assert denied.startswith("~@") and svc["SystemCallErrorNumber"] == "EPERM"
    a = make_agent()
    helper = [sys.executable, str(REPO / "tests" / "support" / "seccomp_exec.py"), denied[1:], "--"]
    a.prefix = ["setpriv", "--no-new-privs", "--bounding-set", bounding, *helper]
    a.start()
    with a.client() as c:
        bk = Bk(a, c)
        vol = bk.create(capacity=8 * MiB, name="sandboxed").uuid
        bk.write(vol, {0: os.urandom(3 * MiB)})
        snap = bk.snap(vol, "s").uuid
        r = bk.backup(vol, snap)
        restored = bk.restore(r.backup_uuid)
        assert bk.digest(restored.volume_uuid) == bk.digest(vol, snap) == r.image_digest
        assert bk.verify(r.backup_uuid).state == jobs_pb2.JOB_STATE_SUCCEEDED
    status = open(f"/proc/{a.proc.pid}/status").read()
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    # the filter holds: a denied call (settimeofday, of @clock) fails with EPERM under the same helper
    probe = subprocess.run(
        [*helper, sys.executable, "-c", "import time; time.clock_settime(time.CLOCK_REALTIME, time.time())"],
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "Operation not permitted" in probe.stderr, probe.stderr
    assert a.stop() == 0
