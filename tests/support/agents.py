"""Real blockferry-agent processes for the tests: their configs and ids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.client import AgentClient, Target

REPO = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    workdir: Path
    config: Path
    socket: Path
    roots: list[Path]
    log: Path
    pool_uuid: str = ""
    pool_root: Path | None = None
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    prefix: list = field(default_factory=list)  # e.g. ["ip", "netns", "exec", NAME]: run it in a namespace

    def start(self, wait: bool = True, extra_env: dict | None = None) -> AgentProcess:
        env = {**os.environ, **self.env, **(extra_env or {})}
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "agent.server", "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),
            env=env,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if self.socket.exists():
                with self.client() as c:
                    try:
                        c.wait_ready(timeout=1)
                        return
                    except Exception:
                        pass
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready:\n{self.log.read_text()}")

    def client(self) -> AgentClient:
        return AgentClient(Target(socket=str(self.socket)))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text()


POOL_UUID = "0eca2be3-056f-4634-a25b-5cf717e067fb"


POOL2_UUID = "f0dc0363-5e70-419a-95ad-2c49c14d70c1"


RBD_POOL_UUID = "ca12d616-73c4-4629-a5c0-a37a8e163c33"


RBD2_POOL_UUID = "5d0c7f0e-6a0b-4c59-8d6e-2f0b8e6c1a11"


BP_UUID = "7a4f2d8e-3b1c-4e5f-9a6b-1c2d3e4f5a6b"


def write_config(workdir: Path, extra: str = "", roots: list[Path] | None = None) -> AgentProcess:
    roots = roots or [workdir / "root"]
    for r in roots:
        r.mkdir(parents=True, exist_ok=True)
    sock = workdir / "agent.sock"
    cfg = workdir / "agent.toml"
    # Short paths keep unix sockets under the 108-byte limit. The pool
    # sections come last so `extra` can still add to [grpc] or [jobs].
    cfg.write_text(
        textwrap.dedent(f"""\
        [pools.{POOL_UUID}]
        path = "{workdir}/pool"
        [pools.{POOL2_UUID}]
        path = "{workdir}/pool2"
        [backup_points.{BP_UUID}]
        path = "{workdir}/bp"
        chunk_size = 1048576
        [agent]
        state_dir = "{workdir}/state"
        run_dir = "{workdir}/run"
        roots = [{", ".join(f'"{r}"' for r in roots)}]
        log_format = "text"
        log_level = "debug"
        [grpc]
        unix_socket = "{sock}"
        """)
        + textwrap.dedent(extra)
    )
    return AgentProcess(
        workdir=workdir,
        config=cfg,
        socket=sock,
        roots=roots,
        log=workdir / "agent.log",
        pool_uuid=POOL_UUID,
        pool_root=workdir / "pool",
    )


def sparse_image(path: Path, size: int, data: dict[int, bytes]) -> bytes:
    """A sparse file with data at given offsets; returns its full content."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, chunk in data.items():
            f.seek(off)
            f.write(chunk)
    return path.read_bytes()
