"""Fencing a host of a shared pool: the operator's fence command.

SCSI persistent reservations cannot fence here (docs/shared-pools.md,
"Fencing"), so the metadata owner cuts a lapsed host off the storage
through a command the operator configures (`fence_command`, an argv run
without a shell): on an iSCSI target, unbinding the host's initiator name
and closing its sessions; on an FC fabric, removing the host's ports from
the LUN's zone or masking; or powering the host off. It learns which host
from its environment and must exit 0 only once that host's I/O can no
longer reach the LUN.
"""

from __future__ import annotations

import logging

from agent import procs

log = logging.getLogger("agent.lun")

TIMEOUT = 120.0


class FenceCommand:
    def __init__(self, argv: list[str], pool_uuid: str, *, timeout: float = TIMEOUT):
        self.argv = list(argv)
        self.pool_uuid = pool_uuid
        self.timeout = timeout

    def __call__(self, host: str, address: str) -> None:
        """Fence host (its uuid; address: where its agent answered). Raises
        CommandFailed when the command fails or times out."""
        env = {
            "BLOCKFERRY_POOL": self.pool_uuid,
            "BLOCKFERRY_FENCE_HOST": host,
            "BLOCKFERRY_FENCE_ADDRESS": address,
        }
        log.warning("fencing a host whose lease lapsed", extra={"pool": self.pool_uuid, "host": host})
        procs.run(self.argv, timeout=self.timeout, env=env, what="fence_command")
