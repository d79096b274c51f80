"""A client of a VM's qemu-guest-agent, over the host side of its channel.

The channel is a unix socket qemu serves for a virtio-serial port inside the
guest. The socket accepts a connection whether or not an agent runs in the
guest, and an agent may have left half a command in its parser: every
conversation starts with `guest-sync-delimited` (a 0xFF byte resets the
agent's parser, and its answer is preceded by 0xFF, so stale output before
it is skipped), and every read has a deadline.
"""

from __future__ import annotations

import json
import random
import socket
import time
from typing import Any

from agent.errors import HypervisorError, TargetUnreachable

DELIMITER = b"\xff"


class GuestAgent:
    def __init__(self, path: str, *, timeout: float):
        self.path = path
        self.timeout = timeout
        self._buf = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise TargetUnreachable(f"guest agent {path}: cannot connect: {e.strerror or e}") from None

    def _send(self, msg: dict[str, Any], prefix: bytes = b"") -> None:
        try:
            self._sock.sendall(prefix + json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise TargetUnreachable(f"guest agent {self.path}: {msg['execute']}: {e.strerror or e}") from None

    def _line(self, deadline: float, what: str) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HypervisorError(f"guest agent {self.path}: {what}: no answer within {self.timeout:g}s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                raise TargetUnreachable(f"guest agent {self.path}: {what}: {e.strerror or e}") from None
            if not data:
                raise TargetUnreachable(f"guest agent {self.path}: {what}: the channel closed")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def sync(self) -> None:
        """Make sure an agent answers, and drop anything stale on the channel."""
        ident = random.randrange(1, 2**31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": ident}}, prefix=DELIMITER)
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._line(deadline, "guest-sync-delimited")
            if DELIMITER not in line:
                continue  # output of an earlier conversation
            try:
                reply = json.loads(line.rpartition(DELIMITER)[2])
            except ValueError:
                continue
            if reply.get("return") == ident:
                return

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._line(deadline, command).strip(DELIMITER + b" \r")
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError:
                raise HypervisorError(f"guest agent {self.path}: {command}: not JSON: {line[:80]!r}") from None
            if "error" in reply:
                err = reply["error"]
                raise HypervisorError(f"guest agent refused {command}: {err.get('desc', err)}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
