"""How a job's progress is shown: a live bar on a terminal, plain lines
otherwise, or JSON; shared by the blockferry CLI and the demo."""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from agent.api.v1 import jobs_pb2
from agent.client import FINAL_STATES, AgentClient, state_name


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def job_line(job: jobs_pb2.Job) -> str:
    p = job.progress
    parts = [
        f"{job.id}",
        job.kind,
        state_name(job.state),
        f"{p.percent:5.1f}%",
        f"{human(p.bytes_done)}/{human(p.bytes_total)}",
    ]
    if p.rate_bytes_per_second > 0 and job.state not in FINAL_STATES:
        parts.append(f"{human(p.rate_bytes_per_second)}/s")
    if p.eta_seconds >= 0 and job.state not in FINAL_STATES:
        parts.append(f"ETA {p.eta_seconds:.0f}s")
    if p.phase:
        parts.append(p.phase)
    if job.error.code:
        parts.append(f"[{job.error.code}] {job.error.message}")
    return "  ".join(parts)


def as_json(msg: Message) -> str:
    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), sort_keys=True)


class ProgressView:
    """A live bar on a terminal; plain lines (at most one a second) otherwise."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def show(self, job: jobs_pb2.Job) -> None:
        final = job.state in FINAL_STATES
        if self.tty:
            p = job.progress
            cols = max(20, shutil.get_terminal_size().columns - 1)  # never wrap: the bar fits the terminal
            rate = f"{human(p.rate_bytes_per_second)}/s" if p.rate_bytes_per_second > 0 else ""
            eta = f"ETA {p.eta_seconds:.0f}s" if p.eta_seconds >= 0 and not final else ""
            tail = (
                f" {p.percent:5.1f}%  {human(p.bytes_done)}/{human(p.bytes_total)}  "
                f"{rate}  {eta}  {p.phase or state_name(job.state)}"
            )
            width = max(10, min(30, cols - len(tail) - 2))
            filled = int(width * p.percent / 100)
            line = f"[{'#' * filled}{'.' * (width - filled)}]{tail}"
            self.stream.write("\r" + line[:cols].ljust(cols) + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.monotonic() - self.last >= 1.0:
            self.last = time.monotonic()
            print(job_line(job), file=self.stream, flush=True)


def follow(client: AgentClient, job_id: str, json_out: bool) -> jobs_pb2.Job:
    view = ProgressView()
    last = client.get(job_id)
    for last in client.watch(job_id):
        if json_out:
            print(as_json(last), flush=True)
        else:
            view.show(last)
    return last


def exit_code(job: jobs_pb2.Job) -> int:
    return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1
