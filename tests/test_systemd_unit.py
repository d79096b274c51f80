"""The shipped unit files pass systemd-analyze verify."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

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
