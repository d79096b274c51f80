"""A repository directly on a raw LUN (iSCSI, FC, any block device): no file
system, crash-safe, single-host.

Layout (offsets in bytes; everything 4 KiB aligned):

    0        superblock copy 0  (4 KiB)
    64 KiB   superblock copy 1  (4 KiB)
    1 MiB    catalog slot A     (C bytes)
    1 MiB+C  catalog slot B     (C bytes)
    D        data area, allocated in 64 KiB units, to the end of the device

The catalog maps object names to their size and extents on the device
(objects under 4 KiB are kept inline). It is rewritten whole on every commit,
into the slot the newest superblock does not point at; after a flush, a
superblock with generation+1, the slot, the catalog's length and SHA-256 is
written over the older of the two copies, and both are flushed. (The flush
before the catalog write makes the objects' data durable first.) Opening picks the
newest superblock whose own checksum and whose catalog's checksum hold, so a
crash at any point leaves the previous generation intact. Object data is
written and flushed before the catalog that names it, and space freed by a
delete is reused only after the catalog without it is durable. Writers that
never commit leave nothing behind: their space was never in a catalog.

Safety: a LUN that holds no blockferry superblock is formatted only when
asked (format_lun), and only if it is blank where a partition table, file
system or volume header would be (its first and last MiB are zero). Every
commit first re-reads both superblocks; if another host advanced the
generation, the commit is refused instead of overwriting its work.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

from agent.errors import DataCorrupt, FailedPrecondition, NoSpace, NotFound
from agent.stores.base import ObjectStore, ObjectWriter, StoreStats, check_object_name, storage_error
from agent.stores.blockdev import BLOCK, BlockDevice

MAGIC = b"BFLUNREP"
VERSION = 1
SB_OFFSETS = (0, 64 << 10)
CATALOG_OFFSET = 1 << 20
UNIT = 64 << 10
INLINE = 4096
SEGMENT = 4 << 20  # reads go in pieces of at most this much
# magic version flags uuid gen devsize cat_off cat_size data_off unit slot len sha
_SB = struct.Struct("<8sII16sQQQQQIIQ32s")
BLANK_CHECK = 1 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def catalog_size_for(device_size: int) -> int:
    """Bytes per catalog slot: 1/512 of the device, 1 to 64 MiB (about
    10,000 objects per MiB)."""
    return min(64 << 20, max(1 << 20, _round_up(device_size // 512, UNIT)))


class Superblock:
    def __init__(self, fsid: bytes, gen: int, device_size: int, cat_size: int, slot: int, cat_len: int, cat_sha: bytes):
        self.fsid, self.gen, self.device_size = fsid, gen, device_size
        self.cat_size, self.slot, self.cat_len, self.cat_sha = cat_size, slot, cat_len, cat_sha

    @property
    def data_offset(self) -> int:
        return _round_up(CATALOG_OFFSET + 2 * self.cat_size, UNIT)

    def slot_offset(self, slot: int) -> int:
        return CATALOG_OFFSET + slot * self.cat_size

    def pack(self) -> bytes:
        body = _SB.pack(
            MAGIC,
            VERSION,
            0,
            self.fsid,
            self.gen,
            self.device_size,
            CATALOG_OFFSET,
            self.cat_size,
            self.data_offset,
            UNIT,
            self.slot,
            self.cat_len,
            self.cat_sha,
        )
        return (body + hashlib.sha256(body).digest()).ljust(BLOCK, b"\0")

    @classmethod
    def parse(cls, raw: bytes) -> Superblock | None | bool:
        """A Superblock; None when this is not ours; False when it is ours but torn."""
        if raw[:8] != MAGIC:
            return None
        body, sha = raw[: _SB.size], raw[_SB.size : _SB.size + 32]
        if hashlib.sha256(body).digest() != sha:
            return False
        (_, version, _, fsid, gen, devsize, cat_off, cat_size, data_off, unit, slot, cat_len, cat_sha) = _SB.unpack(
            body
        )
        if version > VERSION:
            raise FailedPrecondition(
                f"device: the LUN repository has format version {version}; this agent reads up to {VERSION}",
                field="device",
            )
        if cat_off != CATALOG_OFFSET or unit != UNIT or slot not in (0, 1):
            return False
        return cls(fsid, gen, devsize, cat_size, slot, cat_len, cat_sha)


class _Extents:
    """Free space of the data area: sorted, non-overlapping [start, end)."""

    def __init__(self, start: int, end: int, used: list[tuple[int, int]]):
        free, pos = [], start
        for off, length in sorted(used):
            if off > pos:
                free.append([pos, off])
            pos = max(pos, off + length)
        if pos < end:
            free.append([pos, end])
        self.free = free

    def take(self, want: int, after: int | None = None) -> tuple[int, int] | None:
        """Up to want bytes; from `after` when that is the start of a free
        run (so a writer's extents stay contiguous), else first fit."""
        for run in self.free:
            if after is not None and run[0] == after or after is None:
                got = min(want, run[1] - run[0])
                start = run[0]
                run[0] += got
                if run[0] == run[1]:
                    self.free.remove(run)
                return start, got
        if after is not None:
            return self.take(want)
        return None

    def give(self, off: int, length: int) -> None:
        if length <= 0:
            return
        self.free.append([off, off + length])
        self.free.sort()
        merged = [self.free[0]]
        for run in self.free[1:]:
            if run[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], run[1])
            else:
                merged.append(run)
        self.free = merged

    def total(self) -> int:
        return sum(e - s for s, e in self.free)


