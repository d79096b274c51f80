"""Freezing a guest's filesystems around a snapshot.

With a guest agent that answers, the guest flushes and freezes its
filesystems, the snapshot is taken, and the guest thaws: the snapshot is
application-consistent. Without one (no channel, no agent in the guest, a
refusal, no answer within the timeout) the snapshot goes on
crash-consistent, as if the power had been cut at that instant, and says
why. A thaw is sent on every exit path once a freeze was sent, including
when the freeze did not answer in time (the agent runs commands in order, so
the thaw follows a late freeze).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.errors import BlockferryError
from agent.hypervisor.base import RunningVm
from agent.hypervisor.qga import GuestAgent

log = logging.getLogger("agent.hypervisor")

APPLICATION = "application"  # the guest froze its filesystems for the snapshot
CRASH = "crash"  # taken while the guest ran: what a power cut leaves
OFFLINE = "offline"  # no VM held the volume


@dataclass
class Freeze:
    consistency: str = CRASH
    reason: str = ""  # why the snapshot is crash-consistent
    filesystems: int = 0  # frozen by the guest
    frozen_ms: float = 0.0  # from the freeze's answer to the thaw's


@contextmanager
def guest_frozen(socket_path: str | None, vm_name: str, *, timeout: float, wanted: bool = True) -> Iterator[Freeze]:
    state = Freeze()
    if not wanted:
        state.reason = "guest freeze not asked for"
        yield state
        return
    if not socket_path:
        state.reason = "the VM has no guest agent channel"
        yield state
        return
    ga: GuestAgent | None = None
    sent = False
    try:
        ga = GuestAgent(socket_path, timeout=timeout)
        ga.sync()
        sent = True
        state.filesystems = int(ga.execute("guest-fsfreeze-freeze") or 0)
        state.consistency = APPLICATION
    except BlockferryError as e:
        state.reason = e.message
        log.warning("guest freeze failed: the snapshot is crash-consistent", extra={"vm": vm_name, "error": e.message})
    started = time.monotonic()
    try:
        yield state
    finally:
        state.frozen_ms = (time.monotonic() - started) * 1000 if state.consistency == APPLICATION else 0.0
        if ga is not None:
            if sent:
                _thaw(ga, vm_name)
            ga.close()


def _thaw(ga: GuestAgent, vm_name: str) -> None:
    try:
        ga.execute("guest-fsfreeze-thaw")
    except BlockferryError as e:  # sent all the same: a guest still freezing reads it next
        log.error(
            "guest thaw did not answer; the guest may stay frozen until its agent reads it",
            extra={"vm": vm_name, "error": e.message},
        )


def vm_definition(vm: RunningVm) -> str:
    """The VM's definition, or "" when it cannot be had (logged: a snapshot
    does not fail for it)."""
    try:
        return str(vm.definition())
    except BlockferryError as e:
        log.warning("the VM's definition could not be read", extra={"vm": vm.name, "error": e.message})
        return ""
