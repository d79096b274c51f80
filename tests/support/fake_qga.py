"""A stand-in for the qemu-guest-agent inside a VM, for the failure modes
no real guest can be made to show on demand (a freeze that fails, a freeze
that hangs). It listens where the VM's guest agent channel is; the VM's
qemu connects to it as a client (`-chardev socket,path=...` without
server=on), so the command line looks as a real VM's does, and the agent
under test connects to the same socket. It speaks the guest agent's wire
protocol (JSON lines, 0xFF before a guest-sync-delimited answer) and
records what it was asked, with CLOCK_MONOTONIC times (one clock for every
process of the host)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time


class FakeGuestAgent:
    def __init__(self, path: str, mode: str = "ok"):
        """mode: "ok" (freezes 2 filesystems), "fail" (refuses the freeze)
        or "hang" (never answers the freeze)."""
        self.path, self.mode = path, mode
        self.calls: list[tuple[str, float]] = []
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.bind(path)
        self._sock.listen(8)
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data.replace(b"\xff", b"")
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    if line.strip():
                        reply = self._answer(json.loads(line))
                        if reply is not None:
                            conn.sendall(reply)

    def _answer(self, msg: dict) -> bytes | None:
        cmd = msg["execute"]
        self.calls.append((cmd, time.monotonic()))
        if cmd == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n"
        if cmd == "guest-fsfreeze-freeze":
            if self.mode == "hang":
                return None
            if self.mode == "fail":
                err = {"class": "GenericError", "desc": "failed to freeze /data: Device or resource busy"}
                return json.dumps({"error": err}).encode() + b"\n"
            return b'{"return": 2}\n'
        if cmd == "guest-fsfreeze-thaw":
            return b'{"return": 2}\n'
        return json.dumps({"error": {"class": "CommandNotFound", "desc": cmd}}).encode() + b"\n"

    def names(self) -> list[str]:
        return [c for c, _ in self.calls]

    def close(self) -> None:
        self._stop = True
        self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