class _LunWriter(ObjectWriter):
    """Stages an object in pieces of the device's io_size (space is reserved
    that much at a time too) and hands each full one to the device in I/O
    threads of its own while the caller fills the next stage: up to the
    device's io_depth writes at once, each stage reused only once its write
    is done."""

    def __init__(self, store: LunStore, name: str, durable: bool):
        self.store = store
        self.name = check_object_name(name)
        self.durable = durable
        self.extents: list[list[int]] = []  # [offset, length] reserved on the device
        self._seg, self._depth = store.dev.io_size, store.dev.io_depth
        self._stages = [store.dev.buffer(self._seg)]  # up to io_depth + 1, added as needed
        self._next = 0  # index of the stage being filled
        self._stage = self._stages[0]
        self._fill = 0  # bytes in the stage
        self._written = 0  # bytes of the object handed to the device
        self._reserved_used = 0  # bytes of the reserved extents written so far
        self._open = True
        self._io: ThreadPoolExecutor | None = None
        self._pending: collections.deque[Future] = collections.deque()

    @property
    def size(self) -> int:
        return self._written + self._fill

    def _device_offset(self, length: int) -> list[tuple[int, int]]:
        """Device ranges for the next `length` bytes of the object, reserving
        space as needed."""
        out = []
        while length > 0:
            reserved = sum(e[1] for e in self.extents)
            if self._reserved_used >= reserved:
                last_end = self.extents[-1][0] + self.extents[-1][1] if self.extents else None
                off, got = self.store._reserve(max(length, self._seg), last_end)
                if self.extents and off == last_end:
                    self.extents[-1][1] += got
                else:
                    self.extents.append([off, got])
                continue
            # find the extent holding position _reserved_used
            pos = self._reserved_used
            for off, ln in self.extents:
                if pos < ln:
                    k = min(length, ln - pos)
                    out.append((off + pos, k))
                    self._reserved_used += k
                    length -= k
                    break
                pos -= ln
        return out

    def _spill(self, final: bool = False) -> None:
        n = self._fill if final else self._fill // BLOCK * BLOCK
        if n == 0:
            return
        padded = _round_up(n, BLOCK)
        stage = self._stage
        if padded > n:
            stage[n:padded] = bytes(padded - n)
        try:
            ranges = self._device_offset(padded)
            while len(self._pending) >= self._depth:
                self._wait_one()  # the oldest write is done: the next stage is free again
        except BaseException:  # the LUN is full, or a write failed: give back what this writer holds
            self.abort()
            raise
        if self._io is None:
            self._io = ThreadPoolExecutor(self._depth, thread_name_prefix="bf-lun-io")
        self._pending.append(self._io.submit(self._write_ranges, stage, ranges))
        self._written += n
        # with at most io_depth writes pending over io_depth + 1 stages,
        # the next stage in turn is not being written
        self._next = (self._next + 1) % (self._depth + 1)
        if self._next == len(self._stages):
            self._stages.append(self.store.dev.buffer(self._seg))
        other = self._stages[self._next]
        rest = self._fill - n
        if rest:
            other[:rest] = stage[n : self._fill]
        self._stage, self._fill = other, rest

    def _write_ranges(self, stage, ranges) -> None:
        pos = 0
        for off, k in ranges:
            self.store.dev.write(off, stage[pos : pos + k])
            pos += k
        self.store._written(pos)

    def _wait_one(self) -> None:
        """Wait for the oldest write in flight; raise its error."""
        try:
            self._pending.popleft().result()
        except OSError as e:
            raise storage_error(self.store.label, f"cannot write {self.name}", e) from None

    def _wait(self) -> None:
        """Wait for every write in flight; raise the first error."""
        while self._pending:
            self._wait_one()

    def _stop_io(self) -> None:
        while self._pending:
            try:
                self._wait_one()
            except Exception:
                pass  # the writer is being given up anyway
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    def write(self, data) -> None:
        if not self._open:
            raise storage_error(self.store.label, f"cannot write {self.name}", OSError(9, "writer is closed"))
        view = memoryview(data).cast("B")
        while view:
            k = min(len(view), self._seg - self._fill)
            self._stage[self._fill : self._fill + k] = view[:k]
            self._fill += k
            view = view[k:]
            if self._fill == self._seg:
                self._spill()

    def commit(self) -> None:
        size = self.size
        try:
            if size < INLINE and self._written == 0:
                self.store._commit(self.name, size, inline=bytes(self._stage[: self._fill]))
                self.store._release(self.extents)
            else:
                self._spill(final=True)
                self._wait()
                self._stages, self._stage = [], None  # not needed while the commit flushes
                self._trim()
                # the commit's first flush makes this data durable before the catalog names it
                self.store._commit(self.name, size, extents=self.extents)
        except BaseException:
            self.abort()
            raise
        finally:
            self._stop_io()
        self._open = False

    def _trim(self) -> None:
        """Give back reserved space past the object's end."""
        keep = _round_up(self._written, UNIT)
        kept, pos = [], 0
        for off, ln in self.extents:
            if pos >= keep:
                self.store._release([[off, ln]])
            elif pos + ln > keep:
                kept.append([off, keep - pos])
                self.store._release([[off + keep - pos, pos + ln - keep]])
            else:
                kept.append([off, ln])
            pos += ln
        self.extents = kept

    def abort(self) -> None:
        if self._open:
            self._open = False
            self._stop_io()  # no write may still land in space given back
            self.store._release(self.extents)
            self.extents = []


