"""The QMP adapter: qemu processes that no libvirt manages (Proxmox-style
hosts, and the tests).

The VM holding a file is the process that has it open (matched by device and
inode in /proc) and whose command line names a QMP socket; sockets matching
the configured globs are asked too, for qemus started with their monitor
elsewhere. Each operation opens its own QMP connection and closes it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import uuid as uuidlib
from contextlib import AbstractContextManager
from typing import Any

from agent.errors import BlockferryError, HypervisorError
from agent.hypervisor.base import ChainNode, Hypervisor, LiveLayer, RunningVm, VmDisk, VmSummary, same_file, state_files
from agent.hypervisor.freeze import Freeze, guest_frozen
from agent.hypervisor.holders import (
    Holder,
    holders,
    nvram_stores,
    pflash_files,
    qemu_processes,
    qga_socket,
    qmp_socket,
    swtpm_state_files,
    tpm_sockets,
)
from agent.hypervisor.qmp import TIMEOUT, Qmp

log = logging.getLogger("agent.hypervisor")

STREAM_TIMEOUT = 24 * 3600.0  # a stream copies a whole layer: hours on a large one
SCAN_GREETING = 2.0  # seconds a monitor busy with another client may take to greet a scan


def _top_file(name: str) -> str:
    """The file of a disk's top layer from the name qemu reports for it: a
    path, or after a live snapshot a `json:{...}` description of the node
    (its protocol child names the file)."""
    if not name.startswith("json:"):
        return name
    try:
        desc = json.loads(name[len("json:") :])
    except ValueError:
        return name
    child = desc.get("file")
    if isinstance(child, dict) and child.get("driver") == "file":
        return str(child.get("filename", name))
    return name


def _rbd_of(name: str) -> tuple[str, str, str] | None:
    """(pool, namespace, image) from the name qemu reports for a disk on
    its rbd driver (`json:{"driver": "raw", "file": {"driver": "rbd", ...}}`)."""
    if not name.startswith("json:"):
        return None
    try:
        desc = json.loads(name[len("json:") :])
    except ValueError:
        return None
    if isinstance(desc, dict) and desc.get("driver") != "rbd":
        desc = desc.get("file")
    if not isinstance(desc, dict) or desc.get("driver") != "rbd":
        return None
    return str(desc.get("pool", "")), str(desc.get("namespace", "")), str(desc.get("image", ""))


def _node_prefix(path: str) -> str:
    """The first part of the names of the nodes this agent adds for the file
    at path: qemu never learns that the file is renamed, so the disk whose
    top is such a node is found by the node's name."""
    return "bf" + hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]


def _vm_name(argv: tuple[str, ...]) -> str:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in ("-name", "--name"):
            opts = dict(p.partition("=")[::2] for p in value.split(",") if "=" in p)
            return opts.get("guest") or value.split(",", 1)[0]
    return ""


class QemuVm(RunningVm):
    @staticmethod
    def name_of(pid: int, argv: tuple[str, ...], qmp_path: str) -> str:
        """What errors and logs call a qemu process: its -name, else its pid."""
        return _vm_name(argv) or (f"qemu pid {pid}" if pid else f"qemu at {qmp_path}")

    def __init__(self, qmp: Qmp, pid: int, argv: tuple[str, ...]):
        self.qmp, self.pid, self.argv = qmp, pid, argv
        self.name = self.name_of(pid, argv, qmp.path)
        self.ident = os.path.realpath(qmp.path)
        self._disks: list[VmDisk] | None = None

    def definition(self) -> str:
        if not self.argv:  # found through the globs: no process to read the command line of
            return ""
        tpm = [f for sock in tpm_sockets(self.argv) for f in swtpm_state_files(ctrl_socket=sock)]
        return json.dumps(
            {
                "type": "qemu",
                "argv": list(self.argv),
                "nvram": pflash_files(self.argv),
                "tpm": tpm,
                "files": state_files(nvram_stores(self.argv) + tpm),
            }
        )

    def pause(self) -> None:
        self.qmp.execute("stop")

    def resume(self) -> None:
        self.qmp.execute("cont")

    def summary(self) -> VmSummary:
        uuid = str(self.qmp.execute("query-uuid").get("UUID", ""))
        if uuid == "00000000-0000-0000-0000-000000000000":  # qemu's answer when started without -uuid
            uuid = ""
        state = str(self.qmp.execute("query-status").get("status", ""))
        sock = self.guest_agent_socket()
        ready = False
        if sock:
            for dev in self.qmp.execute("query-chardev"):
                if sock in dev.get("filename", ""):
                    ready = bool(dev.get("frontend-open"))  # the guest opened its end: an agent runs there
        return VmSummary(uuid=uuid, name=self.name, state=state, guest_agent=ready)

    def frozen(self, *, timeout: float, wanted: bool = True) -> AbstractContextManager[Freeze]:
        return guest_frozen(self.guest_agent_socket(), self.name, timeout=timeout, wanted=wanted)

    def guest_agent_socket(self) -> str | None:
        """From the command line; else a socket chardev labelled qga* (the
        usual name) when the monitor was found through the globs."""
        found = qga_socket(self.argv)
        if found or self.argv:
            return found
        for dev in self.qmp.execute("query-chardev"):
            filename = dev.get("filename", "")
            if dev.get("label", "").startswith("qga") and filename.startswith("unix:"):
                return str(filename[len("unix:") :].split(",", 1)[0])
        return None

    def disks(self) -> list[VmDisk]:
        """Asked once per connection (qemu reads every layer's header to
        answer) and asked again after this VM changed its layers."""
        if self._disks is None:
            self._disks = self._query_disks()
        return self._disks

    def _query_disks(self) -> list[VmDisk]:
        nodes = {n["node-name"]: n for n in self.qmp.execute("query-named-block-nodes", flat=True)}
        out = []
        for b in self.qmp.execute("query-block"):
            ins = b.get("inserted")
            if not ins:
                continue
            node = ins.get("node-name", "")
            bitmaps = tuple(
                bm["name"]
                for bm in nodes.get(node, {}).get("dirty-bitmaps", [])
                if bm.get("persistent") and bm.get("recording") and not bm.get("inconsistent")
            )
            qdev = b.get("qdev", "")
            device = b.get("device") or qdev.removeprefix("/machine/peripheral/").split("/", 1)[0]
            name = ins.get("file", "")
            out.append(VmDisk(device=device, node=node, file=_top_file(name), bitmaps=bitmaps, rbd=_rbd_of(name)))
        return out

    def disk_of(self, path: str) -> VmDisk | None:
        prefix = _node_prefix(path)
        disks = self.disks()
        ours = next((d for d in disks if d.node.startswith(prefix)), None)
        return ours or next((d for d in disks if same_file(d.file, path)), None)

    def chain(self, disk: VmDisk) -> list[ChainNode]:
        graph = self.qmp.execute("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        children: dict[tuple[str, str], str] = {}
        for e in graph["edges"]:
            children[(names[e["parent"]], e["name"])] = names[e["child"]]
        info = {n["node-name"]: n for n in self.qmp.execute("query-named-block-nodes", flat=True)}
        out, node = [], disk.node
        while node:
            file_node = children.get((node, "file"), "")
            f = info.get(file_node, {})
            out.append(
                ChainNode(
                    node=node,
                    read_only=bool(info.get(node, {}).get("ro")),
                    file_node=file_node,
                    file_name=f.get("file", ""),
                    file_implicit=file_node.startswith("#"),
                    file_read_only=bool(f.get("ro")),
                )
            )
            node = children.get((node, "backing"), "")
        return out

    def merge_bitmap(self, target: ChainNode, source: ChainNode, name: str) -> None:
        self.qmp.execute(
            "block-dirty-bitmap-merge", node=target.node, target=name, bitmaps=[{"node": source.node, "name": name}]
        )

    def stream(self, top: ChainNode, gone: ChainNode, base: ChainNode | None, backing_file: str | None) -> None:
        self._disks = None
        job = f"bf-stream-{uuidlib.uuid4().hex[:8]}"
        args: dict[str, Any] = {"job-id": job, "device": top.node}
        if base is not None:
            args["base-node"] = base.node
            args["backing-file"] = backing_file
        self.qmp.execute("block-stream", args)
        ev = self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=STREAM_TIMEOUT, device=job)
        if ev["data"].get("error"):
            raise HypervisorError(f"VM {self.name}: block-stream into {top.node} failed: {ev['data']['error']}")
        for name in (gone.node, gone.file_node):  # named nodes stay open until deleted (their files too)
            if name and not name.startswith("#"):  # qemu's own go by themselves
                try:
                    self.qmp.execute("blockdev-del", {"node-name": name})
                except BlockferryError as e:
                    log.warning("a released layer's node stays open", extra={"node": name, "error": e.message})

    def add_layers(self, layers: list[LiveLayer]) -> None:
        self._disks = None
        added: list[str] = []
        try:
            actions = []
            for layer in layers:
                # a file node of our own, never one qemu makes and reopens by name
                node = f"{_node_prefix(layer.path)}-{uuidlib.uuid4().hex[:8]}"
                self.qmp.execute("blockdev-add", {"node-name": f"{node}f"}, driver="file", filename=layer.overlay)
                added.append(f"{node}f")
                self.qmp.execute(
                    "blockdev-add",
                    {"node-name": node},
                    driver="qcow2",
                    backing=None,  # linked to the old top by blockdev-snapshot, not opened again
                    file=f"{node}f",
                )
                added.append(node)
                if layer.bitmap:
                    actions.append(
                        {"type": "block-dirty-bitmap-disable", "data": {"node": layer.disk.node, "name": layer.bitmap}}
                    )
                actions.append({"type": "blockdev-snapshot", "data": {"node": layer.disk.node, "overlay": node}})
            self.qmp.execute("transaction", actions=actions)
        except BaseException:
            for node in reversed(added):
                try:
                    self.qmp.execute("blockdev-del", {"node-name": node})
                except BlockferryError as e:
                    log.error("could not remove a new layer's node", extra={"node": node, "error": e.message})
            raise

    def close(self) -> None:
        self.qmp.close()


class QemuHypervisor(Hypervisor):
    def __init__(self, qmp_sockets: tuple[str, ...] = (), *, timeout: float = TIMEOUT):
        self.qmp_sockets = qmp_sockets  # globs of QMP sockets to ask too
        self.timeout = timeout

    def holders(self, path: str) -> list[Holder]:
        return holders(path)

    def running_vms(self) -> list[RunningVm]:
        out: list[RunningVm] = []
        seen = set()
        for h in qemu_processes():
            sock = qmp_socket(h.argv) or ""
            seen.add(os.path.realpath(sock))
            vm = self._connect(sock, h.pid, h.argv, scan=True)
            if vm is not None:
                out.append(vm)
        for pattern in self.qmp_sockets:
            for sock in sorted(glob.glob(pattern)):
                if os.path.realpath(sock) not in seen:
                    seen.add(os.path.realpath(sock))
                    vm = self._connect(sock, 0, (), scan=True)
                    if vm is not None:
                        out.append(vm)
        return out

    def _connect(self, sock: str, pid: int, argv: tuple[str, ...], *, scan: bool = False) -> QemuVm | None:
        """scan: one VM of many asked in turn, whose monitor may be busy with
        another client: it gets SCAN_GREETING seconds to greet, not the full timeout."""
        try:
            greeting = min(SCAN_GREETING, self.timeout) if scan else None
            return QemuVm(Qmp(sock, timeout=self.timeout, greeting_timeout=greeting), pid, argv)
        except BlockferryError as e:
            log.info("a QMP socket did not answer", extra={"socket": sock, "error": e.message})
            return None

    def holder(self, path: str) -> QemuVm | None:
        tried = set()
        for h in holders(path):
            sock = qmp_socket(h.argv)
            if sock:
                tried.add(sock)
                vm = self._ask(sock, h.pid, h.argv, path)
                if vm is not None:
                    return vm
        for pattern in self.qmp_sockets:
            for sock in sorted(glob.glob(pattern)):
                if sock not in tried:
                    vm = self._ask(sock, 0, (), path)
                    if vm is not None:
                        return vm
        return None

    def _ask(self, sock: str, pid: int, argv: tuple[str, ...], path: str) -> QemuVm | None:
        vm = self._connect(sock, pid, argv)
        if vm is None:
            return None
        try:
            if vm.disk_of(path) is not None:
                return vm
        except BaseException:
            vm.close()
            raise
        vm.close()
        return None
