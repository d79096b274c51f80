"""A fence command for tgtd, as an operator would write one for their
target (docs/shared-pools.md, "Fencing"): the metadata owner runs it with
the lapsed host's uuid in BLOCKFERRY_FENCE_HOST; it looks up the host's
initiator name, unbinds it from the target's ACL (no new login) and closes
the sessions it has (its agent's and its VMs'), then exits 0.

Usage: tgt_fence.py CONTROL TID HOSTMAP [GATE]
HOSTMAP: a JSON file, host uuid -> initiator name. GATE: a file that must
exist, else it fails (a fence device that does not answer yet). Every run
is appended to HOSTMAP + ".log".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def adm(control: str, *args: str) -> str:
    return subprocess.run(
        ["tgtadm", "-C", control, "--lld", "iscsi", *args], check=True, capture_output=True, text=True
    ).stdout


def main(control: str, tid: str, hostmap: str, gate: str = "") -> int:
    host = os.environ["BLOCKFERRY_FENCE_HOST"]
    with open(hostmap + ".log", "a") as log:
        if gate and not os.path.exists(gate):
            log.write(f"refused {host}\n")
            print("the fence device does not answer", file=sys.stderr)
            return 1
        with open(hostmap) as f:
            initiator = json.load(f)[host]
        adm(control, "--op", "unbind", "--mode", "target", "--tid", tid, "--initiator-name", initiator)
        nexus, who, mine = None, "", False
        for line in adm(control, "--op", "show", "--mode", "target").splitlines():
            key, _, value = line.strip().partition(": ")
            if line.startswith("Target "):
                mine = line.split()[1].rstrip(":") == tid
            elif mine and key == "I_T nexus":
                nexus = value
            elif mine and key == "Initiator":
                who = value.split()[0]
            elif mine and key == "Connection" and who == initiator and nexus is not None:
                adm(control, "--op", "delete", "--mode", "conn", "--tid", tid, "--sid", nexus, "--cid", value)
        log.write(f"fenced {host} {initiator}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
