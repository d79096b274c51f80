"""A real blockferry-controller for the tests, its tokens, the seeds' examples and REST checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from support.agents import REPO

SEEDS = REPO / "docs" / "seeds"  # a copy of ../shared/seeds: the API contract, kept with the code


TENANT_A = "8b69bb2f-2a6e-4149-9f43-8d2e2b780df1"  # the seed's tenant


TENANT_B = "fa81a25f-7dfa-41aa-8273-eb9e455d4d36"


CLUSTER = "b088822c-1176-4c79-9df7-5fad80c7fd1d"


TOKENS = {
    "op": "operator-token-0123456789",
    TENANT_A: "tenant-a-token-0123456789",
    TENANT_B: "tenant-b-token-0123456789",
}


def seed_example(seed: str, endpoint: str, which: str = "Body") -> dict | str:
    """The request example of an endpoint (Body), its URL or its answer
    (the normal answer's example), straight from the seed file."""
    text = next(SEEDS.glob(f"{seed}_*.txt")).read_text()
    section = text[text.index(endpoint) :]
    if which == "url":
        start = section.index("#### 请求示例")
        block = section[start:].split("```")[1]
        return block.strip()
    if which == "answer":
        start = section.index("#### 正常返回示例")
        return json.loads(section[start:].split("```")[1])
    start = section.index("Body:")
    return json.loads(section[start:].split("```")[1])


AGENT_TOKEN = "agent-token-0123456789abcdef"


def write_controller_config(
    d: Path, port: int, db_url: str | None = None, grpc_port: int = 0, grpc_listen: str = "", extra: str = ""
) -> Path:
    cfg = d / "controller.toml"
    tokens = "".join(
        f'[[tokens]]\ntoken = "{tok}"\ntenant = "{"*" if who == "op" else who}"\n' for who, tok in TOKENS.items()
    )
    cfg.write_text(
        f'[controller]\nlisten = "127.0.0.1:{port}"\n'
        f'database_url = "{db_url or f"sqlite:///{d}/controller.sqlite3"}"\n'
        f'secret_key_file = "{d}/controller.key"\n'
        f'grpc_listen = "{grpc_listen or f"127.0.0.1:{grpc_port}"}"\n'
        f'agent_token = "{AGENT_TOKEN}"\nheartbeat_interval = 1\nhost_dead_after = 4\n{extra}{tokens}'
    )
    cfg.chmod(0o600)
    return cfg


class PortTaken(Exception):
    """The controller could not bind a port picked free a moment before."""


class Controller:
    def __init__(self, workdir: Path, db_url: str | None = None, *, grpc_listen: str = "", extra: str = ""):
        from support.cephcluster import free_port

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{workdir}/controller.sqlite3"
        self.log = workdir / "controller.log"
        # A port picked free can be taken by another process before the
        # controller binds it: pick again (a caller's grpc_listen stays).
        for attempt in range(3):
            self.port, self.grpc_port = free_port(), free_port()
            self.config = write_controller_config(workdir, self.port, db_url, self.grpc_port, grpc_listen, extra)
            try:
                self.start()
                return
            except PortTaken:
                if attempt == 2:
                    raise

    def start(self) -> None:
        """Start it (again: the same config, ports and database)."""
        logged = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.controller.server", "-c", str(self.config)],
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, "rb") as f:
                    f.seek(logged)
                    said = f.read().decode(errors="replace")
                if "address already in use" in said.lower():
                    raise PortTaken(said)
                raise AssertionError(self.log.read_text())
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, who: str = "op") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKENS[who]}"}, timeout=30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def check_ok(r: httpx.Response) -> dict:
    body = r.json()
    assert r.status_code == 200 and body["scode"] == 0, body
    assert set(body) == {"scode", "desc", "message", "message_cn", "messageCn", "stack", "data"}, body
    assert body["stack"] is None and body["messageCn"] == "" and body["message_cn"] == "成功"
    return body["data"]


def check_error(r: httpx.Response, status: int, field: str | None = None) -> dict:
    body = r.json()
    assert r.status_code == status, (r.status_code, body)
    assert body["scode"] != 0 and body["stack"] is None and body["message"] and body["message_cn"], body
    assert body["messageCn"] == body["message_cn"], body
    if field:
        assert field in body["message"] and body["desc"] == field, body
    assert "Traceback" not in r.text
    return body


def wait_task(op, task_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        t = check_ok(op.get(f"/v1/tasks/{task_id}"))
        if t["status"] not in ("waiting", "running"):
            return t
        assert time.monotonic() < deadline, t
        time.sleep(0.2)


def eventually(what, check, timeout: float = 20.0, interval: float = 0.3):
    """what() again and again until check(what()) holds; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if check(got):
            return got
        assert time.monotonic() < deadline, got
        time.sleep(interval)


def wait_registered(op, n: int = 1, timeout: float = 20.0) -> None:
    """Until the controller lists n hosts (registered, online or not)."""
    eventually(lambda: check_ok(op.get("/v1/hosts"))["total_count"], lambda k: k >= n, timeout, 0.2)


def agent_section(c: Controller, host: str, extra: str = "") -> str:
    """The agent config that registers it with controller c as host `host`."""
    return (
        f'[controller]\naddress = "127.0.0.1:{c.grpc_port}"\ntoken = "{AGENT_TOKEN}"\n'
        f'host_uuid = "{host}"\nheartbeat_interval = 1.0\n{extra}'
    )


def hosts_online(op, n: int = 1) -> list[dict]:
    """Wait until the controller sees n hosts, all online."""
    return eventually(
        lambda: check_ok(op.get("/v1/hosts"))["list"], lambda hs: [h["State"] for h in hs] == ["online"] * n
    )


def local_backup_point(op, root: Path, name: str = "nightly", attach: bool = True) -> str:
    """A local backup point (seed 000 add), attached to the online host by
    seed 004's reconnect action (unless not attach); its uuid."""
    body = {
        "cluster_uuid": CLUSTER,
        "tenant": TENANT_A,
        "name": name,
        "btype": "local",
        "ip": "127.0.0.1",
        "root_dir": str(root),
        "sub_dir": "",
        "pass_word": "",
        "env": {},
    }
    bp = check_ok(op.post("/v1/volume/internal/backuppoint/add", json=body))["uuid"]
    if attach:
        reconnect(op, bp)
    return bp


def reconnect(op, bp: str) -> None:
    """Seed 004's reconnectBackupStorage: the backup point re-checked (and
    attached) through an online host."""
    r = op.put(
        f"/zstack/v1/backup-storage/{bp}/actions",
        json={"reconnectBackupStorage": {}},
        headers={"Authorization": f"OAuth {TOKENS['op']}"},
    )
    assert r.status_code == 200, r.text


def dir_pool(op, source: Path, host: str, name: str = "p") -> str:
    """A directory pool (seed 002 create, type 4) served by `host`; its uuid."""
    import uuid

    body = {
        "cluster_uuid": CLUSTER,
        "zone_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"blockferry/zone/default/{CLUSTER}")),
        "pool_name": name,
        "pool_type": 4,
        "ip": "127.0.0.1",
        "port": "",
        "source": str(source),
        "username": "",
        "password": "",
        "limit_host": True,
        "avail_host": [host],
        "avail_tenant": [],
        "attr": {},
    }
    return check_ok(op.post("/v1/pool/share/create", json=body))["pool"]["UUID"]
