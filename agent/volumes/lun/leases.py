"""Delta leases on a shared pool's LUN: one block per host id, and one for
the pool's metadata owner (the only host that changes the slice table).

A holder renews its lease by rewriting its block with counter+1 every
timeout/3. Others never compare clocks: a lease is judged dead only when its
bytes did not change for longer than timeout + io_timeout of the watcher's
own monotonic clock. Taking a lease:

1. read it; if held and not released, watch it for timeout + io_timeout;
   any change means its holder lives (Busy, naming it);
2. write our record (generation+1) within io_timeout of the read that found
   it free or dead, else start again;
3. wait 2 x io_timeout and read it back: another host that decided at the
   same time has written by then, and only the last writer sees its own
   record (the others get Busy).

The holder trusts its lease only until timeout - io_timeout after the start
of its last successful renewal: past that it writes nothing more (valid()
is false), well before a successor may take over. On iSCSI the metadata
owner also fences a dead host's writes with a persistent-reservation
preempt (docs/shared-pools.md).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from agent.errors import Busy, FailedPrecondition, NoSpace
from agent.volumes.lun import format as fmt
from agent.volumes.lun.format import LeaseRecord
from agent.volumes.lun.table import PoolLun

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
DEFAULT_IO_TIMEOUT = 5.0


class LeaseLost(FailedPrecondition):
    """The lease is no longer this host's (not renewed in time, or taken)."""


class DeltaLease:
    def __init__(
        self,
        lun: PoolLun,
        index: int,
        owner: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        io_timeout: float = DEFAULT_IO_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        cancelled: Callable[[], bool] = lambda: False,
        address: str = "",
    ):
        if timeout <= 3 * io_timeout:
            raise ValueError(f"lease timeout {timeout}s must exceed 3 x io_timeout ({io_timeout}s)")
        self.lun = lun
        self.index = index
        self.owner = owner
        self.timeout = timeout
        self.io_timeout = io_timeout
        self.clock = clock
        self.sleep = sleep
        self.cancelled = cancelled  # true: a waiting acquire gives up (the agent stops)
        self.address = address  # written into the lease: where this host's agent answers
        self.offset = fmt.lease_offset(index)
        self.held: LeaseRecord | None = None
        self.renewed_at = 0.0  # our clock when the last successful renewal started
        self._lock = threading.Lock()

    @property
    def what(self) -> str:
        name = "metadata owner lease" if self.index == fmt.OWNER_LEASE else f"host id {self.index} lease"
        return f"pool {self.lun.sb.pool_uuid}: {name}"

    def peek(self) -> LeaseRecord | None:
        """The block as it is now (None when torn)."""
        return LeaseRecord.unpack(self.lun.read_block(self.offset))

    def acquire(self, *, wait: bool = True) -> LeaseRecord:
        """Take the lease; Busy when another host holds it (at once when not
        wait, else after watching it renewed)."""
        with self._lock:
            seen, t_seen = self.peek(), self.clock()
            ours = seen is not None and seen.owner == self.owner and bool(seen.flags & fmt.HANDED_OVER)
            if (seen is None or not seen.free) and not ours:
                if not wait:
                    raise Busy(f"{self.what} is held by host {_holder(seen)}")
                seen, t_seen = self._watch(seen, t_seen)
            rec = LeaseRecord(
                host_id=self.index,
                owner=self.owner,
                generation=(seen.generation if seen else 0) + 1,
                counter=0,
                timestamp_ms=int(time.time() * 1000),
                timeout_ms=int(self.timeout * 1000),
                address=self.address,
            )
            self.lun.write_block(self.offset, rec.pack())
            if self.clock() - t_seen > self.io_timeout:
                raise Busy(f"{self.what}: writing it took longer than {self.io_timeout}s; try again")
            self.sleep(2 * self.io_timeout)
            if self.cancelled():
                raise Busy(f"{self.what}: stopped before it settled (this host is leaving the pool)")
            back = self.peek()
            if back != rec:
                raise Busy(f"{self.what}: host {_holder(back)} took it at the same time")
            self.held, self.renewed_at = rec, t_seen
            log.info("%s acquired (generation %d)", self.what, rec.generation)
            return rec

    def _watch(self, seen: LeaseRecord | None, since: float) -> tuple[LeaseRecord | None, float]:
        """Watch a held lease for timeout + io_timeout: its last bytes and the
        time they were read, once it proved dead or was released."""
        deadline = since + self.timeout + self.io_timeout
        step = min(1.0, self.timeout / 4)
        while True:
            now = self.clock()
            if now > deadline:
                log.warning("%s: holder %s did not renew for %.1fs; taking over", self.what, _holder(seen), now - since)
                return seen, now
            self.sleep(min(step, deadline - now + 0.01))
            if self.cancelled():
                raise Busy(f"{self.what}: stopped waiting (this host is leaving the pool)")
            cur = self.peek()
            if cur is not None and cur.free:
                return cur, self.clock()
            if cur != seen:
                raise Busy(f"{self.what} is held by host {_holder(cur)}, which renews it")

    def renew(self) -> LeaseRecord:
        """Rewrite the lease with counter+1; LeaseLost when it is not ours anymore."""
        with self._lock:
            if self.held is None:
                raise LeaseLost(f"{self.what} is not held by this host")
            start = self.clock()
            cur = self.peek()
            if cur != self.held:
                self.held = None
                raise LeaseLost(f"{self.what} was taken by host {_holder(cur)}")
            rec = dataclasses.replace(cur, counter=cur.counter + 1, timestamp_ms=int(time.time() * 1000))
            self.lun.write_block(self.offset, rec.pack())
            if self.clock() - start > self.io_timeout:
                # written, but too late to count: the next renewal must make it in time
                self.held = rec
                raise LeaseLost(f"{self.what}: renewal took longer than {self.io_timeout}s")
            self.held, self.renewed_at = rec, start
            return rec

    def valid(self) -> bool:
        """True while this host may act on the lease (write the table)."""
        return self.held is not None and self.clock() - self.renewed_at < self.timeout - self.io_timeout

    def guard(self) -> int:
        """For the slice table: the lease's generation, or LeaseLost."""
        held = self.held
        if held is None or not self.valid():
            raise LeaseLost(f"{self.what} is not valid on this host; the slice table is not written")
        return held.generation

    def release(self, *, hand_over: bool = False) -> None:
        """Free the lease for others; hand_over: keep it held for everyone
        but this host's next agent (VMs here still use the pool), which
        takes it back at once."""
        with self._lock:
            if self.held is None:
                return
            cur = self.peek()
            if cur == self.held:
                flag = fmt.HANDED_OVER if hand_over else fmt.RELEASED
                self.lun.write_block(self.offset, dataclasses.replace(cur, flags=cur.flags | flag).pack())
            self.held = None


