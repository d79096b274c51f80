"""A repository on an object store: chunks deduplicated in packs, manifests.

New chunk records are appended to an open pack, streamed to the store; a
pack is committed with its index when it reaches the store's pack_target or when a
backup publishes its manifest. A manifest is committed only after every pack
and the block-digest object it needs, so a crash never lists a backup that
cannot be restored.

On a store whose writers are independent (a directory), a full pack is
committed by a background thread while the next one fills, so the disk
writes continuously instead of stalling the backup at every pack; at most
COMMIT_QUEUE packs wait, which bounds the dirty data in flight. flush()
waits for every pending commit and raises its error.

The in-memory index (chunk id -> pack, offset, length) is rebuilt from the
pack indexes; refresh() picks up packs committed by other agents and drops
packs that a garbage collection removed. Every operation refreshes after it
takes its repository lock, so a backup never deduplicates against a chunk a
finished GC removed.
"""

from __future__ import annotations

import json
import queue
import threading
import uuid
from dataclasses import dataclass

import zstandard

from agent.errors import AlreadyExists, DataCorrupt, FailedPrecondition, NotFound, StorageIOError
from agent.repo import crypto
from agent.repo.format import (
    BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    ZERO,
    Manifest,
    block_record_size,
    decode_chunk,
    encode_chunk,
)
from agent.stores.base import ObjectStore
from agent.stores.locks import EXCLUSIVE, SHARED, RepoLock

COMMIT_QUEUE = 2
SHARED_WAIT = 3600.0
MIN_CHUNK, MAX_CHUNK = 64 << 10, 64 << 20


@dataclass(frozen=True)
class Location:
    pack: str
    offset: int
    length: int  # of the record
    plain: int  # plaintext bytes of the chunk


@dataclass(frozen=True)
class RepoStats:
    backups: int
    chunks: int
    logical_bytes: int  # non-zero data of all backups, as the volumes hold it
    unique_bytes: int  # after deduplication
    stored_bytes: int  # after compression (and encryption): what the packs hold
    packs: int


class _OpenPack:
    def __init__(self, store: ObjectStore):
        self.name = f"packs/{uuid.uuid4().hex}"
        self.writer = store.open_bulk_writer(self.name)
        self.entries: dict[bytes, Location] = {}


