"""A repository on an object store: chunks deduplicated in packs, manifests.

Writes go to a pack buffer; a full pack (or the end of a backup) is written
with its index. A manifest is published only after every pack it needs is
durable, so a crash never leaves a backup listed that cannot be restored.
"""
from __future__ import annotations

import json
import threading
import uuid

import zstandard

from agent.errors import FailedPrecondition, NotFound, StorageIOError
from agent.repo.format import (DEFAULT_CHUNK_SIZE, FORMAT_VERSION, Manifest, decode_chunk, encode_chunk)
from agent.repo.store import ObjectStore

PACK_TARGET = 64 << 20


class Repository:
    def __init__(self, store: ObjectStore, config: dict):
        self.store = store
        self.config = config
        self.chunk_size: int = config["chunk_size"]
        self._lock = threading.Lock()
        self._index: dict[bytes, tuple[str, int, int]] = {}  # digest -> (pack, offset, length)
        self._pack = bytearray()
        self._pack_index: dict[str, list[int]] = {}
        self._compressor = zstandard.ZstdCompressor(level=3)
        self._decompressor = zstandard.ZstdDecompressor()
        self._load_index()

    @classmethod
    def init(cls, store: ObjectStore, chunk_size: int = DEFAULT_CHUNK_SIZE) -> "Repository":
        if chunk_size <= 0 or chunk_size % 65536:
            raise FailedPrecondition("chunk_size: must be a positive multiple of 64 KiB", field="chunk_size")
        try:
            store.get("config")
            raise FailedPrecondition("backup point: already holds a repository", field="backup_point")
        except NotFound:
            pass
        config = {"format_version": FORMAT_VERSION, "id": str(uuid.uuid4()), "chunk_size": chunk_size}
        store.publish("config", json.dumps(config).encode())
        return cls(store, config)

    @classmethod
    def open(cls, store: ObjectStore) -> "Repository":
        config = json.loads(store.get("config"))
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise FailedPrecondition(f"backup point: repository format {config['format_version']} is newer than "
                                     f"this agent ({FORMAT_VERSION}); upgrade the agent", field="backup_point")
        return cls(store, config)

    def _load_index(self) -> None:
        for name in self.store.list("packs"):
            if name.endswith(".idx"):
                pack = name[:-4]
                for digest_hex, (offset, length) in json.loads(self.store.get(name)).items():
                    self._index[bytes.fromhex(digest_hex)] = (pack, offset, length)

    def has(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._index or digest.hex() in self._pack_index

    def put(self, digest: bytes, data) -> int:
        """Store a chunk unless present; returns the bytes stored (0 if deduplicated)."""
        if self.has(digest):
            return 0
        record = encode_chunk(data, digest, self._compressor)
        with self._lock:
            if digest.hex() in self._pack_index:
                return 0
            self._pack_index[digest.hex()] = [len(self._pack), len(record)]
            self._pack += record
            full = len(self._pack) >= PACK_TARGET
        if full:
            self.flush()
        return len(record)

    def flush(self) -> None:
        """Write the open pack and its index (durably)."""
        with self._lock:
            if not self._pack_index:
                return
            pack, index = bytes(self._pack), dict(self._pack_index)
            self._pack, self._pack_index = bytearray(), {}
        name = f"packs/{uuid.uuid4().hex}"
        self.store.put(name, pack)
        self.store.publish(f"{name}.idx", json.dumps(index).encode())
        with self._lock:
            for digest_hex, (offset, length) in index.items():
                self._index[bytes.fromhex(digest_hex)] = (name, offset, length)

    def get(self, digest: bytes) -> bytes:
        with self._lock:
            loc = self._index.get(digest)
        if loc is None:
            raise StorageIOError(f"chunk {digest.hex()} is missing from the repository")
        pack, offset, length = loc
        try:
            data = self.store.get(pack)
        except NotFound:
            raise StorageIOError(f"chunk {digest.hex()}: pack {pack} is missing") from None
        return decode_chunk(data[offset:offset + length], digest, self._decompressor, pack)

    def publish_manifest(self, manifest: Manifest) -> None:
        self.flush()  # every chunk the manifest names is durable first
        self.store.publish(f"manifests/{manifest.backup_id}", manifest.to_bytes())

    def manifest(self, backup_id: str) -> Manifest:
        try:
            return Manifest.from_bytes(self.store.get(f"manifests/{backup_id}"), backup_id)
        except NotFound:
            raise NotFound(f"backup_uuid: no backup {backup_id} in this repository", field="backup_uuid") from None

    def manifests(self) -> list[Manifest]:
        return sorted((self.manifest(n.split("/", 1)[1]) for n in self.store.list("manifests")),
                      key=lambda m: m.created_at)
