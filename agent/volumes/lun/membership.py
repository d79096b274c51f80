"""A host's membership of a shared pool: its host id lease, and the pool's
metadata owner lease when this host wins it.

Every host that serves the pool takes a host id and renews it; every host
is a candidate for the owner lease, and the lease elects one: a background
thread tries to take it (waiting out a holder that stopped renewing) and,
once it holds it, the keeper renews it. If a renewal fails for longer than
the lease allows, guard() refuses from then on, on_lost is told (the agent
pauses the VMs that write to the pool), and the thread becomes a candidate
again.

The owner also watches the other hosts' id leases with its own clock: one
that stops changing for its timeout plus the I/O timeout without being
released has lapsed (its agent died, or lost the LUN, while its VMs may
still write). With a fence callback, the owner fences such a host once per
lease generation; until that succeeds unfenced() names it, and the
driver holds back changes that a VM there could race.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.errors import Busy, FailedPrecondition
from agent.volumes.lun import format as fmt
from agent.volumes.lun.leases import DeltaLease, LeaseKeeper, LeaseLost, host_lease, lapsed_hosts, live_hosts
from agent.volumes.lun.table import PoolLun

log = logging.getLogger("agent.lun")


class Membership:
    def __init__(
        self,
        lun: PoolLun,
        host_uuid: str,
        *,
        timeout: float,
        io_timeout: float,
        candidate: bool = True,
        on_lost: Callable[[str], None] | None = None,
        address: str = "",
        fence: Callable[[str, str], None] | None = None,
    ):
        """fence(host uuid, its agent's address): cut a lapsed host off the
        LUN; returns once it is, raises when it could not."""
        self.lun = lun
        self.host_uuid = host_uuid
        self.timeout = timeout
        self.io_timeout = io_timeout
        self.candidate = candidate
        self.address = address
        self.fence = fence
        self._seen: dict[int, tuple[tuple[str, int, int], float]] = {}  # host id -> (lease state, since)
        self._fenced: set[tuple[str, int]] = set()  # (host uuid, lease generation) fenced
        self._unfenced: list[str] = []  # lapsed hosts not fenced yet (owner only)
        self.on_lost = on_lost or (lambda why: None)
        self.host: DeltaLease | None = None
        self._stop = threading.Event()
        self.owner_lease = DeltaLease(
            lun,
            fmt.OWNER_LEASE,
            host_uuid,
            timeout=timeout,
            io_timeout=io_timeout,
            sleep=self._pause,  # a stop ends the wait at once
            cancelled=self._stop.is_set,
            address=address,
        )
        self.keeper = LeaseKeeper(self._lost)
        self._threads: list[threading.Thread] = []

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    @property
    def what(self) -> str:
        return f"pool {self.lun.sb.pool_uuid}"

    def start(self) -> Membership:
        # the two leases are taken side by side: each waits 2 x io_timeout to settle
        name = f"lun-{self.lun.sb.pool_uuid[:8]}"
        self._threads = [
            threading.Thread(target=self._host_loop, name=f"{name}-host", daemon=True),
            threading.Thread(target=self._owner_loop, name=f"{name}-owner", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _host_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.host is None:
                    self.host = host_lease(
                        self.lun, self.host_uuid, timeout=self.timeout, io_timeout=self.io_timeout, address=self.address
                    )
                    self.keeper.add(self.host)
                    log.info("%s: joined as host id %d", self.what, self.host.index)
            except Exception as e:  # noqa: BLE001 - the LUN may be unreachable for a while; keep trying
                log.warning("%s: host lease: %s", self.what, e)
            self._stop.wait(self.io_timeout if self.host is None else self.timeout / 3)

    def _owner_loop(self) -> None:
        while self.candidate and not self._stop.is_set():
            try:
                if not self.owner_lease.valid():
                    self.owner_lease.acquire(wait=True)
                    self.keeper.add(self.owner_lease)
                    log.info("%s: this host is the metadata owner", self.what)
            except Busy as e:
                log.debug("%s: %s", self.what, e)
            except Exception as e:  # noqa: BLE001
                log.warning("%s: owner lease: %s", self.what, e)
            try:
                if self.owner_lease.valid():
                    self.watch_hosts()
            except Exception as e:  # noqa: BLE001 - the next pass looks again
                log.warning("%s: watching the host leases: %s", self.what, e)
            self._stop.wait(self.timeout / 3)

    def watch_hosts(self, now: float | None = None) -> list[str]:
        """The owner's pass over the host leases: returns the hosts that
        lapsed and are not fenced (after fencing those it can)."""
        now = time.monotonic() if now is None else now
        lapsed = {}
        leases = self.lun.read_host_leases()
        for i in list(self._seen):
            if i not in leases:
                del self._seen[i]
        for i, r in leases.items():
            if r.free or r.owner == self.host_uuid:
                self._seen.pop(i, None)
                continue
            state = (r.owner, r.generation, r.counter)
            seen = self._seen.get(i)
            if seen is None or seen[0] != state:
                self._seen[i] = (state, now)
            elif now - seen[1] > max(self.timeout, r.timeout_ms / 1000) + self.io_timeout:
                if (r.owner, r.generation) not in self._fenced:
                    lapsed[r.owner] = r
        unfenced = []
        for host, r in sorted(lapsed.items()):
            if self.fence is None:
                continue
            try:
                self.fence(host, r.address)
            except Exception as e:  # noqa: BLE001 - named in unfenced(), tried again at the next pass
                log.error("%s: could not fence host %s: %s", self.what, host, e)
                unfenced.append(host)
                continue
            self._fenced.add((host, r.generation))
            log.warning("%s: fenced host %s (its host lease lapsed)", self.what, host, extra={"host": host})
        self._unfenced = unfenced
        return unfenced

    def fenced(self, host: str, generation: int) -> bool:
        """Whether this owner fenced the host's lease of that generation."""
        return (host, generation) in self._fenced

    def unfenced(self) -> list[str]:
        """Hosts whose lease lapsed and that could not be fenced yet (their
        VMs may still write); empty without a fence callback."""
        return list(self._unfenced) if self.owner_lease.valid() else []

    @property
    def state(self) -> str:
        if self.is_owner:
            return "owner"
        return "member" if self.host is not None else "joining"

    def _lost(self, lease: DeltaLease, why: str) -> None:
        if lease is self.host:
            self.host = None
        self.on_lost(f"{lease.what}: {why}")

    def guard(self) -> int:
        """For the slice table: the owner lease's generation, or refused."""
        try:
            return self.owner_lease.guard()
        except LeaseLost:
            raise FailedPrecondition(f"{self.what}: this host does not hold the metadata owner lease") from None

    @property
    def is_owner(self) -> bool:
        return self.owner_lease.valid()

    def owner(self) -> str:
        """The host uuid the owner lease names ("" when free or unreadable)."""
        rec = self.owner_lease.peek()
        return rec.owner if rec is not None and not rec.free else ""

    def owner_address(self) -> str:
        """Where the owner's agent answers ("" when it gave none, or no owner)."""
        rec = self.owner_lease.peek()
        return rec.address if rec is not None and not rec.free else ""

    def live_hosts(self) -> list[str]:
        return sorted(live_hosts(self.lun))

    def lapsed_hosts(self) -> list[str]:
        return lapsed_hosts(self.lun)

    def wait_owner(self, timeout: float) -> bool:
        """Wait until this host holds the owner lease, at most timeout seconds."""
        return _wait(lambda: self.is_owner, timeout)

    def stop(self, *, vms_left: bool = False) -> None:
        """Release both leases (a clean stop: successors need not wait).
        vms_left: VMs on this host still use the pool, so the host lease is
        handed over instead: the other hosts keep treating this host as
        present (changes of heads wait for its agent, or it lapses and is
        fenced), and this host's next agent takes it back at once."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 2 * self.io_timeout + 5)
        self.keeper.stop()
        for lease in (self.owner_lease, self.host):
            if lease is not None:
                try:
                    lease.release(hand_over=vms_left and lease is self.host)
                except OSError as e:
                    log.warning("%s: could not release %s: %s", self.what, lease.what, e)

    def handed_over(self) -> list[str]:
        """Other hosts whose agent stopped while their VMs used the pool (and
        that this owner has not fenced since)."""
        return sorted(
            r.owner
            for r in self.lun.read_host_leases().values()
            if r.flags & fmt.HANDED_OVER
            and not r.free
            and r.owner != self.host_uuid
            and not self.fenced(r.owner, r.generation)
        )


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    ev = threading.Event()
    deadline = timeout
    step = 0.05
    while deadline > 0:
        if pred():
            return True
        ev.wait(step)
        deadline -= step
    return pred()
