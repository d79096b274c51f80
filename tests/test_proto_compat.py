"""Proto compatibility: an older agent and a newer controller (or the other
way round) keep talking as long as the wire rules hold. The golden file
pins every message field (number, type, label) and every RPC of the v1 API
as released; a change may only add. And the controller's registry refuses
an agent below its API level with a clear error, which the agent logs.

Regenerate the golden file only when adding (never to hide a change):
    .venv/bin/python tests/test_proto_compat.py --update
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

GOLDEN = Path(__file__).with_name("golden") / "proto-v1.json"


def snapshot() -> dict:
    from agent.api.v1 import backups_pb2, host_pb2, jobs_pb2, registry_pb2, sharedpool_pb2, volumes_pb2

    out: dict = {"messages": {}, "enums": {}, "services": {}}

    def message(d) -> None:
        out["messages"][d.full_name] = {
            f.name: [
                f.number,
                f.type,
                "repeated" if f.is_repeated else "single",
                (f.message_type or f.enum_type).full_name if (f.message_type or f.enum_type) else "",
            ]
            for f in d.fields
        }
        for n in d.nested_types:
            message(n)
        for e in d.enum_types:
            out["enums"][e.full_name] = {v.name: v.number for v in e.values}

    for mod in (backups_pb2, host_pb2, jobs_pb2, registry_pb2, sharedpool_pb2, volumes_pb2):
        fd = mod.DESCRIPTOR
        for d in fd.message_types_by_name.values():
            message(d)
        for e in fd.enum_types_by_name.values():
            out["enums"][e.full_name] = {v.name: v.number for v in e.values}
        for s in fd.services_by_name.values():
            out["services"][s.full_name] = {
                m.name: [m.input_type.full_name, m.output_type.full_name, m.server_streaming] for m in s.methods
            }
    return out


def test_v1_api_only_grows():
    golden, now = json.loads(GOLDEN.read_text()), snapshot()
    broken = []
    for kind in ("messages", "enums", "services"):
        for name, members in golden[kind].items():
            if name not in now[kind]:
                broken.append(f"{kind[:-1]} {name} removed")
                continue
            for member, spec in members.items():
                if member not in now[kind][name]:
                    broken.append(f"{name}.{member} removed (mark its number reserved instead)")
                elif now[kind][name][member] != spec:
                    broken.append(f"{name}.{member} changed: {spec} -> {now[kind][name][member]}")
        for name, members in now[kind].items():  # a new member must not reuse a released number
            if kind != "services" and name in golden[kind]:
                old = {(v[0] if isinstance(v, list) else v) for v in golden[kind][name].values()}
                for member, spec in members.items():
                    if member not in golden[kind][name] and (spec[0] if isinstance(spec, list) else spec) in old:
                        broken.append(f"{name}.{member} reuses a released number")
    assert not broken, "wire-incompatible proto change:\n" + "\n".join(broken)


def test_golden_is_current():
    """Additions are allowed, but must land in the golden file with them (so
    the next change is checked against them too)."""
    assert json.loads(GOLDEN.read_text()) == snapshot(), "run: .venv/bin/python tests/test_proto_compat.py --update"


def test_registry_refuses_an_agent_below_its_api_level_and_the_agent_says_why(make_agent, short_tmp, monkeypatch):
    from sqlalchemy import select

    from agent import API_LEVEL
    from agent.controller import registry
    from agent.controller.config import ControllerConfig
    from agent.controller.db import Database, migrate
    from agent.controller.models import Host

    from support.cephcluster import free_port

    url = f"sqlite:///{short_tmp}/ctl.sqlite3"
    migrate(url)
    db = Database(url)
    port = free_port()
    monkeypatch.setattr(registry, "MIN_AGENT_API_LEVEL", API_LEVEL + 1)
    server = registry.serve(ControllerConfig(grpc_listen=f"127.0.0.1:{port}"), db)
    host = str(uuid.uuid4())
    a = make_agent(f'[controller]\naddress = "127.0.0.1:{port}"\nhost_uuid = "{host}"\nheartbeat_interval = 1.0\n')
    try:
        a.start()
        deadline = time.monotonic() + 20
        while "FAILED_PRECONDITION" not in a.log_text():
            assert time.monotonic() < deadline, a.log_text()
            time.sleep(0.2)
        assert f"needs {API_LEVEL + 1} or newer: upgrade blockferry on this host" in a.log_text()
        with db.session() as s:
            assert s.scalars(select(Host)).all() == []
        monkeypatch.setattr(registry, "MIN_AGENT_API_LEVEL", API_LEVEL)  # the controller's minimum went down
        deadline = time.monotonic() + 30
        while True:
            with db.session() as s:
                h = s.get(Host, host)
            if h is not None:
                break
            assert time.monotonic() < deadline, a.log_text()
            time.sleep(0.3)
        assert json.loads(h.facts_json)["api_level"] == API_LEVEL
        assert a.stop() == 0
    finally:
        server.stop(grace=1)


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
