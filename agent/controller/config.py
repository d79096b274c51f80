"""The controller's typed config: [controller] and [[tokens]] in a TOML file.

[controller]
listen = "127.0.0.1:8080"
database_url = "sqlite:////var/lib/blockferry-controller/controller.sqlite3"
secret_key_file = "/var/lib/blockferry-controller/controller.key"

[[tokens]]               # bearer tokens; the file must then be 0600
token = "..."
tenant = "*"             # "*": every tenant (an operator); else one tenant uuid

[[webhooks]]             # notifications (docs/notifications.md); a file with a secret must be 0600
url = "https://hooks.example.net/blockferry"
secret = "..."           # HMAC-SHA256 key of the X-Blockferry-Signature header
events = ["task.failed", "host.down"]   # default: every event

[email]                  # notifications by mail, through an SMTP server
smtp_host = "mail.example.net"
to = ["ops@example.net"]
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import ConfigError

DEFAULT_CONFIG = "/etc/blockferry/controller.toml"
ALL_TENANTS = "*"


@dataclass(frozen=True)
class Token:
    token: str
    tenant: str  # ALL_TENANTS or a tenant uuid


# what the controller notifies of (docs/notifications.md)
EVENTS = (
    "task.failed",
    "backup.stale",
    "backup.fresh",
    "backup_point.down",
    "backup_point.up",
    "host.down",
    "host.up",
)


@dataclass(frozen=True)
class Webhook:
    url: str
    secret: str  # the HMAC-SHA256 key (never logged)
    events: tuple[str, ...] = EVENTS


@dataclass(frozen=True)
class Email:
    smtp_host: str = ""
    smtp_port: int = 25
    starttls: bool = False
    username: str = ""
    password: str = ""  # never logged
    sender: str = "blockferry@localhost"
    to: tuple[str, ...] = ()
    events: tuple[str, ...] = EVENTS


@dataclass
class ControllerConfig:
    listen: str = "127.0.0.1:8080"
    database_url: str = "sqlite:////var/lib/blockferry-controller/controller.sqlite3"
    secret_key_file: str = "/var/lib/blockferry-controller/controller.key"
    log_level: str = "info"
    log_format: str = "auto"  # auto (journal under systemd, else text), journal, text or json
    tls_cert: str = ""  # PEM certificate: serve REST over HTTPS (with tls_key)
    tls_key: str = ""
    grpc_listen: str = "127.0.0.1:9444"  # the agent registry (host:port or unix:/path)
    agent_token: str = ""  # bearer token agents must send (a secret)
    grpc_tls_cert: str = ""  # TLS for grpc_listen; with grpc_client_ca: mutual TLS
    grpc_tls_key: str = ""
    grpc_client_ca: str = ""
    agent_tls_ca: str = ""  # CA of the agents' TLS certificates (calls to host:port agents)
    agent_tls_cert: str = ""  # client certificate for agents that require mutual TLS
    agent_tls_key: str = ""
    agent_auth_token: str = ""  # the agents' [grpc] auth_token, sent on every call
    heartbeat_interval: int = 10  # seconds, told to agents when they register
    host_dead_after: int = 30  # seconds without a heartbeat: the host is offline
    scheduler_interval: int = 5  # seconds between the policy scheduler's looks
    schedule_grace: int = 3600  # a scheduled run found later than this (seconds) is missed, not run
    gc_interval: int = 86400  # seconds between two GCs of every backup point; 0: only after deletions
    gc_after_delete: int = 60  # seconds after a backup point's last deletion until its GC
    metrics_listen: str = ""  # loopback host:port of the Prometheus endpoint; empty: off
    default_backup_point: str = ""  # uuid: where a vault created without backup_point_id keeps its backups
    notify_interval: int = 30  # seconds between looks for hosts, backup points and backups to notify of
    notify_retry_base: int = 5  # seconds before a failed delivery's first retry (doubling, at most 600)
    notify_max_attempts: int = 12  # deliveries given up after this many attempts
    tokens: list[Token] = field(default_factory=list)
    webhooks: list[Webhook] = field(default_factory=list)
    email: Email | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def secrets_of(cfg: ControllerConfig) -> list[str]:
    """Every secret the config holds: the log masks them wherever they appear."""
    found = [cfg.agent_token, cfg.agent_auth_token, *(t.token for t in cfg.tokens)]
    found += [w.secret for w in cfg.webhooks]
    if cfg.email is not None:
        found.append(cfg.email.password)
    found.append(urlsplit(cfg.database_url).password or "")
    return [s for s in found if s]


def default_conf_dir(config_path: str) -> str:
    """conf.d beside the main file: /etc/blockferry/controller.toml -> /etc/blockferry/controller.conf.d"""
    p = Path(config_path)
    return str(p.with_name(p.stem + ".conf.d"))


def load(path: str, conf_dir: str | None = None) -> ControllerConfig:
    """The main file, then conf.d/*.toml beside it in name order: a later
    [controller] key wins, [[tokens]] add up. Any file holding a bearer
    token must be mode 0600 (so a deployment keeps them in one conf.d file
    and the main file stays readable and diffable)."""
    cfg = ControllerConfig()
    files = [Path(path)]
    if not files[0].is_file():
        raise ConfigError(f"{path}: no such config file", field=path)
    d = Path(conf_dir if conf_dir is not None else default_conf_dir(path))
    if d.is_dir():
        files += sorted(d.glob("*.toml"))
    for f in files:
        _merge(cfg, f)
    return _validate(cfg, path)


def _merge(cfg: ControllerConfig, p: Path) -> None:
    path = str(p)
    try:
        doc = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file", field=path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", field=path) from None
    unknown = set(doc) - {"controller", "tokens", "webhooks", "email"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown section(s) {sorted(unknown)} (known: controller, tokens, webhooks, email)", field=path
        )
    section = doc.get("controller", {})
    types = {
        f.name: f.type for f in dataclasses.fields(ControllerConfig) if f.name not in ("tokens", "webhooks", "email")
    }
    for key, value in section.items():
        if key not in types:
            raise ConfigError(
                f"{path}: [controller] {key}: unknown key (known: {', '.join(types)})", field=f"controller.{key}"
            )
        want = int if types[key] in (int, "int") else str
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(
                f"{path}: [controller] {key}: must be {'an integer' if want is int else 'a string'}",
                field=f"controller.{key}",
            )
        setattr(cfg, key, value)
    for i, t in enumerate(doc.get("tokens", [])):
        token, tenant = t.get("token", ""), t.get("tenant", "")
        if len(token) < 16:
            raise ConfigError(
                f"{path}: [[tokens]] #{i + 1}: token must have at least 16 characters", field="tokens.token"
            )
        if tenant != ALL_TENANTS:
            try:
                uuid.UUID(tenant)
            except ValueError:
                raise ConfigError(
                    f"{path}: [[tokens]] #{i + 1}: tenant must be '*' or a tenant uuid", field="tokens.tenant"
                ) from None
        cfg.tokens.append(Token(token, tenant))
    for i, w in enumerate(doc.get("webhooks", [])):
        cfg.webhooks.append(_webhook(w, f"{path}: [[webhooks]] #{i + 1}"))
    if "email" in doc:
        cfg.email = _email(doc["email"], f"{path}: [email]")
    secret_keys = {"agent_token", "agent_auth_token"}
    secrets = (
        doc.get("tokens")
        or any(section.get(k) for k in secret_keys)
        or doc.get("webhooks")
        or (doc.get("email") or {}).get("password")
    )
    if secrets and os.stat(p).st_mode & 0o077:
        raise ConfigError(f"{path}: holds tokens or secrets, so the file must be mode 0600", field=path)


def _events(value, where: str, field: str) -> tuple[str, ...]:
    if value is None:
        return EVENTS
    if not isinstance(value, list) or not value or any(e not in EVENTS for e in value):
        raise ConfigError(f"{where}: events: a non-empty list of {', '.join(EVENTS)}", field=field)
    return tuple(value)


def _webhook(w, where: str) -> Webhook:
    if not isinstance(w, dict):
        raise ConfigError(f"{where}: must be a table", field="webhooks")
    unknown = set(w) - {"url", "secret", "events"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (known: url, secret, events)", field="webhooks")
    url, secret = w.get("url"), w.get("secret")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: url: must be an http:// or https:// URL", field="webhooks.url")
    if not isinstance(secret, str) or len(secret) < 16:
        raise ConfigError(f"{where}: secret: at least 16 characters (the HMAC key)", field="webhooks.secret")
    return Webhook(url, secret, _events(w.get("events"), where, "webhooks.events"))


def _email(e, where: str) -> Email:
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: must be a table", field="email")
    kinds = {"smtp_host": str, "smtp_port": int, "starttls": bool, "username": str, "password": str, "sender": str}
    unknown = set(e) - set(kinds) - {"to", "events"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}", field="email")
    for key, kind in kinds.items():
        if key in e and (not isinstance(e[key], kind) or (kind is int and isinstance(e[key], bool))):
            raise ConfigError(f"{where}: {key}: must be {kind.__name__}", field=f"email.{key}")
    to = e.get("to")
    if (
        not e.get("smtp_host")
        or not isinstance(to, list)
        or not to
        or not all(isinstance(x, str) and "@" in x for x in to)
    ):
        raise ConfigError(f"{where}: smtp_host and to (a list of addresses) are required", field="email.to")
    return Email(
        smtp_host=e["smtp_host"],
        smtp_port=e.get("smtp_port", 25),
        starttls=e.get("starttls", False),
        username=e.get("username", ""),
        password=e.get("password", ""),
        sender=e.get("sender", "blockferry@localhost"),
        to=tuple(to),
        events=_events(e.get("events"), where, "email.events"),
    )


def _validate(cfg: ControllerConfig, path: str) -> ControllerConfig:
    if cfg.metrics_listen:
        from agent.metrics import loopback

        loopback(cfg.metrics_listen, f"{path}: [controller] metrics_listen")
    if cfg.scheduler_interval < 1 or cfg.schedule_grace < 60:
        raise ConfigError(
            f"{path}: [controller] scheduler_interval must be >= 1 and schedule_grace >= 60 (seconds)",
            field="controller.schedule_grace",
        )
    if cfg.log_format not in ("auto", "journal", "text", "json"):
        raise ConfigError(
            f"{path}: [controller] log_format: auto, journal, text or json, not {cfg.log_format!r}",
            field="controller.log_format",
        )
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"{path}: [controller] log_level: debug, info, warning or error, not {cfg.log_level!r}",
            field="controller.log_level",
        )
    if cfg.notify_interval < 1 or cfg.notify_retry_base < 1 or cfg.notify_max_attempts < 1:
        raise ConfigError(
            f"{path}: [controller] notify_interval, notify_retry_base and notify_max_attempts must be >= 1",
            field="controller.notify_interval",
        )
    if cfg.gc_interval < 0 or cfg.gc_after_delete < 0:
        raise ConfigError(
            f"{path}: [controller] gc_interval and gc_after_delete must be >= 0 (seconds)",
            field="controller.gc_interval" if cfg.gc_interval < 0 else "controller.gc_after_delete",
        )
    if cfg.heartbeat_interval < 1 or cfg.host_dead_after <= cfg.heartbeat_interval:
        raise ConfigError(
            f"{path}: [controller] host_dead_after must exceed heartbeat_interval (>= 1)",
            field="controller.host_dead_after",
        )
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError(
            f"{path}: [controller] tls_cert and tls_key go together (REST over HTTPS)",
            field="controller.tls_key" if cfg.tls_cert else "controller.tls_cert",
        )
    for key in ("tls_cert", "tls_key"):
        value = getattr(cfg, key)
        if value and not os.access(value, os.R_OK):
            raise ConfigError(f"{path}: [controller] {key}: cannot read {value}", field=f"controller.{key}")
    if cfg.default_backup_point:
        try:
            cfg.default_backup_point = str(uuid.UUID(cfg.default_backup_point))
        except ValueError:
            raise ConfigError(
                f"{path}: [controller] default_backup_point: must be a backup point uuid",
                field="controller.default_backup_point",
            ) from None
    host, _, port = cfg.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"{path}: [controller] listen: must be host:port, not {cfg.listen!r}", field="controller.listen"
        )
    return cfg
