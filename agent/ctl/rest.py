"""The controller's REST API as `blockferry-ctl` calls it: where it is and
the token (flags, the environment, then a config file; the token never in
argv), the seeds' envelopes unwrapped, their errors turned back into ours
(the message starts with our code), and a task followed to its end."""

from __future__ import annotations

import os
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.errors import BlockferryError, ConfigError, TargetUnreachable, Unauthenticated, from_code

CONFIG_PATHS = ("~/.config/blockferry/ctl.toml", "/etc/blockferry/ctl.toml")
KEYS = ("url", "token", "token_file", "cluster", "tenant")


@dataclass
class Settings:
    url: str = "http://127.0.0.1:8080"
    token: str = ""
    cluster: str = ""
    tenant: str = ""
    source: str = "defaults"  # where the settings came from, for error hints


def load(path: str | None = None, url: str = "", cluster: str = "", tenant: str = "") -> Settings:
    """Flags win over $BLOCKFERRY_URL, $BLOCKFERRY_CTL_TOKEN,
    $BLOCKFERRY_CLUSTER and $BLOCKFERRY_TENANT, which win over the config
    file ($BLOCKFERRY_CTL_CONFIG, ~/.config/blockferry/ctl.toml or
    /etc/blockferry/ctl.toml). A file holding a token must be 0600."""
    s = Settings()
    candidates = (
        [path or os.environ.get("BLOCKFERRY_CTL_CONFIG", "")]
        if (path or os.environ.get("BLOCKFERRY_CTL_CONFIG"))
        else [os.path.expanduser(p) for p in CONFIG_PATHS]
    )
    for p in candidates:
        f = Path(p)
        if not f.is_file():
            if path:
                raise ConfigError(f"{p}: no such config file", field="config")
            continue
        try:
            doc = tomllib.loads(f.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{p}: cannot be read as TOML: {e}", field="config") from None
        unknown = set(doc) - set(KEYS)
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)} (known: {', '.join(KEYS)})", field="config")
        if doc.get("token") and os.stat(f).st_mode & 0o077:
            raise ConfigError(f"{p}: holds a token, so it must be mode 0600", field="config")
        s.url = str(doc.get("url", s.url))
        s.cluster, s.tenant = str(doc.get("cluster", "")), str(doc.get("tenant", ""))
        s.token = str(doc.get("token", ""))
        if doc.get("token_file"):
            try:
                s.token = Path(str(doc["token_file"])).read_text().strip()
            except OSError as e:
                raise ConfigError(f"{p}: token_file: {e.strerror}", field="token_file") from None
        s.source = p
        break
    env = os.environ
    s.url = url or env.get("BLOCKFERRY_URL") or s.url
    s.token = env.get("BLOCKFERRY_CTL_TOKEN") or s.token
    s.cluster = cluster or env.get("BLOCKFERRY_CLUSTER") or s.cluster
    s.tenant = tenant or env.get("BLOCKFERRY_TENANT") or s.tenant
    return s


def _error(r: httpx.Response) -> BlockferryError:
    try:
        body = r.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("message") or body.get("error_msg") or (body.get("error") or {}).get("description") or "")
    field = body.get("desc") or None
    code, sep, rest = message.partition(": ")
    if sep and code.isupper() and code.replace("_", "").isalpha():
        return from_code(code, rest, field)
    if r.status_code == 401:
        return Unauthenticated("token: the controller refused it", field="token")
    return from_code("NOT_FOUND" if r.status_code == 404 else "INTERNAL", f"HTTP {r.status_code}: {message or r.text}")


class Controller:
    """One controller, called with the settings' token."""

    def __init__(self, settings: Settings, timeout: float = 90.0):
        if not settings.token:
            raise Unauthenticated(
                "token: none found; set $BLOCKFERRY_CTL_TOKEN, or token_file (or token) in "
                f"{' or '.join(CONFIG_PATHS)} (never on the command line)",
                field="token",
            )
        self.settings = settings
        self.http = httpx.Client(
            base_url=settings.url, headers={"Authorization": f"Bearer {settings.token}"}, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, body: Any = None, params: dict | None = None) -> Any:
        """The answer's data (the seeds' envelope unwrapped), or our error."""
        try:
            r = self.http.request(method, path, json=body, params={k: x for k, x in (params or {}).items() if x})
        except httpx.TransportError as e:
            raise TargetUnreachable(
                f"url: the controller at {self.settings.url} does not answer ({e}); is blockferry-controller "
                f"running? The URL comes from --url, $BLOCKFERRY_URL or {self.settings.source}",
                field="url",
            ) from None
        if r.status_code >= 400:
            raise _error(r)
        if not r.content:
            return {}
        data = r.json()
        return data["data"] if isinstance(data, dict) and "scode" in data else data

    def follow(self, task_id: str, quiet: bool = False) -> dict:
        """A task to its end, its progress shown: a bar that fits the
        terminal, or a line at most every second off a terminal."""
        tty = sys.stderr.isatty()
        last_line = 0.0
        while True:
            t = self.call("GET", f"/v1/tasks/{task_id}", params={"wait": 5})
            done = t["status"] not in ("waiting", "running")
            if not quiet:
                pct = float(t.get("progress") or 0.0)
                label = f"{t['operation_type']} {task_id[:8]} {t['status']}"
                if tty:
                    width = shutil.get_terminal_size().columns
                    bar_w = max(10, width - len(label) - 10)
                    filled = int(bar_w * pct / 100)
                    line = f"{label} [{'#' * filled}{' ' * (bar_w - filled)}] {pct:5.1f}%"
                    print("\r" + line[: width - 1], end="\n" if done else "", file=sys.stderr, flush=True)
                elif done or time.monotonic() - last_line >= 1.0:
                    print(f"{label} {pct:.1f}%", file=sys.stderr, flush=True)
                    last_line = time.monotonic()
            if done:
                return t
