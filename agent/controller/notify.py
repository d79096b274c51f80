"""Notifications: the controller tells webhooks and e-mail when a task
fails, a volume's backups go stale (no success within twice its policy's
longest gap between runs), and a backup point or host goes down and comes
back (docs/notifications.md).

Events become rows of `notifications`, one per channel, before anything is
sent: a delivery thread sends what is due, records each attempt, and
retries a failure with doubling backoff until notify_max_attempts. A
watcher thread compares hosts, backup points and backups with what it saw
last (`watch_states`, so a restart tells nothing twice) and emits the
changes. Webhook bodies are signed with HMAC-SHA256 over
"<timestamp>.<body>"; secrets, passwords and URLs' paths never reach the
log, the records or an error message."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import socket
import threading
import time
import uuid as uuidlib
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from urllib.parse import urlsplit

import httpx
from sqlalchemy import func, select

from agent import __version__
from agent.controller.config import ControllerConfig, Email, Webhook
from agent.controller.health import Fleet, host_state
from agent.controller.models import (
    Backup,
    BackupPoint,
    Host,
    Notification,
    Policy,
    Vault,
    VaultResource,
    Volume,
    WatchState,
)
from agent.controller.policy import schedule

log = logging.getLogger("controller.notify")

MAX_BACKOFF = 600.0
DOWN_STATES = ("unreachable", "auth_failed")  # a backup point no host can use


def webhook_key(w: Webhook) -> str:
    """A stable name for a webhook that does not show its URL."""
    return "webhook:" + hashlib.sha256(w.url.encode()).hexdigest()[:16]


def shown(url: str) -> str:
    """A URL as records and logs may show it: scheme and host only (a path
    or query may hold a token)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}{':' + str(u.port) if u.port else ''}"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Blockferry-Signature value: sha256=<hex HMAC of "<timestamp>.<body>">."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def longest_gap(patterns: list[str], start: float, now: float) -> float:
    """The longest time between two runs of a schedule over the last four
    weeks (a weekday schedule's weekend, not its usual day)."""
    rs = schedule(patterns, datetime.fromtimestamp(start, UTC))
    until = datetime.fromtimestamp(now, UTC)
    runs = rs.between(until - timedelta(weeks=4), until + timedelta(days=8), inc=True)
    gaps = [(b - a).total_seconds() for a, b in zip(runs, runs[1:], strict=False)]
    return max(gaps) if gaps else 28 * 86400.0