class Repository:
    def __init__(self, store: ObjectStore, config: dict, sealer: crypto.Sealer):
        self.store = store
        self.config = config
        self.id: str = config["id"]
        self.chunk_size: int = config["chunk_size"]
        self.sealer = sealer
        self.compression: str = config.get("compression", "zstd")
        self._lock = threading.RLock()
        self._index: dict[bytes, Location] = {}
        self._packs: dict[str, list[bytes]] = {}  # committed pack -> chunk ids its index lists
        self._open: _OpenPack | None = None
        self._write_lock = threading.Lock()  # appends to the open pack and its commit (I/O), apart from _lock
        self._committing: dict[str, _OpenPack] = {}  # full packs handed to the committer thread
        self._commits: queue.Queue | None = None
        self._committer: threading.Thread | None = None
        self._commit_error: BaseException | None = None
        self._commit_state = threading.Lock()  # starts and stops the committer thread
        self._local = threading.local()
        self.refresh()

    # ---- creation ----

    @classmethod
    def init(
        cls, store: ObjectStore, *, chunk_size: int = DEFAULT_CHUNK_SIZE, password: str = "", compression: str = "zstd"
    ) -> Repository:
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size % BLOCK_SIZE:
            raise FailedPrecondition(
                "chunk_size: must be a multiple of 64 KiB between 64 KiB and 64 MiB", field="chunk_size"
            )
        if compression not in ("zstd", "none"):
            raise FailedPrecondition("compression: must be zstd or none", field="compression")
        try:
            store.get("config")
            raise FailedPrecondition("backup point: already holds a repository", field="backup_point_uuid")
        except NotFound:
            pass
        config = {
            "format_version": FORMAT_VERSION,
            "id": str(uuid.uuid4()),
            "chunk_size": chunk_size,
            "block_size": BLOCK_SIZE,
            "compression": compression,
        }
        sealer: crypto.Sealer = crypto.Sealer()
        if password:
            config["encryption"], sealer = crypto.new_encryption(password, config["id"])
        try:  # of two agents creating it at once, one wins (atomically where the store can say so)
            store.publish("config", json.dumps(config, sort_keys=True).encode(), create_only=True)
        except AlreadyExists:
            raise FailedPrecondition(
                "backup point: another writer created a repository there just now", field="backup_point_uuid"
            ) from None
        return cls(store, config, sealer)

    @classmethod
    def open(cls, store: ObjectStore, *, password: str = "") -> Repository:
        try:
            config = json.loads(store.get("config"))
        except ValueError:
            raise DataCorrupt("backup point: the repository config is damaged") from None
        if not isinstance(config, dict) or "format_version" not in config:
            raise DataCorrupt("backup point: the repository config is damaged")
        if config["format_version"] > FORMAT_VERSION:
            raise FailedPrecondition(
                f"backup point: repository format {config['format_version']} is newer than "
                f"this agent's ({FORMAT_VERSION}); upgrade the agent",
                field="backup_point_uuid",
            )
        return cls(store, config, crypto.open_encryption(config, password))

    # ---- locks ----

    def shared(self, purpose: str, timeout: float = SHARED_WAIT, checkpoint=None) -> RepoLock:
        """Backups, restores, verifies, deletes: wait (cancellably) while a GC runs."""
        return RepoLock(self.store, SHARED, purpose, timeout=timeout, checkpoint=checkpoint)

    def exclusive(self, purpose: str, timeout: float = 0.0, checkpoint=None) -> RepoLock:
        """GC: refused at once while anything else holds the repository."""
        return RepoLock(self.store, EXCLUSIVE, purpose, timeout=timeout, checkpoint=checkpoint)

    # ---- index ----

    def _read_index(self, pack: str) -> dict[bytes, Location]:
        raw = self.sealer.open(self.store.get(f"{pack}.idx"), f"index:{pack}".encode(), f"index of {pack}")
        try:
            return {bytes.fromhex(k): Location(pack, *v) for k, v in json.loads(raw).items()}
        except (ValueError, TypeError):
            raise DataCorrupt(f"index of {pack} is damaged") from None

    def refresh(self) -> None:
        """Load packs committed since the last look; forget removed ones.
        Only packs known before the listing can count as removed: one this
        process commits meanwhile (another backup's) is simply not listed
        yet."""
        with self._lock:
            known = set(self._packs)
        present = {n[:-4] for n in self.store.list("packs") if n.endswith(".idx")}
        with self._lock:
            for pack in (known - present) & set(self._packs):
                for cid in self._packs.pop(pack):
                    loc = self._index.get(cid)
                    if loc is not None and loc.pack == pack:
                        del self._index[cid]
            new = present - set(self._packs)
        for pack in sorted(new):
            try:
                entries = self._read_index(pack)
            except NotFound:
                continue  # removed meanwhile
            with self._lock:
                self._packs[pack] = list(entries)
                for cid, loc in entries.items():
                    self._index.setdefault(cid, loc)

    def _known(self, cid: bytes) -> bool:  # under self._lock
        return (
            cid in self._index
            or (self._open is not None and cid in self._open.entries)
            or any(cid in p.entries for p in self._committing.values())
        )

    def has(self, cid: bytes) -> bool:
        with self._lock:
            return self._known(cid)

    def location(self, cid: bytes) -> Location | None:
        with self._lock:
            return self._index.get(cid)

    # ---- chunks ----

    def _compressor(self):
        if self.compression != "zstd":
            return None
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=1)
        return c

    def _decompressor(self):
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, cid: bytes, data) -> list:
        """The stored record of a chunk, in pieces (thread-safe; call from workers)."""
        return encode_chunk(data, cid, self._compressor(), self.sealer)

    def add(self, cid: bytes, record: list, plain: int, written: set[str] | None = None) -> int:
        """Append an encoded chunk unless present; returns the bytes stored.
        The pack write (network or device I/O) holds only the write lock, so
        workers asking has() meanwhile are not held behind it. written: a
        set the pack's name goes into when the chunk is stored (what a
        failed backup wrote, for gc.reclaim)."""
        length = sum(len(piece) for piece in record)
        self._raise_commit_error()
        with self._write_lock:  # one thread appends to the open pack at a time
            p = self._open  # changed only under the write lock
            if p is None:
                p = _OpenPack(self.store)
                with self._lock:
                    self._open = p
            with self._lock:
                if self._known(cid):
                    return 0
                p.entries[cid] = Location(p.name, p.writer.size, length, plain)
            if written is not None:
                written.add(p.name)
            try:
                for piece in record:
                    p.writer.write(piece)
            except BaseException:  # the writer aborted itself: this pack is gone, with what it held
                with self._lock:
                    self._open = None
                p.writer.abort()
                raise
            if p.writer.size < self.store.pack_target:
                return length
            if not self.store.concurrent_writers:
                self._commit_pack()
                return length
            with self._lock:
                self._open = None
                self._committing[p.name] = p
        self._background_commit(p)  # outside the locks: it may wait for a queue slot
        return length

    def _commit_pack(self) -> None:
        """Commit the open pack in this thread (under the write lock); its
        chunks stay known (as committing) meanwhile."""
        with self._lock:
            p, self._open = self._open, None
            if p is None:
                return
            self._committing[p.name] = p
        try:
            self._write_pack(p)
        finally:
            with self._lock:
                self._committing.pop(p.name, None)

    def _write_pack(self, p: _OpenPack) -> None:
        """Make a pack and its index durable, then index its chunks."""
        if not p.entries:
            p.writer.abort()
            return
        try:
            p.writer.commit()
            index = {cid.hex(): [loc.offset, loc.length, loc.plain] for cid, loc in p.entries.items()}
            self.store.publish(
                f"{p.name}.idx", self.sealer.seal(json.dumps(index).encode(), f"index:{p.name}".encode())
            )
        except BaseException:
            self.store.delete(p.name)
            raise
        with self._lock:
            self._packs[p.name] = list(p.entries)
            for cid, loc in p.entries.items():
                self._index.setdefault(cid, loc)

    # ---- background commits ----

    def _background_commit(self, p: _OpenPack) -> None:
        with self._commit_state:
            if self._committer is None:
                self._commits = queue.Queue(maxsize=COMMIT_QUEUE)
                self._committer = threading.Thread(
                    target=self._commit_loop, args=(self._commits,), name="bf-pack-commit", daemon=True
                )
                self._committer.start()
            self._commits.put(p)  # waits while COMMIT_QUEUE packs are pending

    def _commit_loop(self, q: queue.Queue) -> None:
        while True:
            p = q.get()
            try:
                if p is None:
                    return
                if self._commit_error is not None:
                    p.writer.abort()  # the backup fails anyway: keep no orphan pack
                else:
                    self._write_pack(p)
            except BaseException as e:  # raised by the next add() or flush()
                self._commit_error = e
            finally:
                if p is not None:
                    with self._lock:
                        self._committing.pop(p.name, None)

    def _raise_commit_error(self) -> None:
        if self._commit_error is not None:
            e, self._commit_error = self._commit_error, None
            raise e

    def _wait_commits(self) -> None:
        with self._commit_state:
            q, t = self._commits, self._committer
            if q is not None and t is not None:
                q.put(None)  # after the pending packs; the next full pack starts another thread
                t.join()
                self._commits = self._committer = None
        self._raise_commit_error()

    def settle(self) -> None:
        """After a failed backup: wait for the background commits and stop
        the committer thread; their errors are the failed backup's."""
        try:
            self._wait_commits()
        except Exception:  # noqa: BLE001 - the backup reports its own error
            pass

    def discard_open(self) -> None:
        """Drop the open pack and the chunks it holds (only under the
        exclusive lock, when no backup can be appending to it)."""
        with self._write_lock:
            with self._lock:
                p, self._open = self._open, None
            if p is not None:
                p.writer.abort()

    def flush(self) -> None:
        """Commit the open pack and its index, and every pack committing in
        the background (durably)."""
        try:
            self._wait_commits()
        finally:
            with self._write_lock:
                self._commit_pack()

    def read_record(self, cid: bytes, into: bytearray | None = None) -> tuple[Location, bytes]:
        """A chunk's location and stored record (unchecked); into: a
        recycled buffer the record is read into when it fits (the record
        returned is then a view of it)."""
        loc = self.location(cid)
        if loc is None:
            raise DataCorrupt(f"chunk {cid.hex()}: in no pack index")
        try:
            if into is not None and len(into) >= loc.length:
                view = memoryview(into)[: loc.length]
                return loc, view[: self.store.read_into(loc.pack, loc.offset, view)]
            return loc, self.store.get(loc.pack, loc.offset, loc.length)
        except NotFound:
            raise DataCorrupt(f"chunk {cid.hex()} in {loc.pack}: its pack is missing") from None

    def prefetch(self, cid: bytes) -> None:
        loc = self.location(cid)
        if loc is not None:
            self.store.prefetch(loc.pack, loc.offset, loc.length)

    def get(self, cid: bytes, out: bytearray | None = None, record_buf: bytearray | None = None) -> tuple[bytes, bytes]:
        """A chunk's data and block digests, checked (thread-safe). out: a
        recycled buffer a compressed chunk is decompressed into; record_buf:
        one its stored record is read into (the data returned may be a view
        of either)."""
        loc, record = self.read_record(cid, record_buf)
        return decode_chunk(record, cid, self._decompressor(), self.sealer, loc.pack, out)

    # ---- block digests ----

    def block_writer(self, backup_id: str) -> BlockWriter:
        return BlockWriter(self, backup_id)

    def block_reader(self, backup_id: str) -> BlockReader:
        return BlockReader(self, backup_id)

    # ---- manifests ----

    def publish_manifest(self, manifest: Manifest) -> None:
        self.flush()  # every chunk the manifest names is durable first
        with self._lock:  # a pack another backup shared failed to commit: never list this one
            lost = [cid for cid in manifest.chunks if cid != ZERO and bytes.fromhex(cid) not in self._index]
        if lost:
            raise StorageIOError(
                f"backup point: {len(lost)} chunk(s) of backup {manifest.backup_id} were lost "
                f"when a pack failed to commit (first {lost[0]}); run the backup again"
            )
        self.store.publish(
            f"manifests/{manifest.backup_id}",
            self.sealer.seal(manifest.to_bytes(), f"manifest:{manifest.backup_id}".encode()),
        )

    def manifest(self, backup_id: str) -> Manifest:
        try:
            raw = self.store.get(f"manifests/{backup_id}")
        except NotFound:
            raise NotFound(f"backup_uuid: no backup {backup_id} on this backup point", field="backup_uuid") from None
        return Manifest.from_bytes(
            self.sealer.open(raw, f"manifest:{backup_id}".encode(), f"backup {backup_id}"), backup_id
        )

    def has_backup(self, backup_id: str) -> bool:
        """Whether a backup with this id is listed (one lookup, not a listing)."""
        try:
            self.store.size(f"manifests/{backup_id}")
            return True
        except NotFound:
            return False

    def backup_ids(self) -> list[str]:
        return [n.split("/", 1)[1] for n in self.store.list("manifests")]

    def manifests(self) -> list[Manifest]:
        out = []
        for bid in self.backup_ids():
            try:
                out.append(self.manifest(bid))
            except NotFound:
                continue  # deleted meanwhile
        return sorted(out, key=lambda m: m.created_at)

    def delete_backup(self, backup_id: str) -> None:
        """Unlist a backup (its chunks go at the next GC). Other backups never
        depend on it."""
        self.manifest(backup_id)  # exists and is readable
        self.store.delete(f"manifests/{backup_id}")
        self.store.delete(f"blocks/{backup_id}")

    def stats(self) -> RepoStats:
        manifests = self.manifests()
        with self._lock:
            unique = sum(loc.plain for loc in self._index.values())
            chunks = len(self._index)
            packs = list(self._packs)
        stored = sum(self.store.size(p) for p in packs)
        return RepoStats(len(manifests), chunks, sum(m.data_bytes for m in manifests), unique, stored, len(packs))