class LunStore(ObjectStore):
    # every commit costs two device flushes: fewer, larger packs (measured in
    # bench/targets_bench.py); a crash mid-pack costs only a resend of that
    # pack's chunks
    pack_target = 1 << 30
    # a full pack commits (flush, catalog, flush) while the next is written:
    # commits take the catalog lock, space reservations their own
    concurrent_writers = True

    def __init__(self, dev: BlockDevice, *, format_lun: bool = False, label: str = ""):
        self.dev = dev
        self.label = label or dev.label
        self._lock = threading.RLock()  # the catalog and superblocks: commits and deletes
        self._space_lock = threading.Lock()  # the allocator: never held across device I/O
        self._pace_lock = threading.Lock()  # background flushes (BlockDevice.pace_every)
        self._unflushed = 0
        self._pacing: Future | None = None
        self._pacer: ThreadPoolExecutor | None = None
        self.host = socket.gethostname()
        try:
            sb = self._newest()
            if sb is None:
                sb = self._format(format_lun)
            self.sb = sb
            self.objects = self._load_catalog(sb)
        except OSError as e:
            raise storage_error(self.label, "cannot read the LUN", e) from None
        used = [tuple(x) for meta in self.objects.values() if isinstance(meta[1], list) for x in meta[1]]
        self.space = _Extents(sb.data_offset, self._data_end(sb), used)

    def _written(self, n: int) -> None:
        """n bytes of object data reached the device: every pace_every bytes,
        a flush in the background (one at a time), so the device's cache is
        written back while the backup runs, not all at its last commit."""
        every = self.dev.pace_every
        if not every:
            return
        with self._pace_lock:
            self._unflushed += n
            if self._unflushed < every or (self._pacing is not None and not self._pacing.done()):
                return
            self._unflushed = 0
            if self._pacer is None:
                self._pacer = ThreadPoolExecutor(1, thread_name_prefix="bf-lun-pace")
            self._pacing = self._pacer.submit(self._pace_flush)

    def _pace_flush(self) -> None:
        try:
            self.dev.flush()
        except Exception:  # noqa: BLE001 - pacing only: the commits' own flushes report errors
            pass

    # --- superblocks and catalog ---
    def _data_end(self, sb: Superblock) -> int:
        return min(sb.device_size, self.dev.size) // UNIT * UNIT

    def _read_sbs(self) -> list:
        return [Superblock.parse(bytes(self.dev.read(off, BLOCK))) for off in SB_OFFSETS]

    def _newest(self) -> Superblock | None:
        sbs = self._read_sbs()
        valid = sorted((s for s in sbs if s), key=lambda s: s.gen, reverse=True)
        for sb in valid:
            try:
                self._load_catalog(sb)
                return sb
            except DataCorrupt:
                continue  # a torn catalog write: the previous generation holds
        if any(s is False for s in sbs) or valid:
            raise DataCorrupt(
                f"backup point {self.label}: both LUN superblocks or their catalogs are damaged", field="device"
            )
        return None

    def _load_catalog(self, sb: Superblock) -> dict:
        raw = bytes(self.dev.read(sb.slot_offset(sb.slot), _round_up(sb.cat_len, BLOCK)))[: sb.cat_len]
        if hashlib.sha256(raw).digest() != sb.cat_sha:
            raise DataCorrupt(
                f"backup point {self.label}: LUN catalog generation {sb.gen} fails its checksum", field="device"
            )
        doc = json.loads(zlib.decompress(raw))
        return {
            name: (meta[0], meta[1] if isinstance(meta[1], list) else base64.b64decode(meta[1]))
            for name, meta in doc["objects"].items()
        }

    def _blank(self) -> bool:
        size = self.dev.size
        for off in (0, max(0, size - BLANK_CHECK) // BLOCK * BLOCK):
            if any(self.dev.read(off, min(BLANK_CHECK, size - off))):
                return False
        return True

    def _format(self, allowed: bool) -> Superblock:
        if not self._blank():
            raise FailedPrecondition(
                f"backup point {self.label}: the LUN holds other data and no blockferry "
                "repository; it is never touched",
                field="device",
            )
        if not allowed:
            raise FailedPrecondition(
                f"backup point {self.label}: the LUN is blank; set format_lun = true to format it as a repository",
                field="device",
            )
        size = self.dev.size // UNIT * UNIT
        cat_size = catalog_size_for(size)
        if size < CATALOG_OFFSET + 2 * cat_size + 16 * UNIT:
            raise FailedPrecondition(f"backup point {self.label}: the LUN is too small ({size} bytes)", field="device")
        sb = Superblock(uuid.uuid4().bytes, 0, size, cat_size, 1, 0, b"")
        self.sb = sb
        self._write_catalog(sb, {}, check=False)
        return self.sb

    def _write_catalog(self, sb: Superblock, objects: dict, *, check: bool = True) -> None:
        doc = {
            "v": VERSION,
            "host": self.host,
            "objects": {
                n: [m[0], m[1] if isinstance(m[1], list) else base64.b64encode(m[1]).decode()]
                for n, m in objects.items()
            },
        }
        blob = zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 1)
        if len(blob) > sb.cat_size:
            raise NoSpace(
                f"backup point {self.label}: the LUN catalog is full ({len(objects)} objects); "
                "collect garbage or use a larger LUN",
                field="device",
            )
        if check:
            newest = max((s.gen for s in self._read_sbs() if s), default=-1)
            if newest != sb.gen:
                raise FailedPrecondition(
                    f"backup point {self.label}: another host wrote this LUN (generation "
                    f"{newest}, ours {sb.gen}); a LUN repository serves one agent at a time",
                    field="device",
                )
        slot = 1 - sb.slot
        new = Superblock(
            sb.fsid, sb.gen + 1, sb.device_size, sb.cat_size, slot, len(blob), hashlib.sha256(blob).digest()
        )
        # 1. make the data the new catalog names durable (a flush covers the
        #    whole device: every object written before this commit)
        self.dev.flush()
        # 2. the catalog into the free slot, the superblock over the older
        #    copy, then one flush. Torn in between, the new superblock's
        #    catalog checksum fails and the previous generation (whose slot
        #    was not touched) is used.
        buf = self.dev.buffer(_round_up(len(blob), BLOCK))
        buf[: len(blob)] = blob
        buf[len(blob) :] = bytes(len(buf) - len(blob))
        self.dev.write(new.slot_offset(slot), buf)
        sbuf = self.dev.buffer(BLOCK)
        sbuf[:] = new.pack()
        self.dev.write(SB_OFFSETS[new.gen % 2], sbuf)
        self.dev.flush()  # durable before the next commit may write the other slot
        self.sb = new

    def _commit(self, name: str, size: int, *, extents=None, inline: bytes | None = None) -> None:
        with self._lock:
            objects = dict(self.objects)
            old = objects.get(name)
            objects[name] = (size, [list(e) for e in extents] if inline is None else inline)
            try:
                self._write_catalog(self.sb, objects)
            except OSError as e:
                raise storage_error(self.label, f"cannot commit {name}", e) from None
            self.objects = objects
            if old is not None and isinstance(old[1], list):
                self._release(old[1])

    def _reserve(self, want: int, after: int | None) -> tuple[int, int]:
        with self._space_lock:
            got = self.space.take(_round_up(want, UNIT), after)
        if got is None:
            raise NoSpace(f"backup point {self.label}: the LUN is full", field="device")
        return got

    def _release(self, extents) -> None:
        with self._space_lock:
            for off, ln in extents:
                self.space.give(off, ln)

    # --- the ObjectStore interface ---
    def open_writer(self, name: str, *, durable: bool = True) -> ObjectWriter:
        return _LunWriter(self, name, durable)

    def _meta(self, name: str):
        meta = self.objects.get(check_object_name(name))
        if meta is None:
            raise NotFound(f"backup point {self.label}: object {name} is missing", field="name")
        return meta

    def get(self, name: str, offset: int = 0, length: int | None = None):
        size, _ = self._meta(name)
        out = bytearray(max(0, (size if length is None else min(size, offset + length)) - offset))
        self.read_into(name, offset, out)  # fills it: the object's size is known
        return out

    def read_into(self, name: str, offset: int, buf) -> int:
        size, where = self._meta(name)
        out = memoryview(buf).cast("B")
        end = min(size, offset + len(out))
        if offset >= end:
            return 0
        if not isinstance(where, list):
            out[: end - offset] = where[offset:end]
            return end - offset
        pos = 0  # object position of the current extent
        try:
            for off, ln in where:
                lo, hi = max(offset, pos), min(end, pos + ln)
                while lo < hi:  # pieces of at most SEGMENT keep the read buffers small
                    piece_hi = min(hi, lo + SEGMENT)
                    a = (lo - pos) // BLOCK * BLOCK
                    b = _round_up(piece_hi - pos, BLOCK)
                    view = self.dev.read(off + a, b - a)
                    out[lo - offset : piece_hi - offset] = view[lo - pos - a : piece_hi - pos - a]
                    lo = piece_hi
                pos += ln
                if pos >= end:
                    break
        except OSError as e:
            raise storage_error(self.label, f"cannot read {name}", e) from None
        return end - offset

    def size(self, name: str) -> int:
        return self._meta(name)[0]

    def list(self, prefix: str) -> list[str]:
        prefix = prefix.rstrip("/")
        head = prefix + "/" if prefix else ""
        return sorted(n for n in self.objects if n.startswith(head) and "/" not in n[len(head) :])

    def delete(self, name: str) -> None:
        with self._lock:
            if check_object_name(name) not in self.objects:
                return
            objects = dict(self.objects)
            old = objects.pop(name)
            try:
                self._write_catalog(self.sb, objects)
            except OSError as e:
                raise storage_error(self.label, f"cannot delete {name}", e) from None
            self.objects = objects
            if isinstance(old[1], list):
                self._release(old[1])

    def sweep_partial(self, prefix: str) -> int:
        return 0  # an uncommitted writer's space was never in a catalog

    def stats(self) -> StoreStats:
        with self._space_lock:
            total = self._data_end(self.sb) - self.sb.data_offset
            free = self.space.total()
        return StoreStats(total, total - free, free)

    def is_empty(self) -> bool:
        return not self.objects

    def close(self) -> None:
        with self._pace_lock:
            pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.shutdown(wait=True)
        self.dev.close()


