"""Notifications from a real controller and agent to a real HTTP receiver
and a real SMTP server (aiosmtpd): a backup point down and back up, a
failed task, a volume's backups gone stale and fresh again, a host down;
webhook bodies signed with HMAC-SHA256; a receiver that answers 503 at
first gets the deliveries later (retries with backoff, recorded); no
secret or webhook path in the log or the records."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller as SmtpServer
from sqlalchemy import create_engine, text

from support.controller import (
    CLUSTER,
    TENANT_A,
    Controller,
    agent_section,
    check_ok,
    dir_pool,
    hosts_online,
    local_backup_point,
    wait_task,
)
from support.volumes import write

SECRET = "whsec-" + uuid.uuid4().hex  # the HMAC key
HOOK_PATH = f"/hooks/tok-{uuid.uuid4().hex}"  # a path holding a token: never shown


class Receiver:
    """An HTTP server that records what it is sent; it answers 503 to the
    first `refuse` requests."""

    def __init__(self, refuse: int):
        self.got: list[tuple[dict, bytes]] = []
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.refused < refuse:
                    outer.refused += 1
                    self.send_response(503)
                else:
                    outer.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{HOOK_PATH}"

    def events(self) -> list[str]:
        return [json.loads(b)["event"] for _, b in self.got]

    def wait_for(self, event: str, timeout: float = 40.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for _, b in self.got:
                if json.loads(b)["event"] == event:
                    return json.loads(b)
            assert time.monotonic() < deadline, (event, self.events())
            time.sleep(0.3)


class Mailbox:
    def __init__(self):
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        from email import message_from_bytes, policy

        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content, policy=policy.default)))
        return "250 OK"


def test_webhooks_and_mail_tell_what_happens(short_tmp, make_agent):
    hook = Receiver(refuse=2)  # the first deliveries meet a receiver that is down
    box = Mailbox()
    from support.cephcluster import free_port

    smtp_port = free_port()
    smtp = SmtpServer(box, hostname="127.0.0.1", port=smtp_port)
    smtp.start()
    extra = (
        "notify_interval = 1\nnotify_retry_base = 1\n"
        f'[[webhooks]]\nurl = "{hook.url}"\nsecret = "{SECRET}"\n'
        f'[email]\nsmtp_host = "127.0.0.1"\nsmtp_port = {smtp_port}\nsender = "bf@test.example"\n'
        'to = ["ops@test.example"]\nevents = ["host.down", "task.failed"]\n'
    )
    c = Controller(short_tmp / "ctl", extra=extra)
    host = str(uuid.uuid4())
    a = make_agent(agent_section(c, host)).start()
    op = c.client("op")
    try:
        hosts_online(op)
        # a backup point, attached to the host by a reconnect: healthy (nothing to tell)
        where = a.roots[0] / "nightly"
        bp = local_backup_point(op, where)

        # a volume in a vault with a daily policy: stale when nothing succeeded for two days
        pool = dir_pool(op, a.roots[0] / "pool", host, "p")
        vol_body = {
            "cluster_uuid": CLUSTER,
            "tenant": TENANT_A,
            "pool_uuid": pool,
            "volume_name": "web",
            "volume_type": "block",
            "capacity": 4 << 20,
            "snap_capacity": 1 << 30,
        }
        made = check_ok(op.post("/v1/volume/share/create", json=vol_body))["volume"]
        vol = made["UUID"]
        run = short_tmp / "run-notify"
        run.mkdir()
        write(made["AccessPath"][host], {0: os.urandom(1 << 20)}, run)
        v3 = f"/v3/{TENANT_A}"
        policy = {
            "name": "daily",
            "operation_type": "backup",
            "operation_definition": {"max_backups": 5, "bandwidth_limit": 64 << 20},
            "trigger": {"properties": {"pattern": ["FREQ=DAILY;BYHOUR=2;BYMINUTE=0"]}},
        }
        pid = op.post(f"{v3}/policies", json={"policy": policy}).json()["policy"]["id"]
        vault = {
            "name": "gold",
            "billing": {"object_type": "disk", "protect_type": "backup", "size": 10},
            "resources": [{"id": vol, "type": "OS::Cinder::Volume"}],
            "backup_point_id": bp,
            "backup_policy_id": pid,
        }
        vid = op.post(f"{v3}/vaults", json={"vault": vault}).json()["vault"]["id"]
        time.sleep(2.5)  # the watcher has seen it fresh (a new member of the vault)
        assert "backup.stale" not in hook.events()
        engine = create_engine(c.db_url)  # as if three days passed without a backup
        with engine.begin() as conn:
            conn.execute(text("UPDATE vault_resources SET added_at = added_at - 259200"))
            conn.execute(text("UPDATE vaults SET policy_since = policy_since - 259200"))
        engine.dispose()
        stale = hook.wait_for("backup.stale")
        assert stale["details"]["volume_uuid"] == vol and stale["details"]["allowed_seconds"] == 172800, stale
        cp = op.post(f"{v3}/checkpoints", json={"checkpoint": {"vault_id": vid}}).json()["checkpoint"]
        assert wait_task(op, cp["vault"]["resources"][0]["task_id"])["status"] == "success"
        assert hook.wait_for("backup.fresh")["details"]["volume_uuid"] == vol
        # the policy's bandwidth limit went with the job it made
        engine = create_engine(c.db_url)
        with engine.connect() as conn:
            spec = conn.execute(
                text("SELECT spec_json FROM tasks WHERE id = :t"), {"t": cp["vault"]["resources"][0]["task_id"]}
            ).scalar_one()
        engine.dispose()
        assert json.loads(spec).get("bandwidth_limit") in (64 << 20, str(64 << 20)), spec

        # a pack is damaged on disk: the verify of the backup fails, task.failed tells it
        packs = [f for f in (where / "packs").rglob("*") if f.is_file() and f.suffix != ".idx"]
        pack = max(packs, key=lambda f: f.stat().st_size)
        with open(pack, "r+b") as f:
            f.seek(pack.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xFF]))
        backup = cp["vault"]["resources"][0]["backup_id"]
        verify = {"cluster_uuid": CLUSTER, "uuid": bp, "backup_uuid": backup, "deep": True}
        task = check_ok(op.post("/v1/volume/internal/backuppoint/verify", json=verify))
        assert wait_task(op, task["task_id"])["status"] == "failed"
        failed = hook.wait_for("task.failed")
        assert failed["details"]["task_id"] == task["task_id"]
        assert failed["details"]["error_code"] == "DATA_CORRUPT", failed

        # its disk goes away: backup_point.down (delivered after two 503s, recorded); back: backup_point.up
        aside = where.with_name("nightly-away")
        where.rename(aside)
        down = hook.wait_for("backup_point.down")
        assert down["details"]["backup_point_uuid"] == bp and "held repository" in down["details"]["reason"]
        aside.rename(where)
        assert hook.wait_for("backup_point.up")["details"]["state"] == "healthy"

        # the host goes silent: host.down, by webhook and by mail
        assert a.stop() == 0
        assert hook.wait_for("host.down")["details"]["host_uuid"] == host
        deadline = time.monotonic() + 30
        while not any(m["Subject"].startswith("[blockferry] host ") for _, m in box.messages):
            assert time.monotonic() < deadline, [m["Subject"] for _, m in box.messages]
            time.sleep(0.3)
        subjects = [m["Subject"] for _, m in box.messages]
        assert any("task" in s and "failed" in s for s in subjects), subjects  # it asked for task.failed too
        assert not any("backup point" in s for s in subjects)  # but not for backup points
        to, mail = next((to, m) for to, m in box.messages if m["Subject"].startswith("[blockferry] host "))
        assert to == ["ops@test.example"] and host in mail.get_content() and mail["From"] == "bf@test.example"

        # every body is signed: HMAC-SHA256 of "<timestamp>.<body>" with the secret
        for headers, raw in hook.got:
            want = hmac.new(SECRET.encode(), headers["x-blockferry-timestamp"].encode() + b"." + raw, hashlib.sha256)
            assert headers["x-blockferry-signature"] == "sha256=" + want.hexdigest()
            assert headers["x-blockferry-event"] == json.loads(raw)["event"]
            assert headers["x-blockferry-delivery"] == json.loads(raw)["id"]
        # the deliveries are recorded: the first ones took retries after the 503s; none failed
        records = check_ok(op.get("/v1/notifications"))["list"]
        first = min((n for n in records if n["channel"] == "webhook"), key=lambda n: n["created_at"])
        assert first["status"] == "delivered" and first["attempts"] == 3 and first["last_error"] == ""
        assert not [n for n in records if n["status"] == "failed"], records
        assert {n["target"] for n in records if n["channel"] == "webhook"} == {hook.url.split("/hooks")[0]}
        assert check_ok(op.get("/v1/notifications", params={"event": "host.down"}))["total_count"] == 2
        # no secret, and not the webhook's path, in the records or the log
        log = c.log.read_text()
        shown = json.dumps(records)
        for secret in (SECRET, HOOK_PATH):
            assert secret not in log and secret not in shown
        assert "notification not delivered; retrying" in log
    finally:
        op.close()
        c.stop()
        smtp.stop()
        hook.server.shutdown()
