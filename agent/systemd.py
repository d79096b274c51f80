"""sd_notify and the watchdog, without libsystemd."""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger("agent.systemd")


def notify(state: str) -> bool:
    """Send a state string (e.g. "READY=1") to $NOTIFY_SOCKET. False when not
    started by systemd or the send failed."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", extra={"error": str(e)})
        return False


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WATCHDOG_USEC), when this process is watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None


class Watchdog:
    """Pings WATCHDOG=1 while `healthy()` says the agent works."""

    def __init__(self, interval: float, healthy):
        self.interval = interval
        self.healthy = healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.healthy():
                notify("WATCHDOG=1")
            else:
                log.error("health check failed; not pinging the watchdog")
