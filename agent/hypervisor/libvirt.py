"""The libvirt adapter: VMs that a libvirtd manages.

libvirt owns such a qemu: its monitor, its node names, its checkpoints. So
this adapter never speaks QMP; it asks libvirt (the connection URI in
`[vms] libvirt_uri`) and uses libvirt's own API for what a live backup
needs: the guest freeze through libvirt's guest agent connection, and a
pull-mode backup job (`backupBegin`) that exports a point in time of the
chosen disks over NBD, with a dirty bitmap since an earlier checkpoint,
while creating the next checkpoint in the same instant.

A disk is matched by the device and inode of its source file, or by
`pool/[namespace/]image` for an RBD network disk. The layer model of the QMP
adapter (a new head in a QMP transaction, block-stream) is refused for these
VMs: libvirt 9 cannot delete external snapshots, and raw QMP behind its back
would break its metadata.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from agent.errors import BindingMissing, FailedPrecondition, HypervisorError
from agent.hypervisor.base import ChainNode, Hypervisor, LiveLayer, RunningVm, VmDisk, VmSummary, same_file, state_files
from agent.hypervisor.freeze import APPLICATION, Freeze
from agent.hypervisor.holders import swtpm_state_files

log = logging.getLogger("agent.hypervisor")

CHECKPOINT_PREFIX = "bf-"  # the checkpoints this agent makes: bf-<uuid>
GUEST_AGENT = "org.qemu.guest_agent.0"


def _libvirt() -> Any:
    try:
        import libvirt  # Debian's python3-libvirt, linked into the venv by setup.sh
    except ImportError:
        raise BindingMissing(
            "the libvirt binding is missing: install python3-libvirt ([vms] libvirt_uri is set)"
        ) from None
    return libvirt


def _error(what: str, e: Exception) -> HypervisorError:
    msg = e.get_error_message() if hasattr(e, "get_error_message") else str(e)
    return HypervisorError(f"{what}: {msg}")


@dataclass(frozen=True)
class PullExport:
    """One disk of a running pull backup: its NBD export and, for an
    incremental, the dirty bitmap since the checkpoint it started from."""

    device: str  # the disk's target (vda)
    socket: str  # the NBD server's unix socket
    export: str  # the export name
    bitmap: str  # the exported dirty bitmap ("" for a full backup of this disk)
    since: str  # the checkpoint the bitmap counts from ("" full)


class LibvirtVm(RunningVm):
    manager = "libvirt"

    def __init__(self, dom: Any, hypervisor: LibvirtHypervisor):
        self.dom, self.hv = dom, hypervisor
        self.name = dom.name()
        self.pid = 0
        self.ident = f"libvirt:{dom.UUIDString()}"
        self._xml: ET.Element | None = None

    # ---- what it is ----

    def xml(self) -> ET.Element:
        if self._xml is None:
            try:
                self._xml = ET.fromstring(self.dom.XMLDesc(0))
            except self.hv.libvirt.libvirtError as e:
                raise _error(f"libvirt domain {self.name}", e) from None
        return self._xml

    def disks(self) -> list[VmDisk]:
        out = []
        for d in self.xml().findall("devices/disk"):
            if d.get("device", "disk") != "disk":
                continue
            target = d.find("target")
            source = d.find("source")
            if target is None or source is None:
                continue
            dev = target.get("dev", "")
            if d.get("type") == "network" and source.get("protocol") == "rbd":
                parts = source.get("name", "").split("/")
                pool, image = parts[0], parts[-1]
                ns = parts[1] if len(parts) == 3 else ""
                out.append(VmDisk(dev, dev, "", (), rbd=(pool, ns, image)))
            else:
                path = source.get("file") or source.get("dev") or ""
                if path:
                    out.append(VmDisk(dev, dev, path, ()))
        return out

    def disk_format(self, device: str) -> str:
        """The format libvirt opens a disk with (qcow2, raw)."""
        for d in self.xml().findall("devices/disk"):
            t = d.find("target")
            if t is not None and t.get("dev") == device:
                drv = d.find("driver")
                return drv.get("type", "raw") if drv is not None else "raw"
        return ""

    def disk_of(self, path: str) -> VmDisk | None:
        return next((d for d in self.disks() if d.file and same_file(d.file, path)), None)

    def summary(self) -> VmSummary:
        state = {1: "running", 3: "paused"}.get(self.dom.state()[0], "other")
        return VmSummary(uuid=self.dom.UUIDString(), name=self.name, state=state, guest_agent=self._agent_connected())

    def _agent_connected(self) -> bool:
        for ch in self.xml().findall("devices/channel"):
            t = ch.find("target")
            if t is not None and t.get("name") == GUEST_AGENT:
                return t.get("state") == "connected"  # the guest opened its end: an agent runs there
        return False

    def definition(self) -> str:
        """The domain XML (libvirt leaves secrets out of it), as libvirt
        would define the VM again, with its UEFI variable store's contents."""
        try:
            xml = str(self.dom.XMLDesc(0))
        except self.hv.libvirt.libvirtError as e:
            raise _error(f"libvirt domain {self.name}", e) from None
        root = ET.fromstring(xml)
        nvram = [n.text for n in root.findall("os/nvram") if n.text]
        tpm = []
        if root.find("devices/tpm/backend[@type='emulator']") is not None:  # libvirt's swtpm keeps it under the uuid
            tpm = swtpm_state_files(names=self.dom.UUIDString())
        return json.dumps({"type": "libvirt", "xml": xml, "tpm": tpm, "files": state_files(nvram + tpm)})

    def guest_agent_socket(self) -> str | None:
        return None  # libvirt holds the channel: the freeze goes through libvirt

    # ---- freeze, pause ----

    @contextmanager
    def frozen(self, *, timeout: float, wanted: bool = True) -> Iterator[Freeze]:
        state = Freeze()
        if not wanted:
            state.reason = "guest freeze not asked for"
            yield state
            return
        if not self._agent_connected():
            state.reason = "no guest agent runs in the VM (libvirt sees its channel disconnected or absent)"
            yield state
            return
        lv = self.hv.libvirt
        sent = False
        try:  # libvirt's own guest agent timeout applies (virsh guest-agent-timeout; 5 s by default)
            sent = True
            state.filesystems = int(self.dom.fsFreeze() or 0)
            state.consistency = APPLICATION
        except lv.libvirtError as e:
            state.reason = f"guest freeze through libvirt failed: {e.get_error_message()}"
            log.warning(
                "guest freeze failed: going on crash-consistent", extra={"vm": self.name, "error": state.reason}
            )
        started = time.monotonic()
        try:
            yield state
        finally:
            state.frozen_ms = (time.monotonic() - started) * 1000 if state.consistency == APPLICATION else 0.0
            if sent:
                try:
                    self.dom.fsThaw()
                except lv.libvirtError as e:
                    log.error(
                        "guest thaw through libvirt failed; the guest may stay frozen",
                        extra={"vm": self.name, "error": e.get_error_message()},
                    )

    def pause(self) -> None:
        try:
            self.dom.suspend()
        except self.hv.libvirt.libvirtError as e:
            raise _error(f"pausing libvirt domain {self.name}", e) from None

    def resume(self) -> None:
        try:
            self.dom.resume()
        except self.hv.libvirt.libvirtError as e:
            raise _error(f"resuming libvirt domain {self.name}", e) from None

    # ---- the layer model: not behind libvirt's back ----

    def _refuse(self, what: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"{what} of a disk of libvirt domain {self.name} is refused: libvirt owns its block layer; "
            "back the VM up live instead (a vm_backup job: libvirt's pull backup, docs/live.md)"
        )

    def chain(self, disk: VmDisk) -> list[ChainNode]:
        raise self._refuse("a live snapshot change")

    def merge_bitmap(self, target: ChainNode, source: ChainNode, name: str) -> None:
        raise self._refuse("a live snapshot change")

    def stream(self, top: ChainNode, gone: ChainNode, base: ChainNode | None, backing_file: str | None) -> None:
        raise self._refuse("a live snapshot delete")

    def add_layers(self, layers: list[LiveLayer]) -> None:
        raise self._refuse("a live snapshot")

    # ---- checkpoints and pull backups ----

    def checkpoints(self) -> list[tuple[str, str, float]]:
        """This agent's checkpoints of the VM: (name, description, creation time), oldest first."""
        out = []
        try:
            for cp in self.dom.listAllCheckpoints(0):
                name = cp.getName()
                if not name.startswith(CHECKPOINT_PREFIX):
                    continue
                root = ET.fromstring(cp.getXMLDesc(0))
                out.append((name, root.findtext("description", ""), float(root.findtext("creationTime", "0"))))
        except self.hv.libvirt.libvirtError as e:
            raise _error(f"checkpoints of libvirt domain {self.name}", e) from None
        return sorted(out, key=lambda c: (c[2], c[0]))

    def delete_checkpoint(self, name: str) -> None:
        """Delete one checkpoint (libvirt merges its bitmap into its parent's)."""
        try:
            self.dom.checkpointLookupByName(name, 0).delete(0)
        except self.hv.libvirt.libvirtError as e:
            raise _error(f"deleting checkpoint {name} of libvirt domain {self.name}", e) from None

    @contextmanager
    def pull_backup(
        self, disks: dict[str, str], checkpoint: str, description: str, work_dir: str
    ) -> Iterator[dict[str, PullExport]]:
        """Begin libvirt's pull backup of these disks (device -> the
        checkpoint an incremental counts from, "" for a full read) and
        create `checkpoint` at the same instant; yield each disk's export.
        The job ends (and its scratch files go) when the block ends."""
        lv = self.hv.libvirt
        sock = os.path.join(work_dir, "nbd.sock")
        backup = ET.Element("domainbackup", mode="pull")
        ET.SubElement(backup, "server", transport="unix", socket=sock)
        el = ET.SubElement(backup, "disks")
        known = {d.device for d in self.disks()}
        for dev, since in disks.items():
            if dev not in known:
                raise FailedPrecondition(f"libvirt domain {self.name} has no disk {dev}")
            attrs = {"name": dev, "backup": "yes", "type": "file"}
            if since:
                attrs.update(backupmode="incremental", incremental=since)
            else:
                attrs["backupmode"] = "full"
            d = ET.SubElement(el, "disk", attrs)
            ET.SubElement(d, "scratch", file=os.path.join(work_dir, f"{dev}.scratch"))
        for dev in known - set(disks):
            ET.SubElement(el, "disk", name=dev, backup="no")
        cp = ET.Element("domaincheckpoint")
        ET.SubElement(cp, "name").text = checkpoint
        ET.SubElement(cp, "description").text = description
        cpdisks = ET.SubElement(cp, "disks")
        for dev in sorted(known):
            ET.SubElement(cpdisks, "disk", name=dev, checkpoint="bitmap" if dev in disks else "no")
        try:
            self.dom.backupBegin(ET.tostring(backup, encoding="unicode"), ET.tostring(cp, encoding="unicode"), 0)
        except lv.libvirtError as e:
            raise _error(f"beginning a pull backup of libvirt domain {self.name}", e) from None
        try:
            got = ET.fromstring(self.dom.backupGetXMLDesc(0))
            exports = {}
            for d in got.findall("disks/disk"):
                dev = d.get("name", "")
                if dev in disks:
                    exports[dev] = PullExport(
                        dev, sock, d.get("exportname", dev), d.get("exportbitmap", ""), d.get("incremental", "")
                    )
            yield exports
        finally:
            try:
                self.dom.abortJob()
            except lv.libvirtError as e:
                log.error(
                    "ending libvirt's pull backup failed", extra={"vm": self.name, "error": e.get_error_message()}
                )


class LibvirtHypervisor(Hypervisor):
    """One libvirt connection, opened at first use and kept (libvirt's
    calls are thread-safe on one connection)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()
        self.libvirt: Any = None  # the binding, loaded at the first connection

    def _connection(self) -> Any:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except Exception:  # noqa: BLE001 - a dead connection: open another
                    pass
            self.libvirt = lv = _libvirt()
            try:
                self._conn = lv.open(self.uri)
            except lv.libvirtError as e:
                raise _error(f"cannot connect to libvirt at {self.uri}", e) from None
            return self._conn

    def _domains(self) -> list[LibvirtVm]:
        conn = self._connection()
        lv = self.libvirt
        try:
            doms = conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except lv.libvirtError as e:
            raise _error(f"listing the domains of {self.uri}", e) from None
        return [LibvirtVm(d, self) for d in doms]

    def running_vms(self) -> list[RunningVm]:
        return list(self._domains())

    def holder(self, path: str) -> LibvirtVm | None:
        return next((vm for vm in self._domains() if vm.disk_of(path) is not None), None)

    def rbd_holder(self, pool: str, namespace: str, image: str) -> LibvirtVm | None:
        return next((vm for vm in self._domains() if vm.rbd_disk(pool, namespace, image) is not None), None)
