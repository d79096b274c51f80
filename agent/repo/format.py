"""Repository format v1 (pinned by tests; change only with a new version).

    config                  JSON: format_version, repository id, chunk_size
    packs/<pack id>         concatenated chunk records
    packs/<pack id>.idx     JSON index: digest -> [offset, length] of its records
    manifests/<backup id>   JSON manifest, published durably and atomically last

A chunk record is: magic b"BFC1", flags (1 byte: 1 = zstd), 3 reserved bytes,
plaintext length (8 bytes LE), stored length (8 bytes LE), SHA-256 of the
plaintext (32 bytes), then the stored bytes. The chunk is addressed by that
SHA-256, so every chunk carries its own checksum. Zero chunks are never
stored: the manifest marks them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field

from agent.errors import FailedPrecondition, StorageIOError

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
MAGIC = b"BFC1"
FLAG_ZSTD = 1
HEADER = struct.Struct("<4sB3xQQ32s")
ZERO = ""  # the digest of a zero chunk in a manifest


def encode_chunk(data, digest: bytes, compressor) -> bytes:
    flags = 0
    stored = bytes(data)
    if compressor is not None:
        packed = compressor.compress(stored)
        if len(packed) < len(stored) * 0.9:  # only when it pays
            stored, flags = packed, FLAG_ZSTD
    return HEADER.pack(MAGIC, flags, len(data), len(stored), digest) + stored


def decode_chunk(record: bytes, digest: bytes, decompressor, where: str) -> bytes:
    if len(record) < HEADER.size:
        raise StorageIOError(f"chunk {digest.hex()}: record in {where} is truncated")
    magic, flags, plain_len, stored_len, recorded = HEADER.unpack_from(record)
    body = record[HEADER.size:]
    if magic != MAGIC or recorded != digest or len(body) != stored_len:
        raise StorageIOError(f"chunk {digest.hex()}: record in {where} is damaged")
    data = decompressor.decompress(body, max_output_size=plain_len) if flags & FLAG_ZSTD else body
    if len(data) != plain_len or hashlib.sha256(data).digest() != digest:
        raise StorageIOError(f"chunk {digest.hex()}: checksum mismatch in {where}")
    return data


@dataclass
class Manifest:
    backup_id: str
    volume_uuid: str
    snapshot_uuid: str
    size: int
    chunk_size: int
    chunks: list[str]  # hex SHA-256 per chunk, ZERO for a zero chunk
    image_digest: str  # bf-image-sha256-v1 of the source snapshot
    created_at: float
    parent: str | None = None  # for information only: restores never read it
    name: str = ""
    description: str = ""
    tenant: str = ""
    pool_uuid: str = ""
    agent_version: str = ""
    fell_back: bool = False  # change tracking was lost; changed chunks found by digest
    format_version: int = FORMAT_VERSION
    stats: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except ValueError:
            raise StorageIOError(f"manifest {where} is not valid JSON (tampered or damaged)") from None
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise FailedPrecondition(f"manifest {where} has format {d['format_version']}, newer than this "
                                     f"agent ({FORMAT_VERSION}); upgrade the agent")
        try:
            return cls(**d)
        except TypeError as e:
            raise StorageIOError(f"manifest {where} is malformed: {e}") from None
