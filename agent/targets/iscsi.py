"""iSCSI backup points: a LUN reached through libiscsi in user space (no
kernel initiator), holding a raw-LUN repository (agent/targets/lun.py).

The CHAP secret is handed to libiscsi in memory only: never argv, never a
log line or an error message. A session that fails is logged out; the next
call logs in again once, and a target that then does not answer makes the
backup point unreachable.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from agent import _native
from agent.errors import AuthFailed, InvalidArgument, TargetUnreachable
from agent.targets.blockdev import BLOCK, BlockDevice

DEFAULT_PORT = 3260


def initiator_name() -> str:
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname().lower()) or "host"
    return f"iqn.2026-11.io.blockferry:{host}"


def portal(ip: str, port: int = 0) -> str:
    if not ip:
        raise InvalidArgument("ip: the iSCSI portal address is empty", field="ip")
    host = f"[{ip}]" if ":" in ip and not ip.startswith("[") else ip
    return f"{host}:{port or DEFAULT_PORT}"


def _login(label: str, call):
    try:
        return call()
    except PermissionError:
        raise AuthFailed(f"backup point {label}: the target refused the CHAP credentials", field="secret") from None
    except ConnectionError as e:
        raise TargetUnreachable(f"backup point {label}: {e}", field="backup_point_uuid") from None


class _Buffers(threading.local):
    def __init__(self):
        self.buf = bytearray(4 << 20)


class IscsiBlockDevice(BlockDevice):
    # One session serializes the calls, and each call drains its pipeline of
    # 1 MiB commands (native/iscsiio.c) before returning: 16 MiB per call
    # measured 1.1 GB/s against 0.5 GB/s with 4 MiB, and one more call
    # queued behind it gained nothing.
    io_size = 16 << 20
    io_depth = 1

    def __init__(self, ip: str, target: str, lun: int = 0, *, port: int = 0, user: str = "", secret: str = "",
                 timeout: float = 30.0, label: str = ""):
        if not target:
            raise InvalidArgument("target: the target IQN is empty", field="target")
        self.portal = portal(ip, port)
        self.target = target
        self.lun = lun
        self.label = label or f"iscsi://{self.portal}/{target}/{lun}"
        self._user, self._secret = user, secret
        self._timeout = max(1, int(timeout))
        self._lock = threading.Lock()
        self._sessions = {"data": self._connect(), "flush": None}
        first = self._sessions["data"]
        if BLOCK % first.block_size:
            self.close()
            raise InvalidArgument(f"lun: {self.label} has {first.block_size}-byte blocks; 512 or 4096 "
                                  "are supported", field="lun")
        self.size = first.size
        self._local = _Buffers()

    def _connect(self):
        return _login(self.label, lambda: _native.IscsiLun(initiator_name(), self.portal, self.target, self.lun,
                                                           user=self._user, secret=self._secret,
                                                           timeout=self._timeout))

    def _get(self, which: str):
        with self._lock:
            if self._sessions[which] is None:
                self._sessions[which] = self._connect()
            return self._sessions[which]

    def _drop(self, which: str, session) -> None:
        with self._lock:
            if self._sessions[which] is session:
                self._sessions[which] = None
        session.close()

    def _call(self, op, which: str = "data"):
        session = self._get(which)
        try:
            return op(session)
        except OSError:  # ConnectionError included
            pass
        # the session may be gone: log in again once; if that fails, the target is unreachable
        self._drop(which, session)
        return op(self._get(which))

    def read(self, offset: int, length: int) -> memoryview:
        buf = self._local.buf
        if length > len(buf):
            buf = self._local.buf = bytearray(length)
        view = memoryview(buf)[:length]
        self._call(lambda s: s.readinto(view, offset))
        return view

    def write(self, offset: int, data) -> None:
        self._call(lambda s: s.write(data, offset))

    def flush(self) -> None:
        """SYNCHRONIZE CACHE on a session of its own: the LUN has one cache,
        so the flush covers every write the target has answered on the data
        session, and the next pack's writes are not queued behind it (a
        session serves one call at a time; a flush of a large cache takes
        about a second here)."""
        self._call(lambda s: s.flush(), "flush")

    def close(self) -> None:
        with self._lock:
            sessions = [x for x in self._sessions.values() if x is not None]
            self._sessions = {"data": None, "flush": None}
        for session in sessions:
            session.close()


@dataclass(frozen=True)
class DiscoveredLun:
    lun: int
    size: int


@dataclass(frozen=True)
class DiscoveredTarget:
    iqn: str
    portal: str
    luns: list[DiscoveredLun]
    state: str = "ok"  # ok, or auth_failed when the target refuses these credentials


def discover(ip: str, port: int = 0, *, user: str = "", secret: str = "", timeout: float = 10.0,
             label: str = "") -> list[DiscoveredTarget]:
    """SendTargets on a portal, then each target's LUNs with their sizes
    (LUNs without a capacity, like a controller LUN 0, are left out). A
    target that refuses the given credentials is listed with state
    auth_failed and no LUNs."""
    p = portal(ip, port)
    label = label or f"iscsi://{p}"
    t = max(1, int(timeout))
    names = _login(label, lambda: _native.iscsi_discover(initiator_name(), p, user=user, secret=secret, timeout=t))
    out = []
    for iqn in names:
        try:
            session = _login(label, lambda: _native.IscsiLun(initiator_name(), p, iqn, 0, user=user,
                                                             secret=secret, timeout=t, probe=True))
        except AuthFailed:
            out.append(DiscoveredTarget(iqn, p, [], "auth_failed"))
            continue
        try:
            luns = [DiscoveredLun(n, size) for n, size in session.report_luns() if size > 0]
        finally:
            session.close()
        out.append(DiscoveredTarget(iqn, p, luns))
    return out
