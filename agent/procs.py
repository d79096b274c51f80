"""The one helper that starts external processes (qemu-img, qemu-nbd, ...).

Every command gets a timeout and is logged with secrets masked. Long-running
children are tracked by PID so none outlives the agent: each is started
through `setpriv --pdeathsig TERM` (util-linux), so the kernel stops it if the
agent dies, and `stop_all()` stops the rest at shutdown. (A preexec_fn calling
prctl would do the same, but code between fork and exec in a threaded process
is unsafe; it crashed children here.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

from agent.errors import StorageIOError

log = logging.getLogger("agent.procs")

DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]
RETERM = 0.25  # seconds between SIGTERMs while a child is asked to stop


def _mask(text: str | list[str], secrets: tuple[str, ...]) -> str:
    if not isinstance(text, str):
        text = " ".join(text)
    for s in secrets:
        if s:
            text = text.replace(s, "********")
    return text


class CommandFailed(StorageIOError):
    """An external command failed; the message holds its (masked) stderr."""

    code = "IO_ERROR"

    def __init__(self, message: str, *, stderr: str = "", returncode: int | None = None):
        super().__init__(message)
        self.stderr = stderr
        self.returncode = returncode


def run(
    argv: list[str],
    *,
    timeout: float,
    secrets: tuple[str, ...] = (),
    check: bool = True,
    what: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command to completion. Raises CommandFailed on a non-zero exit
    (when check) or a timeout, with the command's last stderr line. env:
    variables added to the agent's environment."""
    shown = _mask(argv, secrets)
    log.debug("run", extra={"cmd": shown})
    try:
        cp = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env} if env else None
        )
    except subprocess.TimeoutExpired:
        raise CommandFailed(f"{what or argv[0]}: timed out after {timeout:.0f}s") from None
    except FileNotFoundError:
        raise CommandFailed(f"{what or argv[0]}: {argv[0]} is not installed") from None
    if check and cp.returncode != 0:
        err = _mask(cp.stderr.strip(), secrets)
        last = err.splitlines()[-1] if err else f"exit code {cp.returncode}"
        raise CommandFailed(f"{what or argv[0]}: {last}", stderr=err, returncode=cp.returncode)
    return cp


def run_with_progress(argv: list[str], *, on_percent, checkpoint, timeout: float, what: str | None = None) -> None:
    """Run a command that prints "(NN.NN/100%)" progress (qemu-img -p).
    on_percent(float) is called as it advances; checkpoint() is called
    between updates and may raise to cancel, which stops the command with
    SIGTERM before the exception propagates."""
    import re
    import selectors

    pattern = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
    child = Child(argv, name=what, stdout=True)
    sel = selectors.DefaultSelector()
    sel.register(child.proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        buf = b""
        while True:
            checkpoint()
            if time.monotonic() > deadline:
                raise CommandFailed(f"{what or argv[0]}: timed out after {timeout:.0f}s")
            if sel.select(0.2):
                chunk = os.read(child.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf = (buf + chunk)[-256:]
                found = pattern.findall(buf)
                if found:
                    on_percent(float(found[-1]))
        child.proc.wait()
        if child.proc.returncode != 0:
            err = child.stderr_tail()
            raise CommandFailed(
                f"{what or argv[0]}: {err.splitlines()[-1] if err else 'failed'}",
                stderr=err,
                returncode=child.proc.returncode,
            )
    finally:
        sel.close()
        child.stop()


class Child:
    """A long-running child process (qemu-nbd), tracked until stopped."""

    _live: dict[int, Child] = {}
    _lock = threading.Lock()

    def __init__(
        self, argv: list[str], *, secrets: tuple[str, ...] = (), name: str | None = None, stdout: bool = False
    ):
        self.name = name or os.path.basename(argv[0])
        self.shown = _mask(argv, secrets)
        self.proc = subprocess.Popen(
            DIE_WITH_PARENT + argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with Child._lock:
            Child._live[self.proc.pid] = self
        log.debug("started", extra={"cmd": self.shown, "pid": self.proc.pid})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self) -> str:
        if self.alive():
            return ""
        try:
            return (self.proc.stderr.read() or b"").decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (so qemu-nbd closes images and bitmaps cleanly), again
        every RETERM seconds, then SIGKILL after timeout. Again: qemu-nbd 7.2
        loses a SIGTERM that arrives while it starts (after its socket exists,
        before its main loop runs: 19 of 20 stopped right after start hung
        until killed, and a killed writable qemu-nbd leaves its dirty bitmap
        inconsistent, so change tracking is lost)."""
        if self.alive():
            deadline = time.monotonic() + timeout
            while True:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(max(0.0, min(RETERM, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        log.error("did not stop on SIGTERM; killing", extra={"cmd": self.shown, "pid": self.pid})
                        self.proc.kill()
                        self.proc.wait()
                        break
        with Child._lock:
            Child._live.pop(self.proc.pid, None)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.proc.returncode

    @classmethod
    def live(cls) -> list[Child]:
        with cls._lock:
            return list(cls._live.values())

    @classmethod
    def stop_all(cls) -> None:
        for child in cls.live():
            child.stop()


def wait_for(predicate, timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
