"""Repository format v1 (pinned by tests; change only with a new version).

    config                    JSON, never encrypted: format_version, id,
                              chunk_size, block_size, encryption (absent, or
                              cipher + kdf parameters + verifier)
    packs/<pack id>           concatenated chunk records
    packs/<pack id>.idx       index of the pack: chunk id -> offset, record
                              length, plaintext length (sealed)
    blocks/<backup id>        the backup's block digests: one fixed-size
                              record per chunk (sealed per record)
    manifests/<backup id>     the manifest, JSON (sealed), committed last
    locks/<lock id>           repository locks (JSON, plain)

A chunk record is a header: magic b"BFC1", flags (1 byte: 1 = zstd,
2 = AES-256-GCM), 3 reserved bytes, plaintext length (u64 LE), stored length
(u64 LE), chunk id (32 bytes); then the stored bytes: the plaintext, or its
zstd frame when that is at least 10 % smaller, sealed when encrypted
(12-byte nonce, ciphertext, 16-byte tag; the chunk id is the associated
data). The chunk id is SHA-256 of the plaintext, or HMAC-SHA256 under the
repository's MAC key when encrypted, so every chunk carries its own checksum.
Zero chunks are never stored: a manifest marks them with "".

Block digests are SHA-256 of each 64 KiB block of a chunk, the inputs of the
image digest bf-image-sha256-v1. Keeping them per backup lets an incremental
backup compute the image digest of the new snapshot from the parent's
records and the chunks it reads, without reading the unchanged data.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field

from agent.errors import DataCorrupt, FailedPrecondition

FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 << 20
BLOCK_SIZE = 64 << 10  # of the image digest (native imagehash.h)
MAGIC = b"BFC1"
FLAG_ZSTD = 1
FLAG_SEALED = 2
HEADER = struct.Struct("<4sB3xQQ32s")
ZERO = ""  # the id of a zero chunk in a manifest
COMPRESS_GAIN = 0.9  # keep the zstd frame only when it is at most 90 % of the plaintext


def encode_chunk(data, chunk_id: bytes, compressor, sealer) -> bytes:
    flags = 0
    stored = data
    if compressor is not None:
        packed = compressor.compress(data)
        if len(packed) <= len(data) * COMPRESS_GAIN:
            stored, flags = packed, FLAG_ZSTD
    if sealer.encrypted:
        stored, flags = sealer.seal(stored, chunk_id), flags | FLAG_SEALED
    return HEADER.pack(MAGIC, flags, len(data), len(stored), chunk_id) + bytes(stored)


def decode_chunk(record: bytes, chunk_id: bytes, decompressor, sealer, where: str) -> bytes:
    what = f"chunk {chunk_id.hex()} in {where}"
    if len(record) < HEADER.size:
        raise DataCorrupt(f"{what}: record is truncated")
    magic, flags, plain_len, stored_len, recorded = HEADER.unpack_from(record)
    body = record[HEADER.size:]
    if magic != MAGIC or recorded != chunk_id:
        raise DataCorrupt(f"{what}: record header is damaged")
    if len(body) != stored_len:
        raise DataCorrupt(f"{what}: record is truncated")
    if bool(flags & FLAG_SEALED) != sealer.encrypted:
        raise DataCorrupt(f"{what}: record encryption flag does not match the repository")
    if flags & FLAG_SEALED:
        body = sealer.open(body, chunk_id, what)
    try:
        data = decompressor.decompress(body, max_output_size=plain_len) if flags & FLAG_ZSTD else body
    except Exception:  # zstd raises its own error type for a damaged frame
        raise DataCorrupt(f"{what}: compressed data is damaged") from None
    if len(data) != plain_len or sealer.chunk_id(data) != chunk_id:
        raise DataCorrupt(f"{what}: checksum mismatch")
    return data


def block_record_size(chunk_size: int, sealer) -> int:
    return chunk_size // BLOCK_SIZE * 32 + sealer.overhead


@dataclass
class Manifest:
    backup_id: str
    volume_uuid: str
    snapshot_uuid: str
    size: int
    chunk_size: int
    chunks: list[str]  # hex chunk id per chunk, ZERO for a zero chunk
    image_digest: str  # bf-image-sha256-v1 of the source snapshot
    created_at: float
    parent: str | None = None  # for information only: restores never read it
    name: str = ""
    description: str = ""
    tenant: str = ""
    pool_uuid: str = ""
    snapshot_name: str = ""
    agent_version: str = ""
    mode: str = "full"  # full, incremental, or fallback (tracking lost: every chunk re-read, digests compared)
    format_version: int = FORMAT_VERSION
    stats: dict = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.mode == "fallback"

    @property
    def data_bytes(self) -> int:
        """Logical bytes of the non-zero chunks."""
        return sum(min(self.chunk_size, self.size - i * self.chunk_size)
                   for i, c in enumerate(self.chunks) if c != ZERO)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except ValueError:
            raise DataCorrupt(f"backup {where}: manifest is not valid JSON (damaged or tampered)") from None
        if not isinstance(d, dict):
            raise DataCorrupt(f"backup {where}: manifest is malformed")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise FailedPrecondition(f"backup {where}: manifest format {d['format_version']} is newer than this "
                                     f"agent's ({FORMAT_VERSION}); upgrade the agent", field="backup_uuid")
        try:
            m = cls(**d)
        except TypeError as e:
            raise DataCorrupt(f"backup {where}: manifest is malformed: {e}") from None
        if len(m.chunks) != (m.size + m.chunk_size - 1) // m.chunk_size:
            raise DataCorrupt(f"backup {where}: manifest lists {len(m.chunks)} chunks for {m.size} bytes")
        return m