def host_lease(
    lun: PoolLun,
    host_uuid: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    io_timeout: float = DEFAULT_IO_TIMEOUT,
    address: str = "",
) -> DeltaLease:
    """This host's id lease, acquired: the id it held before, else the first
    free one. address: where this host's agent answers (the owner asks it
    which of its VMs use a slice)."""
    blocks = [(i, LeaseRecord.unpack(lun.read_block(fmt.lease_offset(i)))) for i in range(1, fmt.LEASE_BLOCKS)]
    mine = [i for i, r in blocks if r is not None and r.owner == host_uuid]
    free = [i for i, r in blocks if r is not None and r.free]
    for index in mine[:1] + free:
        lease = DeltaLease(lun, index, host_uuid, timeout=timeout, io_timeout=io_timeout, address=address)
        try:
            # our own old id may still look alive after a restart: wait it out
            lease.acquire(wait=index in mine)
            return lease
        except Busy:
            continue
    raise NoSpace(f"pool {lun.sb.pool_uuid}: all {fmt.MAX_HOSTS} host ids are held")


def live_hosts(lun: PoolLun, *, slack: float = 2.0) -> dict[str, LeaseRecord]:
    """Host uuid -> lease, for the host leases not released and renewed
    within slack x their timeout by their holder's wall clock (a report for
    people and for AvailHosts; taking over never trusts clocks)."""
    now_ms = time.time() * 1000
    out = {}
    for r in lun.read_host_leases().values():
        if not r.free and now_ms - r.timestamp_ms < slack * r.timeout_ms:
            out[r.owner] = r
    return out


def lapsed_hosts(lun: PoolLun, *, slack: float = 2.0) -> list[str]:
    """Hosts whose lease is neither released nor renewed within slack x its
    timeout by its holder's last stamp (their agent died or lost the LUN;
    a report, as live_hosts is; fencing trusts the owner's own clock)."""
    now_ms = time.time() * 1000
    leases = [r for r in lun.read_host_leases().values() if not r.free]  # one read: a host joining
    live = {r.owner for r in leases if now_ms - r.timestamp_ms < slack * r.timeout_ms}  # meanwhile is not lapsed
    return sorted({r.owner for r in leases if r.owner not in live})


class LeaseKeeper:
    """Renews leases every timeout/3 in a thread; on_lost(lease, reason) is
    called once for a lease that could not be renewed (the caller stops
    writing and pauses its VMs)."""

    def __init__(self, on_lost: Callable[[DeltaLease, str], None]):
        self.on_lost = on_lost
        self._leases: list[DeltaLease] = []
        self._stop = threading.Event()
        self._cond = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, lease: DeltaLease) -> None:
        with self._cond:
            self._leases.append(lease)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lun-leases", daemon=True)
            self._thread.start()

    def remove(self, lease: DeltaLease) -> None:
        with self._cond:
            if lease in self._leases:
                self._leases.remove(lease)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                leases = list(self._leases)
            interval = min((lease.timeout / 3 for lease in leases), default=1.0)
            for lease in leases:
                try:
                    lease.renew()
                except Exception as e:  # noqa: BLE001 - any failure to renew is a lost lease
                    if not lease.valid():
                        self.remove(lease)
                        log.error("%s lost: %s", lease.what, e)
                        self.on_lost(lease, str(e))
                    else:
                        log.warning("%s: renewal failed, retrying: %s", lease.what, e)
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def _holder(rec: LeaseRecord | None) -> str:
    if rec is None:
        return "(unreadable: torn lease block)"
    return f"{rec.owner} (host id {rec.host_id}, generation {rec.generation})"
