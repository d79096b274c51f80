"""Typed agent configuration: one TOML file plus a conf.d directory.

Files under conf.d (`*.toml`) are merged over the main file in name order,
key by key within each section. Every option is declared once below, with its
type, default and help text; the commented default file
(etc/blockferry/agent.toml) is rendered from these declarations and a test
keeps the two equal. Unknown sections or keys, wrong types and bad values are
refused with a ConfigError that names the file, the section and the key.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG = "/etc/blockferry/agent.toml"
MASK = "********"


def option(default: Any, help: str, *, secret: bool = False, factory: bool = False):
    meta = {"help": help, "secret": secret}
    if factory:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AgentSection:
    """Where the agent keeps state and which paths jobs may touch."""

    state_dir: str = option("/var/lib/blockferry", "Directory of the job journal (jobs.sqlite3).")
    roots: list[str] = option(["/var/lib/blockferry/pools"],
                              "Absolute paths that jobs may read or write; anything else is refused.",
                              factory=True)
    log_level: str = option("info", "One of debug, info, warning, error.")
    log_format: str = option("auto", "auto (journal when started by systemd, else text), journal, text or json.")


@dataclass
class GrpcSection:
    """How the agent serves gRPC."""

    unix_socket: str = option("/run/blockferry/agent.sock",
                              "Unix socket path; its permissions (0660) decide who may call.")
    tcp_listen: str = option("", "host:port for gRPC over TCP with TLS; empty disables TCP.")
    tls_cert: str = option("", "PEM server certificate (required with tcp_listen).")
    tls_key: str = option("", "PEM private key of tls_cert (keep it 0600).")
    tls_client_ca: str = option("", "PEM CA bundle; when set, TCP clients must present a certificate it signed (mutual TLS).")
    auth_token: str = option("", "Optional bearer token TCP callers must send as 'authorization: Bearer <token>'.",
                             secret=True)
    max_workers: int = option(64, "Threads serving RPCs (each WatchJob stream holds one).")


@dataclass
class JobsSection:
    """The job engine."""

    max_concurrent: int = option(4, "Jobs running at once on this host; more wait their turn.")
    bandwidth_limit: int = option(0, "Bytes per second shared by all jobs; 0 means unlimited.")
    on_busy: str = option("wait", "When a job's resource is locked by another job: wait, or refuse at submit.")
    drain_timeout: float = option(30.0, "Seconds SIGTERM waits for running jobs before interrupting them at a safe point.")
    keep_finished: int = option(10000, "Finished jobs kept in the journal; older ones are pruned at start.")


@dataclass
class SystemdSection:
    """systemd integration."""

    watchdog: bool = option(True, "Send watchdog pings when systemd sets WATCHDOG_USEC.")


@dataclass
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    grpc: GrpcSection = field(default_factory=GrpcSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    systemd: SystemdSection = field(default_factory=SystemdSection)
    sources: list[str] = field(default_factory=list)  # files merged, in order

    # --- validation of values (types are checked while loading) ---
    def validate(self) -> None:
        def bad(section: str, key: str, why: str) -> ConfigError:
            return ConfigError(f"[{section}] {key}: {why}", field=f"{section}.{key}")

        if self.agent.log_level not in ("debug", "info", "warning", "error"):
            raise bad("agent", "log_level", f"must be debug, info, warning or error, not {self.agent.log_level!r}")
        if self.agent.log_format not in ("auto", "journal", "text", "json"):
            raise bad("agent", "log_format", f"must be auto, journal, text or json, not {self.agent.log_format!r}")
        if not os.path.isabs(self.agent.state_dir):
            raise bad("agent", "state_dir", "must be an absolute path")
        for root in self.agent.roots:
            if not os.path.isabs(root):
                raise bad("agent", "roots", f"{root!r} is not an absolute path")
        if not self.grpc.unix_socket and not self.grpc.tcp_listen:
            raise bad("grpc", "unix_socket", "set unix_socket or tcp_listen (or both)")
        if self.grpc.unix_socket and not os.path.isabs(self.grpc.unix_socket):
            raise bad("grpc", "unix_socket", "must be an absolute path")
        if self.grpc.tcp_listen:
            host, sep, port = self.grpc.tcp_listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise bad("grpc", "tcp_listen", f"must be host:port, not {self.grpc.tcp_listen!r}")
            if not self.grpc.tls_cert or not self.grpc.tls_key:
                raise bad("grpc", "tls_cert", "tcp_listen needs tls_cert and tls_key (plain TCP is not served)")
        if self.grpc.max_workers < 4:
            raise bad("grpc", "max_workers", "must be at least 4")
        if self.jobs.max_concurrent < 1:
            raise bad("jobs", "max_concurrent", "must be at least 1")
        if self.jobs.bandwidth_limit < 0:
            raise bad("jobs", "bandwidth_limit", "must not be negative")
        if self.jobs.on_busy not in ("wait", "refuse"):
            raise bad("jobs", "on_busy", f"must be wait or refuse, not {self.jobs.on_busy!r}")
        if self.jobs.drain_timeout < 0:
            raise bad("jobs", "drain_timeout", "must not be negative")
        if self.jobs.keep_finished < 0:
            raise bad("jobs", "keep_finished", "must not be negative")

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sources"}


def _type_ok(value: Any, annotation: str) -> bool:
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(annotation)


def _merge_file(cfg: Config, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", field=str(path)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}", field=str(path)) from None
    sections = cfg.sections()
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"{path}: unknown section [{name}] (known: {', '.join(sections)})",
                              field=name)
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: {name} must be a [section]", field=name)
        section = sections[name]
        known = {f.name: f for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{path}: [{name}] {key}: unknown option", field=f"{name}.{key}")
            annotation = known[key].type
            if not _type_ok(value, annotation):
                raise ConfigError(f"{path}: [{name}] {key}: expected {annotation}, got {value!r}",
                                  field=f"{name}.{key}")
            if annotation == "float":
                value = float(value)
            setattr(section, key, value)
    cfg.sources.append(str(path))


def default_conf_dir(config_path: str) -> str:
    """conf.d beside the main file: /etc/blockferry/agent.toml -> /etc/blockferry/agent.conf.d"""
    p = Path(config_path)
    return str(p.with_name(p.stem + ".conf.d"))


def load(config_path: str | None = None, conf_dir: str | None = None, *,
         missing_ok: bool = True) -> Config:
    """Defaults, then the main file, then conf.d/*.toml in name order."""
    cfg = Config()
    path = Path(config_path or DEFAULT_CONFIG)
    if path.exists():
        _merge_file(cfg, path)
    elif not missing_ok:
        raise ConfigError(f"{path}: no such config file", field=str(path))
    d = Path(conf_dir if conf_dir is not None else default_conf_dir(str(path)))
    if d.is_dir():
        for f in sorted(d.glob("*.toml")):
            _merge_file(cfg, f)
    try:
        cfg.validate()
    except ConfigError as e:
        where = ", ".join(cfg.sources) or "defaults"
        raise ConfigError(f"{where}: {e.message}", field=e.field) from None
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def render(cfg: Config, *, commented: bool, mask_secrets: bool) -> str:
    """The config as TOML. commented=True gives the shipped default file:
    every option commented out, with its help text."""
    lines: list[str] = []
    if commented:
        lines += [
            "# blockferry-agent configuration.",
            "# Every option is shown with its default, commented out. Files in",
            "# agent.conf.d/*.toml beside this one are merged over it in name order.",
            "",
        ]
    for name, section in cfg.sections().items():
        doc = (type(section).__doc__ or "").strip()
        if commented and doc:
            lines.append(f"# {doc}")
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if mask_secrets and f.metadata["secret"] and value:
                value = MASK
            if commented:
                lines.append(f"# {f.metadata['help']}")
                lines.append(f"#{f.name} = {_toml_value(value)}")
            else:
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def secrets(cfg: Config) -> list[str]:
    """Secret values currently set (to keep them out of logs)."""
    out = []
    for section in cfg.sections().values():
        for f in dataclasses.fields(section):
            if f.metadata["secret"] and getattr(section, f.name):
                out.append(getattr(section, f.name))
    return out
