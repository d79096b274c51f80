"""Run a command under a unit's SystemCallFilter deny list, as systemd
would (no systemd as PID 1 here): python -m support.seccomp_exec
'@clock @debug ...' -- command args. Every system call of the named
groups (their members as `systemd-analyze syscall-filter` lists them)
fails with EPERM, like SystemCallErrorNumber=EPERM; the filter is
inherited by every child (qemu-nbd, qemu-img). Uses libseccomp through
ctypes: the system's libseccomp.so.2, the library systemd itself uses."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


def members(groups: list[str]) -> set[str]:
    """The system calls of the groups, recursively, as systemd defines them."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", *groups], capture_output=True, text=True, check=True)
    names: set[str] = set()
    for line in out.stdout.splitlines():
        s = line.strip()
        if not s or s.startswith("#") or not line.startswith(" "):
            continue
        names |= members([s]) if s.startswith("@") else {s}
    return names


def main() -> None:
    sep = sys.argv.index("--")
    groups = sys.argv[1].split()
    cmd = sys.argv[sep + 1 :]
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    denied = 0
    for name in sorted(members(groups)):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a system call of this architecture
        if lib.seccomp_rule_add(ctx, scmp_act_errno(errno.EPERM), nr, 0) == 0:
            denied += 1
    if denied == 0 or lib.seccomp_load(ctx) != 0:
        sys.exit("seccomp: no filter loaded")
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
