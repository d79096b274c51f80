"""Which processes hold a file open, and where a qemu's QMP socket is.

A file is matched by device and inode, never by name: a live snapshot
renames a VM's top layer while the VM keeps it open, so names change under
a running qemu. The QMP socket comes from the process's command line
(`-qmp unix:PATH,...`, or `-chardev socket,id=ID,path=PATH,...` with
`-mon chardev=ID,mode=control`), and the guest agent's channel from the
`virtserialport` named org.qemu.guest_agent.0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROC = "/proc"


@dataclass(frozen=True)
class Holder:
    pid: int
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else "?"


def holders(path: str) -> list[Holder]:
    """The processes that have the file at path open (those this agent may
    look at: it runs as root on a hypervisor host)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    want = (st.st_dev, st.st_ino)
    found = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        fd_dir = f"{PROC}/{entry.name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to see
            continue
        for fd in fds:
            try:
                s = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (s.st_dev, s.st_ino) == want:
                found.append(Holder(int(entry.name), _argv(int(entry.name))))
                break
    return found


def qemu_processes() -> list[Holder]:
    """The qemu processes whose command line names a QMP socket."""
    found = []
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            argv = _argv(int(entry.name))
            if argv and os.path.basename(argv[0]).startswith("qemu") and qmp_socket(argv):
                found.append(Holder(int(entry.name), argv))
    return found


def _argv(pid: int) -> tuple[str, ...]:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def _options(text: str) -> dict[str, str]:
    """qemu's `key=value,key2=value2` (a bare first word is "backend")."""
    out = {}
    for i, part in enumerate(text.split(",")):
        key, eq, value = part.partition("=")
        if eq:
            out[key] = value
        elif i == 0:
            out["backend"] = key
        else:
            out[key] = "on"
    return out


def qmp_socket(argv: tuple[str, ...]) -> str | None:
    """The unix socket of the process's QMP monitor, from its command line."""
    args = [a[1:] if a.startswith("--") else a for a in argv]
    chardevs, monitors = {}, []
    for flag, value in zip(args, args[1:], strict=False):
        if flag in ("-qmp", "-qmp-pretty") and value.startswith("unix:"):
            return value[len("unix:") :].split(",", 1)[0]
        if flag == "-chardev":
            opts = _options(value)
            if opts.get("backend") == "socket" and "path" in opts and "id" in opts:
                chardevs[opts["id"]] = opts["path"]
        elif flag == "-mon":
            opts = _options(value)
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
    for chardev in monitors:
        if chardev in chardevs:
            return chardevs[chardev]
    return None


GUEST_AGENT_PORT = "org.qemu.guest_agent.0"


def pflash_files(argv: tuple[str, ...]) -> list[str]:
    """The firmware variable stores (NVRAM) of a VM: `-drive if=pflash,file=...`."""
    args = [a[1:] if a.startswith("--") else a for a in argv]
    out = []
    for flag, value in zip(args, args[1:], strict=False):
        opts = _options(value)
        if flag == "-drive" and opts.get("if") == "pflash" and "file" in opts:
            out.append(opts["file"])
    return out


def nvram_stores(argv: tuple[str, ...]) -> list[str]:
    """The pflash files the VM writes (its UEFI variables): not readonly=on."""
    args = [a[1:] if a.startswith("--") else a for a in argv]
    out = []
    for flag, value in zip(args, args[1:], strict=False):
        opts = _options(value)
        if flag == "-drive" and opts.get("if") == "pflash" and "file" in opts and opts.get("readonly") != "on":
            out.append(opts["file"])
    return out


def tpm_sockets(argv: tuple[str, ...]) -> list[str]:
    """The swtpm control sockets a VM's TPM emulators talk to:
    `-tpmdev emulator,chardev=C` with `-chardev socket,id=C,path=P`."""
    args = [a[1:] if a.startswith("--") else a for a in argv]
    chardevs, used = {}, []
    for flag, value in zip(args, args[1:], strict=False):
        opts = _options(value)
        if flag == "-chardev" and opts.get("backend") == "socket" and "path" in opts and "id" in opts:
            chardevs[opts["id"]] = opts["path"]
        elif flag == "-tpmdev" and opts.get("backend") == "emulator" and "chardev" in opts:
            used.append(opts["chardev"])
    return [chardevs[c] for c in used if c in chardevs]


def swtpm_state_files(*, ctrl_socket: str = "", names: str = "") -> list[str]:
    """The state files of the swtpm processes serving a VM's TPM: those
    whose control socket is ctrl_socket (`--ctrl type=unixio,path=...`), or
    whose state directory's path contains `names` (libvirt puts the
    domain's uuid there). Its lock file is no state."""
    files = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        argv = _argv(int(entry.name))
        if not argv or os.path.basename(argv[0]) != "swtpm":
            continue
        ctrl = state = ""
        for flag, value in zip(argv, argv[1:], strict=False):
            opts = _options(value)
            if flag == "--ctrl":
                ctrl = opts.get("path", "")
            elif flag == "--tpmstate":
                state = opts.get("dir", "")
        if not state or not os.path.isdir(state):
            continue
        if (ctrl_socket and ctrl and os.path.realpath(ctrl) == os.path.realpath(ctrl_socket)) or (
            names and names in state
        ):
            files += sorted(os.path.join(state, f) for f in os.listdir(state) if not f.startswith("."))
    return files


def qga_socket(argv: tuple[str, ...]) -> str | None:
    """The unix socket of the VM's guest agent channel, from its command
    line: a `-chardev socket` that a `virtserialport` named
    org.qemu.guest_agent.0 uses."""
    args = [a[1:] if a.startswith("--") else a for a in argv]
    chardevs, ports = {}, []
    for flag, value in zip(args, args[1:], strict=False):
        opts = _options(value)
        if flag == "-chardev" and opts.get("backend") == "socket" and "path" in opts and "id" in opts:
            chardevs[opts["id"]] = opts["path"]
        elif flag == "-device" and opts.get("backend") == "virtserialport" and opts.get("name") == GUEST_AGENT_PORT:
            ports.append(opts.get("chardev", ""))
    return next((chardevs[c] for c in ports if c in chardevs), None)
