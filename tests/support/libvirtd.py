"""A session-mode libvirtd for the tests, run as an unprivileged user with
its HOME and XDG directories in a private folder (as root it would write
into /run/libvirt and /var/lib/libvirt). /dev/kvm is root-only, so its
domains are type='qemu' (TCG). The agent, as root, connects to its socket.
The guest's writes come from HMP qemu-io through libvirt's monitor
passthrough, which only the tests use."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from xml.sax.saxutils import quoteattr

USER = "nobody"


def give_to(path: Path, user: str = USER) -> None:
    """Let the session's qemu open a file: owned by the user, its folders traversable."""
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    p = path.parent
    while p != p.parent:
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)
        p = p.parent


class SessionLibvirtd:
    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        give_to(base)
        base.chmod(0o755)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(base),
            "XDG_RUNTIME_DIR": str(base / "run"),
            "XDG_CONFIG_HOME": str(base / "config"),
            "XDG_CACHE_HOME": str(base / "cache"),
            "XDG_DATA_HOME": str(base / "data"),
        }
        self.socket = base / "run" / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.proc: subprocess.Popen | None = None
        self.conn = None

    def start(self) -> SessionLibvirtd:
        pw = pwd.getpwnam(USER)
        for d in ("run", "config", "cache", "data"):
            (self.base / d).mkdir(exist_ok=True)
            os.chown(self.base / d, pw.pw_uid, pw.pw_gid)
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "libvirtd"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "libvirtd.log", "ab"),
            start_new_session=True,
        )
        import libvirt

        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited: {(self.base / 'libvirtd.log').read_text()[-2000:]}")
            if self.socket.exists():
                try:
                    self.conn = libvirt.open(self.uri)
                    return self
                except libvirt.libvirtError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("libvirtd did not open its socket")
            time.sleep(0.1)

    def vm(
        self, disks: list[Path], *, name: str = "", tpm: bool = False, rbd: tuple[Path, list[str]] | None = None
    ) -> LibvirtGuest:
        """A running domain with these qcow2 files as virtio disks vda, vdb,
        ...; tpm: a TPM 2.0 that libvirt emulates with swtpm; rbd: (ceph.conf,
        ["pool/image", ...]) raw disks on Ceph after the files."""
        for d in disks:
            give_to(d)
        name = name or f"bf-{uuidlib.uuid4().hex[:8]}"
        devs = []
        for i, d in enumerate(disks):
            devs.append(
                f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file={quoteattr(str(d))}/>"
                f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
            )
        conf, images = rbd or (None, [])
        for j, image in enumerate(images):
            dev = f"vd{chr(ord('a') + len(disks) + j)}"
            devs.append(
                f"<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                f"<source protocol='rbd' name={quoteattr(image)}><config file={quoteattr(str(conf))}/></source>"
                f"<target dev='{dev}' bus='virtio'/></disk>"
            )
        xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{"".join(devs)}
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
{"<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>" if tpm else ""}
<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>"""
        dom = self.conn.defineXML(xml)
        dom.create()
        return LibvirtGuest(self, dom, len(disks) + len(images))

    def clear(self) -> None:
        """Destroy and undefine every domain (with its checkpoints' metadata)."""
        import libvirt

        for dom in self.conn.listAllDomains(0):
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)

    def stop(self) -> None:
        if self.conn is not None:
            self.clear()
            with contextlib.suppress(Exception):
                self.conn.close()
        for pidfile in (self.base / "run" / "libvirt").glob("*.pid"):  # libvirtd and the virtlogd it started
            with contextlib.suppress(ValueError, OSError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        if self.proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class LibvirtGuest:
    def __init__(self, daemon: SessionLibvirtd, dom, ndisks: int):
        self.daemon, self.dom, self.ndisks = daemon, dom, ndisks
        self.name = dom.name()

    def hmp(self, command: str) -> str:
        import libvirt_qemu

        return libvirt_qemu.qemuMonitorCommand(self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)

    def write(self, disk: int, pattern: int, offset: int, length: int) -> None:
        """A guest write: qemu-io on the disk's own block backend."""
        self.hmp(
            f'qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend "write -P {pattern} {offset} {length}"'
        )

    def pid(self) -> int:
        return int((self.daemon.base / "run" / "libvirt" / "qemu" / "run" / f"{self.name}.pid").read_text())

    def kill(self) -> None:
        """qemu dies at once (kill -9): its bitmaps are never stored."""
        os.kill(self.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.dom.isActive() and time.monotonic() < deadline:
            time.sleep(0.05)