class _Shared:
    """A LunStore and who uses it: the users' count, and a keyed digest of
    the credentials its sessions logged in with (never the secret itself)."""

    def __init__(self, store: LunStore, credential: bytes):
        self.store = store
        self.credential = credential
        self.users = 0


class LunRef:
    """One user's handle on a shared LunStore (a backup point's store):
    everything is the store's, except close(), which lets go of it; the
    device is closed when its last user lets go."""

    def __init__(self, key: str, shared: _Shared):
        self._key = key
        self._shared = shared
        self._closed = False

    def __getattr__(self, name):
        return getattr(self._shared.store, name)

    def close(self) -> None:
        with _OPEN_LOCK:
            if self._closed:
                return
            self._closed = True
            self._shared.users -= 1
            last = self._shared.users <= 0 and _OPEN.get(self._key) is self._shared
            if last:
                del _OPEN[self._key]
        if last:
            self._shared.store.close()


_OPEN: dict[str, _Shared] = {}
_OPEN_LOCK = threading.Lock()
_CREDENTIAL_KEY = secrets.token_bytes(32)


def credential_digest(user: str, secret: str) -> bytes:
    """What open_lun compares credentials by: an HMAC under a key of this
    process, so no copy of the secret is kept."""
    return hmac.new(_CREDENTIAL_KEY, f"{user}\0{secret}".encode(), hashlib.sha256).digest()