class Notifier:
    def __init__(self, cfg: ControllerConfig, db):
        self.cfg, self.db = cfg, db
        self._webhooks = {webhook_key(w): w for w in cfg.webhooks}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(timeout=10.0, follow_redirects=False)

    @property
    def enabled(self) -> bool:
        return bool(self._webhooks or self.cfg.email)

    def start(self) -> Notifier:
        if self.enabled:
            for target, name in ((self._deliver_loop, "notify-deliver"), (self._watch_loop, "notify-watch")):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(15)
        self._http.close()

    # ---- events ----

    def emit(self, event: str, subject: str, details: dict) -> None:
        """Record one delivery per channel that wants the event; the
        delivery thread sends it."""
        channels = [(k, shown(w.url)) for k, w in self._webhooks.items() if event in w.events]
        if self.cfg.email and event in self.cfg.email.events:
            channels.append(("email", ", ".join(self.cfg.email.to)))
        if not channels:
            return
        now = time.time()
        with self.db.session() as s:
            for channel, target in channels:
                nid = str(uuidlib.uuid4())
                payload = {
                    "id": nid,
                    "event": event,
                    "subject": subject,
                    "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                    "controller": socket.gethostname(),
                    "version": __version__,
                    "details": details,
                }
                s.add(
                    Notification(
                        id=nid,
                        event=event,
                        subject=subject[:256],
                        payload_json=json.dumps(payload, sort_keys=True),
                        channel=channel,
                        target=target[:256],
                        created_at=now,
                        next_at=now,
                    )
                )
        log.info("notification queued", extra={"event": event, "subject": subject, "channels": len(channels)})
        self._wake.set()

    def task_ended(self, t, status: str, code: str, message: str) -> None:
        """The dispatcher's hook: a task that failed or timed out."""
        if status in ("failed", "timeout") and self.enabled:
            self.emit(
                "task.failed",
                f"{t.operation_type} task {t.id} {status}: {code}",
                {
                    "task_id": t.id,
                    "operation_type": t.operation_type,
                    "status": status,
                    "error_code": code,
                    "error_message": message,
                    "resource": {"type": t.resource_type, "uuid": t.resource_uuid},
                    "tenant": t.tenant,
                    "host_uuid": t.host_uuid,
                },
            )

    # ---- delivery ----

    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:
                log.exception("notification delivery failed")
            self._wake.wait(1.0)
            self._wake.clear()

    def deliver_due(self) -> int:
        now = time.time()
        with self.db.session() as s:
            due = list(
                s.scalars(
                    select(Notification)
                    .where(Notification.status == "pending", Notification.next_at <= now)
                    .order_by(Notification.created_at)
                    .limit(50)
                )
            )
            s.expunge_all()
        for n in due:
            if self._stop.is_set():
                break
            error = self._send(n)
            with self.db.session() as s:
                row = s.get(Notification, n.id)
                if row is None:
                    continue
                row.attempts += 1
                if not error:
                    row.status, row.delivered_at, row.last_error = "delivered", time.time(), ""
                    log.info("notification delivered", extra={"event": n.event, "target": n.target})
                    continue
                row.last_error = error[:1000]
                if row.attempts >= self.cfg.notify_max_attempts:
                    row.status = "failed"
                    log.error(
                        "notification given up",
                        extra={"event": n.event, "target": n.target, "attempts": row.attempts, "error": error},
                    )
                else:
                    row.next_at = time.time() + min(MAX_BACKOFF, self.cfg.notify_retry_base * 2 ** (row.attempts - 1))
                    log.warning(
                        "notification not delivered; retrying",
                        extra={"event": n.event, "target": n.target, "attempts": row.attempts, "error": error},
                    )
        return len(due)

    def _send(self, n: Notification) -> str:
        """ "" when delivered, else why not (never a secret or a URL's path)."""
        body = n.payload_json.encode()
        if n.channel == "email":
            return self._mail(self.cfg.email, n) if self.cfg.email else "e-mail is no longer configured"
        w = self._webhooks.get(n.channel)
        if w is None:
            return "this webhook is no longer configured"
        ts = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"blockferry-controller/{__version__}",
            "X-Blockferry-Event": n.event,
            "X-Blockferry-Delivery": n.id,
            "X-Blockferry-Timestamp": ts,
            "X-Blockferry-Signature": sign(w.secret, ts, body),
        }
        try:
            r = self._http.post(w.url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return f"{shown(w.url)}: {type(e).__name__}"
        return "" if 200 <= r.status_code < 300 else f"{shown(w.url)} answered HTTP {r.status_code}"

    @staticmethod
    def _mail(e: Email, n: Notification) -> str:
        payload = json.loads(n.payload_json)
        msg = EmailMessage()
        msg["Subject"] = f"[blockferry] {n.subject}"
        msg["From"] = e.sender
        msg["To"] = ", ".join(e.to)
        msg["X-Blockferry-Event"] = n.event
        lines = [n.subject, "", f"event: {n.event}", f"time: {payload['time']}", ""]
        lines += [f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in payload["details"].items()]
        msg.set_content("\n".join(lines) + "\n")
        try:
            with smtplib.SMTP(e.smtp_host, e.smtp_port, timeout=30) as smtp:
                if e.starttls:
                    smtp.starttls()
                if e.username:
                    smtp.login(e.username, e.password)
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as err:
            return f"smtp {e.smtp_host}:{e.smtp_port}: {type(err).__name__}"
        return ""

    # ---- watching ----

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.cfg.notify_interval):
            try:
                self.watch()
            except Exception:
                log.exception("notification watch failed")

    def watch(self, now: float | None = None) -> None:
        """Compare hosts, backup points and backups with what was seen last,
        and emit each change."""
        now = time.time() if now is None else now
        changes: list[tuple[str, str, str, dict]] = []  # key, state, event, details
        with self.db.session() as s:
            seen = {w.key: w for w in s.scalars(select(WatchState))}

            def look(key: str, state: str, event: str, subject: str, details: dict, *, tell_first: bool) -> None:
                old = seen.get(key)
                if old is not None and old.state == state:
                    return
                if old is None:
                    s.add(WatchState(key=key, state=state, since=now))
                else:
                    old.state, old.since = state, now
                if old is not None or tell_first:
                    changes.append((key, state, event, {"subject": subject, **details}))

            for h in s.scalars(select(Host)):
                down = host_state(h, self.cfg.host_dead_after, now) == "offline"
                name = h.hostname or h.uuid
                said = f"down: no heartbeat for {int(now - h.last_seen)} s" if down else "up"
                look(
                    f"host:{h.uuid}",
                    "down" if down else "up",
                    "host.down" if down else "host.up",
                    f"host {name} is {said}",
                    {"host_uuid": h.uuid, "hostname": h.hostname, "last_seen": h.last_seen},
                    tell_first=down,
                )
            fleet = Fleet(s, self.cfg.host_dead_after, now)
            for bp in s.scalars(select(BackupPoint)):
                health = fleet.backup_point(bp.uuid)
                if health.state == "unknown":
                    continue  # nobody serves it (yet), or its hosts are down: told as host.down
                down = health.state in DOWN_STATES
                look(
                    f"backup_point:{bp.uuid}",
                    "down" if down else "up",
                    "backup_point.down" if down else "backup_point.up",
                    f"backup point {bp.name} is {health.state}" + (f": {health.reason}" if down else ""),
                    {
                        "backup_point_uuid": bp.uuid,
                        "name": bp.name,
                        "type": bp.btype,
                        "state": health.state,
                        "reason": health.reason,
                    },
                    tell_first=down,
                )
            for r, vault, policy in s.execute(
                select(VaultResource, Vault, Policy)
                .join(Vault, Vault.id == VaultResource.vault_id)
                .join(Policy, Policy.id == Vault.policy_id)
                .where(Policy.enabled.is_(True))
            ):
                gap = longest_gap(json.loads(policy.patterns_json), policy.start_time, now)
                last = s.scalar(
                    select(func.max(Backup.ctime)).where(
                        Backup.volume_uuid == r.volume_uuid, Backup.status == "BackupSucceeded"
                    )
                )
                since = max(float(last or 0), r.added_at, vault.policy_since or 0.0)
                stale = now - since > 2 * gap
                vol = s.get(Volume, r.volume_uuid)
                name = vol.name if vol else r.volume_uuid
                look(
                    f"backup:{r.volume_uuid}",
                    "stale" if stale else "fresh",
                    "backup.stale" if stale else "backup.fresh",
                    f"volume {name} has "
                    + (f"no backup for {(now - since) / 3600:.1f} h" if stale else "a fresh backup again"),
                    {
                        "volume_uuid": r.volume_uuid,
                        "name": name,
                        "vault_id": vault.id,
                        "vault_name": vault.name,
                        "policy_id": policy.id,
                        "last_backup_at": float(last) if last else None,
                        "allowed_seconds": 2 * gap,
                    },
                    tell_first=stale,
                )
        for _key, _state, event, details in changes:
            subject = details.pop("subject")
            self.emit(event, subject, details)
