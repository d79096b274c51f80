"""A tiny real guest for the guest-freeze tests, built from Debian packages
and cached: the cloud kernel, busybox-static and qemu-guest-agent with the
host's copies of its shared libraries, in an initramfs whose /init loads the
virtio modules, mounts the ext4 data disk (/dev/vda) on /data, starts
qemu-ga on its virtio-serial port, says GUEST-READY on the serial console
and then keeps writing files to /data.

The packages are fetched with `apt-get download` and unpacked, never
installed: qemu-ga must never run on the host (it would freeze the host's
filesystems)."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
from pathlib import Path

CACHE = Path(os.environ.get("BLOCKFERRY_GUEST_CACHE", Path.home() / ".cache" / "blockferry-guest"))
# in load order: virtio needs virtio_ring's virtio_break_device (there is no modules.dep: nothing ran depmod)
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
MODULES += ("virtio_console",)

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in %(modules)s; do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /data /run /var/run /tmp
mount -t ext4 /dev/vda /data || echo GUEST-NO-DATA
port=""
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
done
qemu-ga -m virtio-serial -p "$port" -f /run/qemu-ga.pid &
echo GUEST-READY
n=0
while true; do
    n=$((n+1))
    echo "$n" > /data/counter
    dd if=/dev/urandom of=/data/file$((n %% 20)) bs=64k count=2 2>/dev/null
    sleep 0.02
done
"""


def _packages() -> list[str]:
    out = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True)
    kernel = next(
        line.split(":", 1)[1].strip() for line in out.stdout.splitlines() if line.strip().startswith("Depends:")
    )
    return [kernel, "busybox-static", "qemu-guest-agent"]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An initramfs archive (newc): (name, mode, data) entries, then the trailer."""
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        buf.write(b"\0" * (-(110 + len(raw)) % 4))
        buf.write(data)
        buf.write(b"\0" * (-len(data) % 4))
    return buf.getvalue()


def build() -> tuple[Path, Path]:
    """(kernel, initramfs), built once per machine and package set."""
    pkgs = _packages()
    key = "-".join(p.replace("/", "_") for p in pkgs)
    out = CACHE / key
    kernel, initrd = out / "vmlinuz", out / "initrd.gz"
    if kernel.exists() and initrd.exists():
        return kernel, initrd
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "debs").mkdir(parents=True)
    subprocess.run(["apt-get", "download", "-q", *pkgs], cwd=work / "debs", check=True, capture_output=True)
    root = work / "root"
    for deb in sorted((work / "debs").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (kver,) = os.listdir(root / "lib" / "modules")
    mods = {p.stem: p for p in (root / "lib" / "modules" / kver / "kernel").rglob("*.ko")}
    entries: list[tuple[str, int, bytes]] = []
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "lib64", "usr", "usr/sbin", "data", "run", "tmp"):
        entries.append((d, 0o40755, b""))
    entries.append(("init", 0o100755, (INIT % {"modules": " ".join(MODULES)}).encode()))
    entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
    entries += [(f"lib/modules/{m}.ko", 0o100644, mods[m].read_bytes()) for m in MODULES]
    qga = root / "usr" / "sbin" / "qemu-ga"
    entries.append(("usr/sbin/qemu-ga", 0o100755, qga.read_bytes()))
    entries.append(("bin/qemu-ga", 0o120777, b"/usr/sbin/qemu-ga"))  # a symlink
    ldd = subprocess.run(["ldd", str(qga)], capture_output=True, text=True, check=True).stdout
    libs = {line.split("=>")[1].split()[0] for line in ldd.splitlines() if "=>" in line and "/" in line}
    seen_dirs = {"lib", "lib64"}
    for lib in sorted(libs) + ["/lib64/ld-linux-x86-64.so.2"]:
        real = Path(lib).resolve()
        rel = lib.lstrip("/")
        parent = os.path.dirname(rel)
        parts = parent.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen_dirs:
                seen_dirs.add(d)
                entries.append((d, 0o40755, b""))
        entries.append((rel, 0o100755, real.read_bytes()))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "boot" / f"vmlinuz-{kver}", kernel)
    tmp = initrd.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio(entries), compresslevel=1))
    tmp.rename(initrd)
    shutil.rmtree(work, ignore_errors=True)
    return kernel, initrd
