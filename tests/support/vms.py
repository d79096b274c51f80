"""Running VMs for the live tests: real qemu-system processes without a
guest OS (the block layer needs none), KVM where /dev/kvm works, else TCG.
The guest's writes come from HMP `qemu-io` on each disk's own block
backend, as a guest's writes would land."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid as uuidlib
from pathlib import Path

QEMU = "qemu-system-x86_64"


def _blockdevs(spec: dict, name: str) -> list[dict]:
    """A json: image spec as -blockdev nodes, children first; the top is `name`."""
    out, node = [], dict(spec, **{"node-name": name})
    for key in ("file", "backing"):
        if isinstance(node.get(key), dict):
            out += _blockdevs(node[key], f"{name}{key[0]}")
            node[key] = f"{name}{key[0]}"
    return out + [node]


class Vm:
    def __init__(
        self,
        tmp: Path,
        disks: list,
        *,
        name: str = "vm",
        monitor: str = "qmp",
        drive: bool = False,
        qga: str = "",
        boot: tuple[Path, Path] | None = None,
        tpm: bool = False,
        werror: str = "",
    ):
        """monitor: how the QMP socket is given: "qmp" (-qmp unix:PATH),
        "chardev" (-chardev socket + -mon) or "config" (-readconfig: not on
        the command line at all); drive: open the disks with -drive
        (Proxmox's way: qemu names the file nodes itself) instead of explicit
        -blockdev nodes (libvirt's); qga: a guest agent channel, "server"
        (qemu serves it and no agent answers: no guest OS) or the socket of a
        FakeGuestAgent that qemu connects to; boot: (kernel, initramfs) of
        a real guest (support/guest.py), its console in self.console;
        tpm: a TPM 2.0 emulated by a real swtpm (its state in self.tpm_state);
        werror: the disks' write error action (enospc: pause on a full slice).
        A disk given as "json:{...}" becomes one -blockdev per node of it."""
        self.qmp_path = str(tmp / f"{name}-{os.getpid()}-{time.monotonic_ns()}.qmp")
        # a real guest's kernel hangs right after decompression under this machine's KVM: TCG for it
        accel = ["-accel", "tcg"] if boot else ["-accel", "kvm", "-accel", "tcg"]
        argv = [QEMU, *accel, "-nodefaults", "-nographic", "-machine", "q35"]
        self.uuid = str(uuidlib.uuid4())
        argv += ["-m", "256" if boot else "64", "-name", f"guest={name}", "-uuid", self.uuid]
        self.console = Path(self.qmp_path + ".console")
        if boot:
            argv += ["-kernel", str(boot[0]), "-initrd", str(boot[1]), "-append", "console=ttyS0 panic=-1"]
            argv += ["-serial", f"file:{self.console}", "-no-reboot"]
        if monitor == "qmp":
            argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        elif monitor == "chardev":
            argv += ["-chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off"]
            argv += ["-mon", "chardev=mon0,mode=control"]
        else:  # a monitor the agent only finds through its configured globs
            config = Path(self.qmp_path + ".cfg")
            config.write_text(
                f'[chardev "mon0"]\n  backend = "socket"\n  path = "{self.qmp_path}"\n'
                '  server = "on"\n  wait = "off"\n\n[mon "m0"]\n  chardev = "mon0"\n  mode = "control"\n'
            )
            argv += ["-readconfig", str(config)]
        self.swtpm: subprocess.Popen | None = None
        if tpm:
            self.tpm_state = Path(self.qmp_path + ".tpm")
            self.tpm_state.mkdir()
            ctrl = self.qmp_path + ".swtpm"
            self.swtpm = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}"]
                + ["--ctrl", f"type=unixio,path={ctrl}", "--terminate"],
                stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while not os.path.exists(ctrl):
                assert self.swtpm.poll() is None and time.monotonic() < deadline, "swtpm did not start"
                time.sleep(0.01)
            argv += ["-chardev", f"socket,id=chrtpm,path={ctrl}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm"]
            argv += ["-device", "tpm-crb,tpmdev=tpm0"]
        if qga:
            self.qga_path = str(tmp / f"{name}-{os.getpid()}-{time.monotonic_ns()}.qga") if qga == "server" else qga
            server = ",server=on,wait=off" if qga == "server" else ""
            argv += ["-chardev", f"socket,id=qga0,path={self.qga_path}{server}"]
            argv += ["-device", "virtio-serial-pci,id=vser0"]
            argv += ["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        for i, path in enumerate(disks):
            if isinstance(path, str) and path.startswith("json:"):  # a chain spelled out (a shared LUN's layers)
                nodes = _blockdevs(json.loads(path[5:]), f"d{i}")
                argv += [a for n in nodes for a in ("-blockdev", json.dumps(n))]
                argv += ["-device", f"virtio-blk-pci,drive=d{i},id=vd{i}" + (f",werror={werror}" if werror else "")]
                continue
            if isinstance(path, dict):  # a protocol node of qemu's own, such as {"driver": "rbd", ...}
                argv += ["-blockdev", json.dumps({"driver": "raw", "node-name": f"d{i}", "file": path})]
                argv += ["-device", f"virtio-blk-pci,drive=d{i},id=vd{i}"]
                continue
            if drive:
                argv += ["-drive", f"file={path},format=qcow2,if=none,id=drive{i}"]
                argv += ["-device", f"virtio-blk-pci,drive=drive{i},id=vd{i}"]
                continue
            argv += ["-blockdev", f"driver=file,filename={path},node-name=f{i}"]
            argv += ["-blockdev", f"driver=qcow2,file=f{i},node-name=d{i}"]
            argv += ["-device", f"virtio-blk-pci,drive=d{i},id=vd{i}"]
        self.log = Path(self.qmp_path + ".log")  # a file, not a pipe: qemu-io prints there, and a full pipe blocks qemu
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.01)
        while True:  # the socket exists before qemu has opened its disks: wait for the monitor
            try:
                self.qmp("query-status")
                break
            except ConnectionRefusedError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qemu did not start: {self.log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.01)

    def qmp(self, command: str, **arguments):
        """One QMP command on a connection of its own (the agent connects
        between the test's commands)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(self.qmp_path)
            f = s.makefile("rw")
            f.readline()
            for msg in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(msg) + "\n")
                f.flush()
                while "event" in (reply := json.loads(f.readline())):
                    pass
            assert "error" not in reply, reply
            return reply["return"]

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        """A guest write to disk `disk` (qemu-io on the device's backend)."""
        cmd = f'qemu-io -d /machine/peripheral/vd{disk}/virtio-backend "write -P {pattern:#x} {offset} {length}"'
        out = self.qmp("human-monitor-command", **{"command-line": cmd})
        assert "error" not in out.lower(), out

    def flush(self, disk: int) -> None:
        """The guest's flush: qemu writes its cached metadata to the files."""
        cmd = f'qemu-io -d /machine/peripheral/vd{disk}/virtio-backend "flush"'
        self.qmp("human-monitor-command", **{"command-line": cmd})

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._stop_swtpm()

    def _stop_swtpm(self) -> None:
        if self.swtpm is not None and self.swtpm.poll() is None:
            self.swtpm.terminate()
            self.swtpm.wait(10)

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except OSError:  # timeouts too: kill below
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._stop_swtpm()
