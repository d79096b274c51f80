"""Read-only NBD exports of backups: each an nbdkit process (Debian's,
with its python plugin, agent/nbd_plugin.py) on a unix socket in the
agent's run directory, serving one backup of one backup point. An export
ends when it is unexported, when its lease ends, or when the agent stops
(and with the unit's cgroup if the agent dies).

The plugin learns the backup point's definition, secrets included, from
a 0600 file that is removed as soon as the export listens; no secret is
on a command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from agent.backup_points import BackupPoints
from agent.errors import InvalidArgument, NotFound, TargetUnreachable
from agent.volumes.base import check_uuid

log = logging.getLogger("agent.exports")

PLUGIN = Path(__file__).with_name("nbd_plugin.py")
MAX_LEASE = 7 * 86400
START_TIMEOUT = 30.0


@dataclass
class Export:
    export_id: str
    backup_point_uuid: str
    backup_uuid: str
    socket: str
    size: int
    expires_at: float
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"


class Exports:
    def __init__(self, points: BackupPoints, run_dir: str, cache_bytes: int = 64 << 20):
        self.points = points
        self.dir = os.path.join(run_dir, "exports")
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="export-leases", daemon=True)
        self._reaper.start()

    def export(self, bp_uuid: str, backup_uuid: str, lease_seconds: int) -> Export:
        check_uuid(backup_uuid, "backup_uuid")
        if not 0 < lease_seconds <= MAX_LEASE:
            raise InvalidArgument(f"lease_seconds: 1 to {MAX_LEASE}", field="lease_seconds")
        bp = self.points.get(bp_uuid)
        manifest = bp.repository().manifest(backup_uuid)  # NotFound for an unknown backup
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        export_id = str(uuidlib.uuid4())
        sock = os.path.join(self.dir, f"{export_id[:8]}.sock")
        spec_path = os.path.join(self.dir, f"{export_id}.json")
        spec = {
            "backup_point_uuid": bp.uuid,
            "backup_uuid": backup_uuid,
            "section": dataclasses.asdict(bp.section),
            "cache_bytes": self.cache_bytes,
        }
        fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        # nbdkit's interpreter (Debian's python3) gets this package and the packages it uses,
        # never another interpreter's standard library
        here = str(Path(__file__).resolve().parents[1])
        syspath = ":".join([here, *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))])
        # no --exit-with-parent: its signal follows the *thread* that started nbdkit (a gRPC
        # worker), not the agent; stop_all() and the unit's cgroup (KillMode=mixed) end exports
        cmd = ["nbdkit", "-r", "-f", "-U", sock, "python", str(PLUGIN)]
        cmd += [f"syspath={syspath}", f"spec={spec_path}"]
        try:
            errors = open(os.path.join(self.dir, f"{export_id}.log"), "wb")  # nbdkit's messages (read errors)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
            errors.close()
        except FileNotFoundError:
            os.unlink(spec_path)
            raise TargetUnreachable("exports: nbdkit is not installed (Debian: nbdkit nbdkit-plugin-python)") from None
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    with open(os.path.join(self.dir, f"{export_id}.log"), "rb") as f:
                        why = f.read().decode(errors="replace").strip()
                    raise TargetUnreachable(f"backup_uuid: the export of {backup_uuid} did not start: {why[-500:]}")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TargetUnreachable(f"backup_uuid: the export of {backup_uuid} did not listen in time")
                time.sleep(0.05)
        finally:
            os.unlink(spec_path)  # the plugin has read it; the secrets do not stay on disk
        e = Export(export_id, bp.uuid, backup_uuid, sock, manifest.size, time.time() + lease_seconds, proc)
        with self._lock:
            self._exports[export_id] = e
        log.info("backup exported", extra={"export": export_id, "backup": backup_uuid, "socket": sock})
        return e

    def list(self) -> list[Export]:
        with self._lock:
            return list(self._exports.values())

    def unexport(self, export_id: str) -> None:
        with self._lock:
            e = self._exports.pop(export_id, None)
        if e is None:
            raise NotFound(f"export_id: no export {export_id}", field="export_id")
        self._end(e, "unexported")

    def _end(self, e: Export, why: str) -> None:
        e.proc.terminate()
        try:
            e.proc.wait(10)
        except subprocess.TimeoutExpired:
            e.proc.kill()
            e.proc.wait()
        for path in (e.socket, os.path.join(self.dir, f"{e.export_id}.log")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("export ended", extra={"export": e.export_id, "backup": e.backup_uuid, "why": why})

    def _reap(self) -> None:
        while not self._stop.wait(1.0):
            now = time.time()
            with self._lock:
                done = [e for e in self._exports.values() if e.expires_at <= now or e.proc.poll() is not None]
                for e in done:
                    del self._exports[e.export_id]
            for e in done:
                why = "lease ended" if e.expires_at <= now else f"nbdkit exited ({e.proc.poll()}): {self._errors(e)}"
                self._end(e, why)

    def _errors(self, e: Export) -> str:
        """The end of nbdkit's messages for this export."""
        try:
            with open(os.path.join(self.dir, f"{e.export_id}.log"), "rb") as f:
                return f.read()[-500:].decode(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def stop_all(self) -> None:
        self._stop.set()
        with self._lock:
            done, self._exports = list(self._exports.values()), {}
        for e in done:
            self._end(e, "agent stopping")
