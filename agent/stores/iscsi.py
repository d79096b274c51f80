"""iSCSI backup points: a LUN reached through libiscsi in user space (no
kernel initiator), holding a raw-LUN repository (agent/stores/lun.py).

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
from agent.stores.blockdev import BLOCK, BlockDevice

DEFAULT_PORT = 3260


_INITIATOR = [""]  # [agent] iscsi_initiator, set once at start


def set_initiator_name(name: str) -> None:
    """This host's initiator name from the configuration ("": the default)."""
    if name and not name.startswith(("iqn.", "eui.", "naa.")):
        raise InvalidArgument(
            f"iscsi_initiator: {name!r} is not an iSCSI name (iqn.YYYY-MM.domain:name, eui. or naa.)",
            field="iscsi_initiator",
        )
    _INITIATOR[0] = name


def initiator_name() -> str:
    if _INITIATOR[0]:
        return _INITIATOR[0]
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
    # A session serves one call at a time, and each call drains its pipeline
    # of 1 MiB commands (native/iscsiio.c) before returning, so large calls
    # keep the pipeline full; two data sessions keep a second call in flight
    # while one drains (bench/targets_bench.py).
    io_size = 16 << 20
    io_depth = 2
    # the target caches writes (tgtd: its backing file's page cache); a
    # SYNCHRONIZE CACHE every 64 MiB in the background keeps it writing back
    # during the backup, so the last commit's flush is short.
    pace_every = 64 << 20

    def __init__(
        self,
        ip: str,
        target: str,
        lun: int = 0,
        *,
        port: int = 0,
        user: str = "",
        secret: str = "",
        timeout: float = 30.0,
        label: str = "",
    ):
        if not target:
            raise InvalidArgument("target: the target IQN is empty", field="target")
        self.portal = portal(ip, port)
        self.target = target
        self.lun = lun
        self.label = label or f"iscsi://{self.portal}/{target}/{lun}"
        self._user, self._secret = user, secret
        self._timeout = max(1, int(timeout))
        self._cv = threading.Condition()
        first = self._connect()
        self._idle = [first]  # data sessions not in a call
        self._open = 1  # data sessions logged in (idle or in a call), at most io_depth
        self._flush = None  # a session of its own for SYNCHRONIZE CACHE
        self._closed = False
        if BLOCK % first.block_size:
            self.close()
            raise InvalidArgument(
                f"lun: {self.label} has {first.block_size}-byte blocks; 512 or 4096 are supported", field="lun"
            )
        self.size = first.size
        self.sector_size = first.block_size
        self._local = _Buffers()

    def _connect(self):
        return _login(
            self.label,
            lambda: _native.IscsiLun(
                initiator_name(),
                self.portal,
                self.target,
                self.lun,
                user=self._user,
                secret=self._secret,
                timeout=self._timeout,
            ),
        )

    def _checkout(self):
        """An idle data session, or a new one while fewer than io_depth are
        open; else wait for one."""
        with self._cv:
            while not self._idle and self._open >= self.io_depth:
                self._cv.wait()
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._cv:
                self._open -= 1
                self._cv.notify()
            raise

    def _checkin(self, session, broken: bool = False) -> None:
        with self._cv:
            if broken or self._closed:
                self._open -= 1
            else:
                self._idle.append(session)
            self._cv.notify()
        if broken or self._closed:
            session.close()

    def _drop_idle(self) -> None:
        """Log out the idle data sessions: when one broke, the others went
        through the same network and target, and the next calls log in anew."""
        with self._cv:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cv.notify_all()
        for session in idle:
            session.close()

    def _data_call(self, op):
        """op on a data session. A session that fails is logged out with the
        idle ones, and the call is tried once more on a new login (if that
        login fails, the target is unreachable)."""
        session = self._checkout()
        try:
            result = op(session)
        except OSError:  # ConnectionError included: the session may be gone
            self._checkin(session, broken=True)
            self._drop_idle()
        except BaseException:
            self._checkin(session)
            raise
        else:
            self._checkin(session)
            return result
        session = self._checkout()
        try:
            result = op(session)
        except BaseException:
            self._checkin(session, broken=True)
            raise
        self._checkin(session)
        return result

    def read(self, offset: int, length: int) -> memoryview:
        buf = self._local.buf
        if length > len(buf):
            buf = self._local.buf = bytearray(length)
        view = memoryview(buf)[:length]
        self._data_call(lambda s: s.readinto(view, offset))
        return view

    def write(self, offset: int, data) -> None:
        self._data_call(lambda s: s.write(data, offset))

    def flush(self) -> None:
        """SYNCHRONIZE CACHE on a session of its own: the LUN has one cache,
        so the flush covers every write the target has answered on the data
        sessions, and the next pack's writes are not queued behind it (a
        flush of a large cache takes about a second here). Flushes at the
        same time each get a session (the spare one is logged out)."""
        with self._cv:
            session, self._flush = self._flush, None
        if session is None:
            session = self._connect()
        try:
            session.flush()
        except OSError:  # the session may be gone: once more on a new one
            session.close()
            session = self._connect()
            try:
                session.flush()
            except BaseException:
                session.close()
                raise
        with self._cv:
            if self._flush is None and not self._closed:
                self._flush, session = session, None
        if session is not None:
            session.close()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            sessions = self._idle + ([self._flush] if self._flush is not None else [])
            self._open -= len(self._idle)
            self._idle, self._flush = [], None
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


def discover(
    ip: str, port: int = 0, *, user: str = "", secret: str = "", timeout: float = 10.0, label: str = ""
) -> list[DiscoveredTarget]:
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
            session = _login(
                label,
                lambda iqn=iqn: _native.IscsiLun(
                    initiator_name(), p, iqn, 0, user=user, secret=secret, timeout=t, probe=True
                ),
            )
        except AuthFailed:
            out.append(DiscoveredTarget(iqn, p, [], "auth_failed"))
            continue
        try:
            luns = [DiscoveredLun(n, size) for n, size in session.report_luns() if size > 0]
        finally:
            session.close()
        out.append(DiscoveredTarget(iqn, p, luns))
    return out
