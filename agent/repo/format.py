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
data). Zero chunks are never stored: a manifest marks them with "".

Block digests are SHA-256 of each 64 KiB block of a chunk (the last one may
be short), computed by the native core: the inputs of the image digest
bf-image-sha256-v1. A chunk's id is SHA-256 of its block digests
concatenated (a two-level hash tree), or HMAC-SHA256 of them under the
repository's MAC key when encrypted, so every chunk carries its own checksum
and one pass over the data yields both the id and the image digest's inputs.
Keeping block digests per backup lets an incremental backup compute the image
digest of the new snapshot from the parent's records and the chunks it reads,
without reading the unchanged data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field

from agent import native
from agent.errors import DataCorrupt, FailedPrecondition

FORMAT_VERSION = 1  # of the repository (its config)
MANIFEST_VERSION = 2  # the newest manifest this agent reads: 2 adds "vm"; one without a VM is still written as 1
DEFAULT_CHUNK_SIZE = 4 << 20
BLOCK_SIZE = 64 << 10  # of the image digest (native imagehash.h)
MAGIC = b"BFC1"
FLAG_ZSTD = 1
FLAG_SEALED = 2
HEADER = struct.Struct("<4sB3xQQ32s")
ZERO = ""  # the id of a zero chunk in a manifest
COMPRESS_GAIN = 0.9  # keep the zstd frame only when it is at most 90 % of the plaintext


_ZERO_BLOCK = hashlib.sha256(bytes(BLOCK_SIZE)).digest()


def block_digests(data) -> bytes:
    """SHA-256 of each 64 KiB block (one thread: callers run in parallel)."""
    return native.block_digests("sha256", data, BLOCK_SIZE, 1).digests


def zero_block_digests(length: int) -> bytes:
    """Block digests of `length` zero bytes."""
    full, rest = divmod(length, BLOCK_SIZE)
    return _ZERO_BLOCK * full + (hashlib.sha256(bytes(rest)).digest() if rest else b"")


class ImageDigest:
    """bf-image-sha256-v1 assembled from block digests, in order: SHA-256
    over every block digest, then the length as 8 bytes little-endian (the
    same value native.ImageHash computes from the bytes)."""

    def __init__(self) -> None:
        self._outer = hashlib.sha256()
        self.length = 0

    def add(self, digests: bytes, length: int) -> None:
        self._outer.update(digests)
        self.length += length

    def add_zero(self, length: int) -> None:
        self.add(zero_block_digests(length), length)

    def hexdigest(self) -> str:
        h = self._outer.copy()
        h.update(self.length.to_bytes(8, "little"))
        return h.hexdigest()


SAMPLE = 64 << 10


