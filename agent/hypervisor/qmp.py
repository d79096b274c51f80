"""A QMP client: one connection to one qemu's control socket.

QMP speaks JSON objects, one per line: a greeting, then `qmp_capabilities`,
then commands whose replies carry the command's id, with asynchronous events
interleaved. A qemu serves one client per monitor socket at a time, so the
agent connects for an operation and closes the connection after it.
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from typing import Any

from agent.errors import HypervisorError, TargetUnreachable

TIMEOUT = 10.0


class Qmp:
    def __init__(self, path: str, *, timeout: float = TIMEOUT, greeting_timeout: float | None = None):
        """greeting_timeout: how long to wait for qemu to greet (it greets a
        client only when the one before has left); timeout: per command."""
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(greeting_timeout or timeout)
        try:
            self._sock.connect(path)
            self._file = self._sock.makefile("rwb", buffering=0)
            greeting = self._read()
            if "QMP" not in greeting:
                raise HypervisorError(f"qmp {path}: not a QMP socket (no greeting)")
            self.version = greeting["QMP"].get("version", {}).get("qemu", {})
            self._sock.settimeout(timeout)
            self.execute("qmp_capabilities")
        except OSError as e:
            self._sock.close()
            raise TargetUnreachable(f"qmp {path}: cannot connect: {e.strerror or e}") from None
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise TargetUnreachable(f"qmp {self.path}: qemu closed the connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(
        self, command: str, args: dict[str, Any] | None = None, *, timeout: float | None = None, **arguments: Any
    ) -> Any:
        """Run a command and return its reply's "return" value (arguments
        whose names are not Python names, such as node-name, go in args). A
        refusal raises HypervisorError with qemu's own description."""
        arguments = {**(args or {}), **arguments}
        with self._lock:
            self._next_id += 1
            ident = f"bf-{self._next_id}"
            msg: dict[str, Any] = {"execute": command, "id": ident}
            if arguments:
                msg["arguments"] = arguments
            self._sock.settimeout(timeout or self.timeout)
            try:
                self._file.write(json.dumps(msg).encode() + b"\n")
                while True:
                    reply = self._read()
                    if "event" in reply:
                        self._events.append(reply)
                    elif reply.get("id") == ident:
                        break
            except TimeoutError:
                raise HypervisorError(
                    f"qmp {self.path}: {command}: no answer within {timeout or self.timeout:.0f}s"
                ) from None
            except OSError as e:
                raise TargetUnreachable(f"qmp {self.path}: {command}: {e.strerror or e}") from None
        if "error" in reply:
            err = reply["error"]
            raise HypervisorError(f"qemu refused {command}: {err.get('desc', err)}")
        return reply.get("return")

    def wait_event(self, name: str, timeout: float | None = None, **data: Any) -> dict[str, Any]:
        """The next event `name` whose data holds the given items (events
        that came before, while a command ran, count too)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._lock:
            while True:
                for ev in list(self._events):
                    if ev["event"] == name and all(ev.get("data", {}).get(k) == v for k, v in data.items()):
                        self._events.remove(ev)
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HypervisorError(f"qmp {self.path}: no {name} event within {timeout or self.timeout:.0f}s")
                self._sock.settimeout(left)
                try:
                    self._events.append(self._read())
                except TimeoutError:
                    continue
                except OSError as e:
                    raise TargetUnreachable(f"qmp {self.path}: waiting for {name}: {e.strerror or e}") from None

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
