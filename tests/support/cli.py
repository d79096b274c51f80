"""The blockferry CLI against a real agent."""

from __future__ import annotations

import subprocess
import sys


def cli(agent, *args, check=True):
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--socket", str(agent.socket), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )
