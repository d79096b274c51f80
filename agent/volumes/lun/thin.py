"""Running VMs on a shared pool: write thresholds and slices grown or
moved under a running qemu, a live snapshot's switch, and pausing.

A thin head starts in a small slice. For every running qemu on this host
whose block graph holds a raw node over one of the pool's head slices, the
watcher (one pass per second, on every host of the pool) sets a write
threshold on that raw node, `headroom` bytes before the slice's end. When
qemu reports it crossed (the node's write_threshold drops back to 0), or
the node's highest write (query-blockstats) is already past it, the slice
is grown in place in the table (by the metadata owner, which other hosts
ask over the network) and the raw node reopened with the larger
size (blockdev-reopen: about 1 ms), or, when the next slice is in the way,
the running layer is mirrored into a larger slice elsewhere; a VM that
paused on ENOSPC in the meantime (its disk configured werror=enospc) is
resumed. With no room anywhere the slice stays full and the write waits.

A live snapshot's switch (switch_to_overlays) opens the new layers in the
VM and makes them its disks' tops in one transaction. When the pool's
owner lease is lost, pause_all() stops every VM on this host that writes
into the pool: no host writes a slice whose geometry it may no longer know.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from agent.errors import BlockferryError, StorageIOError
from agent.hypervisor.holders import Holder, qemu_processes, qmp_socket
from agent.hypervisor.qmp import Qmp
from agent.volumes.lun import format as fmt
from agent.volumes.lun.format import SliceRecord
from agent.volumes.qcow2.driver import BITMAP

log = logging.getLogger("agent.lun")


def _wait_job(q: Qmp, job: str, *, ready: bool, timeout: float = 120.0) -> None:
    """Until the block job is ready (ready=True) or gone (it completed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = {j["device"]: j for j in q.execute("query-block-jobs")}
        j = jobs.get(job)
        if ready and j is not None and j.get("ready"):
            return
        if not ready and j is None:
            return
        if ready and j is None:
            raise StorageIOError(f"block job {job} ended before it was ready")
        time.sleep(0.02)
    raise StorageIOError(f"block job {job}: not {'ready' if ready else 'done'} within {timeout:.0f}s")


def _raw_nodes(q: Qmp, matches: Callable[[dict], bool]) -> list[tuple[str, str, int, int, int]]:
    """(node, child, offset, size, threshold) of the raw nodes with an offset
    whose protocol node matches."""
    nodes = q.execute("query-named-block-nodes", {"flat": True})
    graph = q.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    child_of = {names.get(e["parent"]): names.get(e["child"]) for e in graph["edges"] if e["name"] == "file"}
    out = []
    for n in nodes:
        if n.get("drv") != "raw" or not str(n.get("file", "")).startswith("json:"):
            continue
        try:
            spec = json.loads(n["file"][5:])
        except ValueError:
            continue
        if "offset" not in spec or not isinstance(spec.get("file"), dict) or not matches(spec["file"]):
            continue
        child = child_of.get(n["node-name"])
        if child:
            out.append(
                (n["node-name"], child, int(spec["offset"]), int(spec["size"]), int(n.get("write_threshold", 0)))
            )
    return out


class ThinWatcher:
    def __init__(self, pool, *, interval: float = 1.0, headroom: int = 0):
        """pool: the LunPool; headroom: bytes before a slice's end where its
        threshold sits (default: its grow step)."""
        self.pool = pool
        self.interval = interval
        self.headroom = headroom or pool.thin_step
        self._armed: dict[tuple[str, str], int] = {}  # (socket, node) -> threshold we set
        self._boxed: set[tuple[int, int]] = set()  # (slot, generation) that could not grow in place
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.grown = 0  # slices grown under a running VM (for tests and metrics)

    def start(self) -> ThinWatcher:
        self._thread = threading.Thread(target=self._run, name="lun-thin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - one bad VM or a LUN hiccup must not stop the watcher
                log.warning("thin provisioning pass failed: %s", e)

    def _vm_sockets(self) -> list[str]:
        return [s for s, _ in self._vms()]

    def _vms(self) -> list[tuple[str, Holder]]:
        """This host's qemu processes with a QMP socket: (socket, process)."""
        return [(s, h) for h in qemu_processes() if (s := qmp_socket(h.argv))]

    def tick(self) -> None:
        """One pass over this host's VMs."""
        for sock in self._vm_sockets():
            try:
                with Qmp(sock, timeout=5) as q:
                    self._serve(q, sock)
            except BlockferryError as e:
                log.debug("thin: %s: %s", sock, e)

    def _serve(self, q: Qmp, sock: str) -> None:
        heads = {r.offset: r for r in self.pool.table.used() if r.kind == fmt.LAYER and r.layer == r.volume}
        raw = _raw_nodes(q, self.pool.is_own_protocol)
        if not raw:
            return
        # how far qemu has written into each node (written before a threshold was set, or while
        # this agent was down, counts too)
        stats = q.execute("query-blockstats", {"query-nodes": True})
        highest = {s.get("node-name"): s.get("stats", {}).get("wr_highest_offset", 0) for s in stats}
        grew = False
        for node, child, offset, size, threshold in raw:
            rec = heads.get(offset)
            if rec is None:
                continue  # a snapshot layer (read-only) or another pool's
            key = (sock, node)
            if rec.size > size:
                self._reopen(q, node, child, rec)  # grown here before: let qemu see it
                size = rec.size
            armed = self._armed.get(key)
            crossed = threshold == 0 and armed is not None
            full = self.pool.full_size(rec)
            if (crossed or highest.get(node, 0) > size - self.headroom) and size < full:
                log.info(
                    "write threshold crossed",
                    extra={"volume": rec.volume, "node": node, "at": armed, "highest": highest.get(node, 0)},
                )
                before = rec.size
                rec = self._grow(q, node, child, rec)
                grew = grew or rec.size > before
                if rec.offset != offset:
                    continue  # moved: the VM has new nodes now, armed at the next pass
                size = rec.size
            if threshold == 0 or threshold != self._armed.get(key):
                at = max(0, size - self.headroom)
                if at > 0 and size < full:
                    q.execute("block-set-write-threshold", {"node-name": node, "write-threshold": at})
                    self._armed[key] = at
        # a VM that paused on ENOSPC (werror=enospc) runs on once its slice grew; one whose slice
        # cannot grow stays paused: its write waits instead of failing
        if grew and q.execute("query-status").get("status") == "io-error":
            q.execute("cont")
            log.info("resumed a VM paused on a full slice", extra={"qmp": sock})

    def _grow(self, q: Qmp, node: str, child: str, rec: SliceRecord) -> SliceRecord:
        """The head's slice one step larger: in place, else the running
        layer moved to a larger slice by a mirror job. The table's part is
        the metadata owner's (asked over the network from other hosts)."""
        want = min(self.pool.full_size(rec), rec.size + self.pool.thin_step)
        if want <= rec.size:
            return rec
        now = self.pool.grow_running(rec, want)
        if now is None:
            return self._move(q, node, rec, want)
        if now.used and now.layer == rec.volume and now.offset == rec.offset and now.size > rec.size:
            self._reopen(q, node, child, now)
            self.grown += 1
            log.info("slice grown under a running VM", extra={"volume": now.volume, "size": now.size})
        return now  # or as a snapshot or move left it: the next pass looks again

    def _move(self, q: Qmp, node: str, rec: SliceRecord, size: int) -> SliceRecord:
        """Mirror a running head into a new slice of size bytes (sync=top:
        the layers under it stay), carry its dirty bitmap over, switch the
        VM to it, then release the old slice. With no room anywhere, the
        slice stays full (said once) and the VM's write waits paused."""
        pool = self.pool
        new = pool.begin_move(rec, size)
        if new is None:
            if (rec.slot, rec.generation) not in self._boxed:  # said once per slice
                self._boxed.add((rec.slot, rec.generation))
                log.error("a running layer's slice is full and cannot move", extra={"volume": rec.volume})
            return rec
        tag = f"bf{new.slot}g{new.generation}"
        try:
            graph = q.execute("x-debug-query-block-graph")
            names = {n["id"]: n["name"] for n in graph["nodes"]}
            ids = {v: k for k, v in names.items()}
            top = next(names[e["parent"]] for e in graph["edges"] if e["name"] == "file" and e["child"] == ids[node])
            backing = next(
                (names[e["child"]] for e in graph["edges"] if e["name"] == "backing" and e["parent"] == ids[top]), None
            )
            q.execute("blockdev-add", dict(pool.protocol, **{"node-name": f"{tag}p"}))
            q.execute(
                "blockdev-add",
                {"driver": "raw", "node-name": f"{tag}r", "file": f"{tag}p", "offset": new.offset, "size": new.size},
            )
            q.execute(
                "blockdev-add", {"driver": "qcow2", "node-name": f"{tag}q", "file": f"{tag}r", "backing": backing}
            )
            job = f"{tag}m"
            q.execute("blockdev-mirror", {"job-id": job, "device": top, "target": f"{tag}q", "sync": "top"})
            _wait_job(q, job, ready=True)
            try:  # changes since the last snapshot, recorded on the old slice, go on with the layer
                q.execute(
                    "block-dirty-bitmap-merge",
                    {"node": f"{tag}q", "target": BITMAP, "bitmaps": [{"node": top, "name": BITMAP}]},
                )
            except BlockferryError as e:
                log.warning("the moved layer's dirty bitmap could not take the old one's: %s", e)
            q.execute("job-complete", {"id": job})
            _wait_job(q, job, ready=False)
        except BaseException:
            pool.end_move(rec, new, done=False)
            raise
        for old in (top, node):  # the old slice's nodes, if the VM named them
            try:
                q.execute("blockdev-del", {"node-name": old})
            except BlockferryError:
                pass
        moved = pool.end_move(rec, new, done=True)
        self.grown += 1
        log.info(
            "running layer moved to a larger slice",
            extra={"volume": rec.volume, "from": rec.offset, "to": moved.offset, "size": moved.size},
        )
        return moved

    def _reopen(self, q: Qmp, node: str, child: str, rec: SliceRecord) -> None:
        q.execute(
            "blockdev-reopen",
            {"options": [{"driver": "raw", "node-name": node, "file": child, "offset": rec.offset, "size": rec.size}]},
        )

    def slice_users(self, offsets: list[int]) -> list[tuple[int, str, Holder]]:
        """(offset, QMP socket, process) of this host's VMs with a node over
        the slices that start at these offsets (layers are opened with
        locking off, so no lock can tell)."""
        wanted = set(offsets)
        out = []
        for sock, h in self._vms():
            try:
                with Qmp(sock, timeout=5) as q:
                    held = {o for _, _, o, _, _ in _raw_nodes(q, self.pool.is_own_protocol)}
            except BlockferryError as e:
                log.debug("could not ask the VM at %s: %s", sock, e)
                continue
            out += [(o, sock, h) for o in sorted(held & wanted)]
        return out

    def vm(self, sock: str) -> Holder | None:
        """The qemu process on this host whose QMP socket this is."""
        return next((h for s, h in self._vms() if s == sock), None)

    def switch_to_overlays(self, q: Qmp, items: list[tuple[SliceRecord, SliceRecord, str]]) -> float:
        """A live snapshot's switch in the VM q reaches, for every (head,
        new layer, bitmap): the new layer's slice (a qcow2 the caller wrote,
        backed by the head) is opened as nodes of the VM's own (one protocol
        node per slice), then one transaction stops each head's bitmap and
        makes each new layer its disk's top: the VM's disks switch at one
        instant. On failure the added nodes are removed again. Returns the
        transaction's milliseconds."""
        raw = _raw_nodes(q, self.pool.is_own_protocol)
        graph = q.execute("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        parent_of = {names.get(e["child"]): names[e["parent"]] for e in graph["edges"] if e["name"] == "file"}
        added: list[str] = []
        actions: list[dict] = []
        try:
            for head, new, bitmap in items:
                node = next((r[0] for r in raw if r[2] == head.offset), None)
                top = parent_of.get(node) if node else None
                if top is None:
                    raise StorageIOError(f"the VM at {q.path} no longer has volume {head.volume} open")
                tag = f"bf{new.slot}g{new.generation}"
                q.execute("blockdev-add", dict(self.pool.protocol, **{"node-name": f"{tag}p"}))
                added.append(f"{tag}p")
                raw_node = {"driver": "raw", "node-name": f"{tag}r", "file": f"{tag}p"}
                q.execute("blockdev-add", dict(raw_node, offset=new.offset, size=new.size))
                added.append(f"{tag}r")
                q.execute(
                    "blockdev-add", {"driver": "qcow2", "node-name": f"{tag}q", "file": f"{tag}r", "backing": None}
                )
                added.append(f"{tag}q")
                if bitmap:
                    actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": top, "name": bitmap}})
                actions.append({"type": "blockdev-snapshot", "data": {"node": top, "overlay": f"{tag}q"}})
            t0 = time.monotonic()
            q.execute("transaction", actions=actions)
            return (time.monotonic() - t0) * 1000
        except BaseException:
            for node in reversed(added):
                try:
                    q.execute("blockdev-del", {"node-name": node})
                except BlockferryError as e:
                    log.error("could not remove a new layer's node %s: %s", node, e)
            raise

    def pool_vms(self) -> list[str]:
        """The QMP sockets of this host's VMs with a node over the pool's LUN."""
        out = []
        for sock in self._vm_sockets():
            try:
                with Qmp(sock, timeout=5) as q:
                    if _raw_nodes(q, self.pool.is_own_protocol):
                        out.append(sock)
            except BlockferryError as e:
                log.warning("could not ask the VM at %s: %s", sock, e)
                out.append(sock)  # unknown: counted as using the pool
        return out

    def pause_all(self, why: str) -> int:
        """Stop every VM on this host that has a node over the pool's LUN."""
        stopped = 0
        for sock in self._vm_sockets():
            try:
                with Qmp(sock, timeout=5) as q:
                    if _raw_nodes(q, self.pool.is_own_protocol):
                        q.execute("stop")
                        stopped += 1
                        log.error("VM paused: %s", why, extra={"qmp": sock})
            except BlockferryError as e:
                log.warning("could not pause the VM at %s: %s", sock, e)
        return stopped
