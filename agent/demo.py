"""The README's main job, on the embedded default.

It starts a private blockferry-agent (unix socket, SQLite journal, a local
directory as its only root), makes a sparse sample disk image in that
directory, runs a checksum job on it with live progress, checks the digest
against the pure-Python reference, and stops the agent with SIGTERM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

from agent import native
from agent.api.v1 import jobs_pb2
from agent.client import AgentClient, Target

IMAGE_SIZE = 1 << 30
DATA_EVERY = 10  # one 1 MiB run of data in every 10 MiB: 10 % data


def make_sample_image(path: str) -> None:
    rnd = os.urandom(1 << 20)
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for i, off in enumerate(range(0, IMAGE_SIZE, DATA_EVERY << 20)):
            f.seek(off)
            f.write(rnd[i % 7:] + rnd[:i % 7])


def reference_digest(path: str) -> str:
    """Pure-Python image digest, streamed (hashlib only)."""
    import hashlib

    outer = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(native.IMAGE_BLOCK_SIZE):
            outer.update(hashlib.sha256(block).digest())
            size += len(block)
    outer.update(size.to_bytes(8, "little"))
    return outer.hexdigest()


def run_demo(workdir: str | None) -> int:
    from agent.cli import follow

    workdir = os.path.abspath(workdir or os.path.join(os.path.expanduser("~"), ".local/share/blockferry-demo"))
    pool = os.path.join(workdir, "pool")
    os.makedirs(pool, exist_ok=True)
    sock = os.path.join(workdir, "agent.sock")
    conf = os.path.join(workdir, "agent.toml")
    with open(conf, "w") as f:
        f.write(f'[agent]\nstate_dir = "{workdir}/state"\nroots = ["{pool}"]\nlog_format = "text"\n'
                f'[grpc]\nunix_socket = "{sock}"\n')
    print(f"== blockferry demo in {workdir}")
    agent = subprocess.Popen([sys.executable, "-m", "agent.server", "-c", conf],
                             stderr=open(os.path.join(workdir, "agent.log"), "ab"))
    try:
        with AgentClient(Target(socket=sock)) as client:
            client.wait_ready(timeout=30)
            info = client.host_info()
            print(f"== agent {info.version} is up on {sock} (log: {workdir}/agent.log)")

            image = os.path.join(pool, "sample.raw")
            print(f"== making a 1 GiB sparse sample image with 10 % data: {image}")
            make_sample_image(image)

            job_id = f"demo-checksum-{uuid.uuid4()}"
            print(f"== checksum job {job_id}")
            client.submit_checksum(job_id, image)
            job = follow(client, job_id, json_out=False)
            if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
                print(f"!! job ended {job.state}: {job.error.code} {job.error.message}")
                return 1
            r = job.checksum_result
            print(f"   image digest {r.image_digest} ({r.format})")
            print(f"   read {r.data_bytes >> 20} MiB of data, skipped {r.hole_bytes >> 20} MiB of holes")
            ref = reference_digest(image)
            ok = ref == r.image_digest
            print(f"== pure-Python reference digest {ref}: {'MATCH' if ok else 'MISMATCH'}")
            listed = client.list()
            print(f"== the agent's journal holds {len(listed)} job(s)")
            if not ok:
                return 1
    finally:
        agent.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = agent.wait(timeout=60)
        print(f"== agent drained and exited with {rc} in {time.monotonic() - t0:.1f}s")
    return 0 if rc == 0 else 1