def _worth_compressing(data, compressor) -> bool:
    """Three 64 KiB samples (start, middle, end) of a large chunk: when none
    shrinks by 3 %, the chunk is taken as incompressible (encrypted or
    already compressed guest data) and zstd is not run over all of it."""
    n = len(data)
    if n < 8 * SAMPLE:
        return True
    view = memoryview(data)
    for off in (0, n // 2 - SAMPLE // 2, n - SAMPLE):
        if len(compressor.compress(view[off : off + SAMPLE])) < SAMPLE * 0.97:
            return True
    return False


def encode_chunk(data, chunk_id: bytes, compressor, sealer) -> list:
    """The record of a chunk as pieces to write one after the other (the
    plaintext itself is one of them when stored as it is: no copy)."""
    flags = 0
    stored = data
    if compressor is not None and _worth_compressing(data, compressor):
        packed = compressor.compress(data)
        if len(packed) <= len(data) * COMPRESS_GAIN:
            stored, flags = packed, FLAG_ZSTD
    if sealer.encrypted:
        stored, flags = sealer.seal(stored, chunk_id), flags | FLAG_SEALED
    return [HEADER.pack(MAGIC, flags, len(data), len(stored), chunk_id), stored]


def decode_chunk(
    record: bytes, chunk_id: bytes, decompressor, sealer, where: str, out: bytearray | None = None
) -> tuple[bytes, bytes]:
    """The chunk's data and its block digests, after every check. With out
    (a recycled buffer of at least the chunk's length), a compressed chunk
    is decompressed into it by the native core and the data returned is a
    view of out: no fresh allocation per chunk."""
    what = f"chunk {chunk_id.hex()} in {where}"
    if len(record) < HEADER.size:
        raise DataCorrupt(f"{what}: record is truncated")
    magic, flags, plain_len, stored_len, recorded = HEADER.unpack_from(record)
    body = memoryview(record)[HEADER.size :]
    if magic != MAGIC or recorded != chunk_id:
        raise DataCorrupt(f"{what}: record header is damaged")
    if len(body) != stored_len:
        raise DataCorrupt(f"{what}: record is truncated")
    if bool(flags & FLAG_SEALED) != sealer.encrypted:
        raise DataCorrupt(f"{what}: record encryption flag does not match the repository")
    if flags & FLAG_SEALED:
        body = sealer.open(bytes(body), chunk_id, what)
    try:
        if not flags & FLAG_ZSTD:
            data = body
        elif out is not None and len(out) >= plain_len:
            target = memoryview(out)[:plain_len]
            data = target[: native.zstd_decompress_into(body, target)]
        else:
            data = decompressor.decompress(body, max_output_size=plain_len)
    except Exception:  # zstd raises its own error type for a damaged frame (native: ValueError)
        raise DataCorrupt(f"{what}: compressed data is damaged") from None
    if len(data) != plain_len:
        raise DataCorrupt(f"{what}: length mismatch")
    digests = block_digests(data)
    if sealer.chunk_id(digests) != chunk_id:
        raise DataCorrupt(f"{what}: checksum mismatch")
    return data, digests


def block_record_size(chunk_size: int, sealer) -> int:
    return chunk_size // BLOCK_SIZE * 32 + sealer.overhead


@dataclass
class BackupStats:
    """What a backup read and stored: the manifest's "stats", for
    information (restores never read it). Manifests of older agents may
    lack a field (it reads as zero) or carry one this agent does not know
    (ignored)."""

    chunks_read: int = 0  # chunks read from the snapshot
    read_bytes: int = 0
    new_chunks: int = 0  # chunks the repository did not hold yet
    stored_bytes: int = 0  # bytes those added to the packs (compressed, sealed)
    changed_chunks: int = 0  # chunks whose content differs from the parent backup's
    mode_reason: str = ""  # why every data chunk was read, or why tracking was degraded

    @classmethod
    def of(cls, value: BackupStats | dict) -> BackupStats:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"stats: an object was expected, not {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


@dataclass(frozen=True)
class VmRecord:
    """The running VM a backup's snapshot was taken of (manifest format 2):
    how consistent the snapshot is, and what it takes to start the VM
    again on restored disks (RunningVm.definition: a qemu command line with
    its firmware variable stores' contents, or libvirt's domain XML)."""

    consistency: str  # "application" or "crash"
    definition: str = ""  # JSON, "" when it could not be read

    @classmethod
    def of(cls, value: VmRecord | dict | None) -> VmRecord | None:
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"vm: an object was expected, not {type(value).__name__}")
        return cls(str(value.get("consistency", "")), str(value.get("definition", "")))


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
    format_version: int = 1
    stats: BackupStats = field(default_factory=BackupStats)
    vm: VmRecord | None = None  # format 2: the running VM it was taken of

    def __post_init__(self) -> None:  # from JSON: the stats and the VM come as objects
        self.stats = BackupStats.of(self.stats)
        self.vm = VmRecord.of(self.vm)
        if self.vm is not None:
            self.format_version = max(self.format_version, 2)

    @property
    def fell_back(self) -> bool:
        return self.mode == "fallback"

    @property
    def mode_reason(self) -> str:
        """Why every data chunk was read, or why tracking was degraded
        (kept in stats: manifests of format 1 have no field for it)."""
        return self.stats.mode_reason

    @property
    def data_bytes(self) -> int:
        """Logical bytes of the non-zero chunks."""
        return sum(
            min(self.chunk_size, self.size - i * self.chunk_size) for i, c in enumerate(self.chunks) if c != ZERO
        )

    def to_bytes(self) -> bytes:
        d = dataclasses.asdict(self)
        if self.vm is None:  # readable by agents of format 1
            del d["vm"]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            d = json.loads(data)
        except ValueError:
            raise DataCorrupt(f"backup {where}: manifest is not valid JSON (damaged or tampered)") from None
        if not isinstance(d, dict):
            raise DataCorrupt(f"backup {where}: manifest is malformed")
        if d.get("format_version", 0) > MANIFEST_VERSION:
            raise FailedPrecondition(
                f"backup {where}: manifest format {d['format_version']} is newer than this "
                f"agent's ({MANIFEST_VERSION}); upgrade the agent",
                field="backup_uuid",
            )
        try:
            m = cls(**d)
        except TypeError as e:
            raise DataCorrupt(f"backup {where}: manifest is malformed: {e}") from None
        if len(m.chunks) != (m.size + m.chunk_size - 1) // m.chunk_size:
            raise DataCorrupt(f"backup {where}: manifest lists {len(m.chunks)} chunks for {m.size} bytes")
        return m