class BlockWriter:
    """Writes blocks/<backup id>: one fixed-size record per chunk, in order."""

    def __init__(self, repo: Repository, backup_id: str):
        self.repo = repo
        self.backup_id = backup_id
        self.record = repo.chunk_size // BLOCK_SIZE * 32
        self.writer = repo.store.open_writer(f"blocks/{backup_id}")
        self.n = 0

    def add(self, digests: bytes) -> None:
        plain = digests.ljust(self.record, b"\0")
        self.writer.write(self.repo.sealer.seal(plain, f"blocks:{self.backup_id}:{self.n}".encode()))
        self.n += 1

    def commit(self) -> None:
        self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()


class BlockReader:
    """Reads the block-digest records of a backup in order, a window at a time."""

    WINDOW = 256

    def __init__(self, repo: Repository, backup_id: str):
        self.repo = repo
        self.backup_id = backup_id
        self.size = block_record_size(repo.chunk_size, repo.sealer)
        self._start = 0
        self._buf = b""

    def get(self, i: int, nblocks: int) -> bytes:
        if not self._start <= i < self._start + len(self._buf) // self.size:
            self._start = i
            try:
                self._buf = self.repo.store.get(f"blocks/{self.backup_id}", i * self.size, self.WINDOW * self.size)
            except NotFound:
                raise DataCorrupt(f"backup {self.backup_id}: its block digests are missing") from None
            if len(self._buf) < self.size:
                raise DataCorrupt(f"backup {self.backup_id}: its block digests end before chunk {i}")
        off = (i - self._start) * self.size
        raw = self._buf[off : off + self.size]
        plain = self.repo.sealer.open(
            raw, f"blocks:{self.backup_id}:{i}".encode(), f"block digests of backup {self.backup_id}"
        )
        return plain[: nblocks * 32]
