"""Structured logging that journald understands.

- journal: `<N>` syslog-priority prefixes (systemd reads them from stderr)
  and `key=value` fields after the message.
- text: time, level, logger, message and fields, for a terminal.
- json: one JSON object per line.

Known secret values are replaced by ******** in every record.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def fields_of(record: logging.LogRecord) -> dict:
    """Extra fields passed as logger.info(..., extra={...})."""
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS}


class _Formatter(logging.Formatter):
    def __init__(self, style: str, secrets: list[str]):
        super().__init__()
        self.style = style
        self.secrets = [s for s in secrets if s]

    def _mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "********")
        return text

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        extra = fields_of(record)
        if self.style == "json":
            obj = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": msg,
                **extra,
            }
            return self._mask(json.dumps(obj, default=str))
        kv = " ".join(f"{k}={v}" for k, v in extra.items())
        line = f"{msg} {kv}".rstrip()
        if self.style == "journal":
            prio = _PRIORITY.get(record.levelno, 6)
            # journald splits on newlines: keep tracebacks in one entry.
            return self._mask(f"<{prio}>{record.name}: " + line.replace("\n", " | "))
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return self._mask(f"{ts} {record.levelname:<7} {record.name}: {line}")


# (botocore at DEBUG prints every signed request and response body)
QUIET = ("pyroute2", "asyncio", "urllib3", "hpack", "grpc._cython", "botocore", "boto3", "s3transfer")


def setup(level: str = "info", fmt: str = "auto", secrets: list[str] | None = None) -> None:
    if fmt == "auto":
        fmt = "journal" if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID") else "text"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, secrets or []))
    # libraries that log every netlink message or packet at DEBUG (and may
    # reset their loggers' levels when imported): the agent's debug log is
    # about the agent
    handler.addFilter(lambda r: r.levelno >= logging.INFO or not r.name.startswith(QUIET))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