def open_lun(key: str, opener, *, credential: bytes = b"", format_lun: bool = False, label: str = "") -> LunRef:
    """One LunStore per device in this process (its allocator and catalog
    generation must not be shared between two instances), shared only
    between users of identical credentials (credential_digest; b"" for a
    local device). A user with other credentials logs in with its own
    first, so wrong ones get AUTH_FAILED as they would alone; right but
    different ones are refused while the device is open: sessions never
    serve a user who did not log in with their credentials."""
    with _OPEN_LOCK:  # one opener at a time: two could both format a blank LUN
        shared = _OPEN.get(key)
        if shared is None:
            dev = opener()
            try:
                store = LunStore(dev, format_lun=format_lun, label=label)
            except BaseException:
                dev.close()
                raise
            shared = _OPEN[key] = _Shared(store, credential)
        elif not hmac.compare_digest(shared.credential, credential):
            opener().close()  # the caller's own login: AuthFailed for credentials the target refuses
            raise FailedPrecondition(
                f"backup_point_uuid: {label or key}: this agent serves the LUN's repository "
                "for a backup point with other credentials; one LUN is reached with one set "
                "of credentials at a time",
                field="backup_point_uuid",
            )
        shared.users += 1
        return LunRef(key, shared)


def forget_lun(key: str) -> None:
    """Close the device whoever uses it (tests; a detached device)."""
    with _OPEN_LOCK:
        shared = _OPEN.pop(key, None)
    if shared is not None:
        shared.store.close()
