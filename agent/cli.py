"""blockferry: the command-line client of blockferry-agent."""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import grpc
from google.protobuf import json_format

from agent.api.v1 import jobs_pb2
from agent.client import FINAL_STATES, AgentClient, Target, state_name


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def job_line(job: jobs_pb2.Job) -> str:
    p = job.progress
    parts = [f"{job.id}", job.kind, state_name(job.state), f"{p.percent:5.1f}%",
             f"{human(p.bytes_done)}/{human(p.bytes_total)}"]
    if p.rate_bytes_per_second > 0 and job.state not in FINAL_STATES:
        parts.append(f"{human(p.rate_bytes_per_second)}/s")
    if p.eta_seconds >= 0 and job.state not in FINAL_STATES:
        parts.append(f"ETA {p.eta_seconds:.0f}s")
    if p.phase:
        parts.append(p.phase)
    if job.error.code:
        parts.append(f"[{job.error.code}] {job.error.message}")
    return "  ".join(parts)


def as_json(msg) -> str:
    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), sort_keys=True)


class ProgressView:
    """A live bar on a terminal; plain lines (at most one a second) otherwise."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def show(self, job: jobs_pb2.Job) -> None:
        final = job.state in FINAL_STATES
        if self.tty:
            p = job.progress
            width = 30
            filled = int(width * p.percent / 100)
            bar = "#" * filled + "." * (width - filled)
            rate = f"{human(p.rate_bytes_per_second)}/s" if p.rate_bytes_per_second > 0 else ""
            eta = f"ETA {p.eta_seconds:.0f}s" if p.eta_seconds >= 0 and not final else ""
            line = (f"\r[{bar}] {p.percent:5.1f}%  {human(p.bytes_done)}/{human(p.bytes_total)}  "
                    f"{rate}  {eta}  {p.phase or state_name(job.state)}")
            self.stream.write(line.ljust(100)[:120] + ("\n" if final else ""))
            self.stream.flush()
        elif final or time.monotonic() - self.last >= 1.0:
            self.last = time.monotonic()
            print(job_line(job), file=self.stream, flush=True)


def follow(client: AgentClient, job_id: str, json_out: bool) -> jobs_pb2.Job:
    view = ProgressView()
    job = None
    for job in client.watch(job_id):
        if json_out:
            print(as_json(job), flush=True)
        else:
            view.show(job)
    return job


def exit_code(job: jobs_pb2.Job) -> int:
    return 0 if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else 1


def cmd_checksum(client: AgentClient, args) -> int:
    job_id = args.job_id or f"checksum-{uuid.uuid4()}"
    job = client.submit_checksum(job_id, args.path, args.offset, args.length)
    if not args.wait:
        print(as_json(job) if args.json else job.id)
        return 0
    job = follow(client, job.id, args.json)
    if not args.json:
        if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            r = job.checksum_result
            print(f"{r.image_digest}  {job.checksum.path}")
            print(f"format={r.format} length={r.length} data_bytes={r.data_bytes} hole_bytes={r.hole_bytes}",
                  file=sys.stderr)
        else:
            print(job_line(job), file=sys.stderr)
    return exit_code(job)


STATE_ARG = {state_name(s): s for s in jobs_pb2.JobState.values() if s}


def cmd_jobs(client: AgentClient, args) -> int:
    if args.jobs_cmd == "list":
        jobs = client.list([STATE_ARG[s] for s in args.state or []], args.kind or "", args.limit)
        for job in jobs:
            print(as_json(job) if args.json else job_line(job))
        return 0
    if args.jobs_cmd == "show":
        job = client.get(args.job_id)
        print(as_json(job) if args.json else job_line(job))
        return 0
    if args.jobs_cmd == "watch":
        return exit_code(follow(client, args.job_id, args.json))
    if args.jobs_cmd == "cancel":
        job = client.cancel(args.job_id)
        print(as_json(job) if args.json else job_line(job))
        return 0
    raise AssertionError(args.jobs_cmd)


def cmd_info(client: AgentClient, args) -> int:
    info = client.host_info()
    if args.json:
        print(as_json(info))
    else:
        print(f"blockferry-agent {info.version} on {info.hostname}; max jobs {info.max_concurrent_jobs}; "
              f"bandwidth limit {human(info.bandwidth_limit_bytes_per_second) + '/s' if info.bandwidth_limit_bytes_per_second else 'none'}"
              f"{'; DRAINING' if info.draining else ''}")
        for b in info.bindings:
            print(f"  {b.module}: {'ok' if b.ok else 'MISSING: ' + b.error} ({b.debian_package})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockferry", description="blockferry agent client")
    p.add_argument("--socket", help="agent unix socket (default $BLOCKFERRY_SOCKET or /run/blockferry/agent.sock)")
    p.add_argument("--address", help="host:port of an agent's TLS listener")
    p.add_argument("--tls-ca", help="CA bundle that signed the agent's certificate")
    p.add_argument("--tls-cert", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="client key (mutual TLS)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("checksum", help="image digest of a file or block device (a job)")
    c.add_argument("path")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--length", type=int, default=0, help="bytes; 0 means to the end")
    c.add_argument("--job-id", help="idempotency key (default: a new UUID)")
    c.add_argument("--no-wait", dest="wait", action="store_false", help="print the job id and return")

    j = sub.add_parser("jobs", help="list, show, watch or cancel jobs")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    jl = jsub.add_parser("list")
    jl.add_argument("--state", action="append", choices=sorted(STATE_ARG))
    jl.add_argument("--kind")
    jl.add_argument("--limit", type=int, default=0)
    for name in ("show", "watch", "cancel"):
        jsub.add_parser(name).add_argument("job_id")

    sub.add_parser("info", help="agent version, limits and bindings")

    d = sub.add_parser("demo", help="run the main job on the embedded default (starts its own agent)")
    d.add_argument("--workdir", help="where the demo keeps its pool, state and socket")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "demo":
        from agent.demo import run_demo

        return run_demo(args.workdir)
    import os

    target = Target(socket=args.socket, address=args.address, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, token=os.environ.get("BLOCKFERRY_TOKEN"))
    try:
        with AgentClient(target) as client:
            return {"checksum": cmd_checksum, "jobs": cmd_jobs, "info": cmd_info}[args.cmd](client, args)
    except grpc.RpcError as e:
        print(f"blockferry: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
