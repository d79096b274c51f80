"""`python -m build` makes an sdist and a wheel; the wheel carries the
compiled native module and the generated gRPC code, and installs into a
fresh venv with no compiler at hand (CC=false) and runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

from agent import __version__

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_without_build_tools(tmp_path, dist, wheel_venv):
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1 and list(dist.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("agent/_native.") and n.endswith(".so") for n in names)
    for proto in ("jobs", "volumes", "backups", "host", "registry"):
        assert f"agent/api/v1/{proto}_pb2.py" in names and f"agent/api/v1/{proto}_pb2_grpc.py" in names
    assert "agent/controller/migrations/versions/0006_vaults_policies.py" in names
    venv = wheel_venv  # installed with CC=false
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for tool in ("blockferry-agent", "blockferry-controller", "blockferry-restore"):
        out = subprocess.run(
            [str(venv / "bin" / tool), "--version"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        ).stdout
        assert out.strip() == f"{tool} {__version__}"
    check = (
        "import hashlib, agent, agent._native as n; from agent.api.v1 import jobs_pb2; "
        "assert agent.__file__.startswith(%r); "
        "d = n.block_digests('sha256', bytes(range(256)) * 4096, 65536, 1)[0]; print(d.hex())"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", check % str(venv)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    ).stdout.strip()
    block = bytes(range(256)) * 256
    assert out == (hashlib.sha256(block).digest() * 16).hex()
