"""The only importer of agent._native, and its pure-Python reference.

The C kernels (native/*.c) and the reference functions here must give
identical results; tests compare them on random, zero, mixed and odd-sized
inputs, and golden digests pin the image-digest format.

Image digest format "bf-image-sha256-v1":
  SHA-256( SHA-256(block_0) || ... || SHA-256(block_n-1) || le64(length) )
with 64 KiB blocks, the last one possibly shorter and hashed over its exact
bytes. All-zero blocks are recognised and not hashed (their digest is
cached), and known-zero ranges (holes) are added without reading them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from agent.errors import BindingMissing
from agent.extents import Extent

try:
    from agent import _native
except ImportError as e:  # pragma: no cover - exercised by the bindings check
    raise BindingMissing(
        f"agent._native: the C extension is not built or does not load ({e}); "
        "reinstall blockferry with ./setup.sh or 'pip install .'"
    ) from e

IMAGE_BLOCK_SIZE: int = _native.IMAGE_BLOCK_SIZE
IMAGE_DIGEST_FORMAT: str = _native.IMAGE_DIGEST_FORMAT
ALGORITHMS = ("sha256", "xxh3-128")


@dataclass(frozen=True, slots=True)
class BlockDigests:
    """Digests of consecutive blocks of one buffer."""

    algo: str
    block_size: int
    digests: bytes  # n * digest_size bytes
    zero: bytes  # n flags, 1 where the block was all zero

    @property
    def digest_size(self) -> int:
        return digest_size(self.algo)

    def __len__(self) -> int:
        return len(self.zero)

    def __getitem__(self, i: int) -> bytes:
        size = self.digest_size
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.digests[i * size : (i + 1) * size]


def digest_size(algo: str) -> int:
    return _native.digest_size(algo)


def block_digests(algo: str, data, block_size: int, threads: int = 0) -> BlockDigests:
    """Per-block digests of data (any buffer); zero blocks are never hashed."""
    digests, zero = _native.block_digests(algo, data, block_size, threads)
    return BlockDigests(algo, block_size, digests, zero)


def is_zero(data) -> bool:
    return _native.is_zero(data)


def zero_flags(data, block_size: int, threads: int = 0) -> bytes:
    return _native.zero_flags(data, block_size, threads)


def nonzero_runs(data, block_size: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of data made of blocks that are not all zero,
    adjacent blocks merged; what a writer must write to keep holes holes."""
    runs: list[tuple[int, int]] = []
    for i, zero in enumerate(zero_flags(data, block_size)):
        if zero:
            continue
        start, end = i * block_size, min((i + 1) * block_size, len(data))
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def diff_digests(old: BlockDigests, new: BlockDigests, length: int) -> list[Extent]:
    """Extents of the new image (length bytes) whose blocks differ from old."""
    if old.algo != new.algo or old.block_size != new.block_size:
        raise ValueError("old/new: digests of different algorithms or block sizes")
    return [
        Extent(s, n) for s, n in _native.diff_digests(old.digests, new.digests, new.digest_size, new.block_size, length)
    ]


def zstd_decompress_into(src, dst) -> int:
    """Decompress the zstd frame src into the writable buffer dst (no new
    allocation: restores recycle their chunk buffers); returns the bytes
    written. ValueError for a damaged frame or content larger than dst."""
    return _native.zstd_decompress_into(src, dst)


ImageHash = _native.ImageHash


# ---------------------------------------------------------------------------
# Pure-Python reference (hashlib, xxhash). Slow, obvious, and the judge.


def _ref_digest(algo: str, data: bytes) -> bytes:
    if algo == "sha256":
        return hashlib.sha256(data).digest()
    if algo == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128(data).digest()
    raise ValueError(f"algo: unknown digest algorithm '{algo}'")


def ref_block_digests(algo: str, data, block_size: int) -> BlockDigests:
    data = bytes(data)
    digests, zero = [], bytearray()
    for off in range(0, len(data), block_size):
        block = data[off : off + block_size]
        digests.append(_ref_digest(algo, block))
        zero.append(1 if block.count(0) == len(block) else 0)
    return BlockDigests(algo, block_size, b"".join(digests), bytes(zero))


def ref_zstd_decompress_into(src, dst) -> int:
    import zstandard

    try:
        data = zstandard.ZstdDecompressor().decompress(bytes(src), max_output_size=len(dst))
    except zstandard.ZstdError as e:
        raise ValueError(f"zstd: {e}") from None
    if len(data) > len(dst):
        raise ValueError("zstd: Destination buffer is too small")
    memoryview(dst)[: len(data)] = data
    return len(data)


def ref_is_zero(data) -> bool:
    data = bytes(data)
    return data.count(0) == len(data)


def ref_zero_flags(data, block_size: int) -> bytes:
    data = bytes(data)
    return bytes(ref_is_zero(data[o : o + block_size]) for o in range(0, len(data), block_size))


def ref_diff_digests(old: BlockDigests, new: BlockDigests, length: int) -> list[Extent]:
    extents: list[Extent] = []
    for i in range(len(new)):
        if i < len(old) and old[i] == new[i]:
            continue
        start = i * new.block_size
        end = min(start + new.block_size, length)
        if extents and extents[-1].end == start:
            extents[-1] = Extent(extents[-1].start, end - extents[-1].start)
        else:
            extents.append(Extent(start, end - start))
    return extents


class RefImageHash:
    """Reference image digest: buffers everything, then hashes block by block."""

    def __init__(self) -> None:
        self._data = bytearray()

    @property
    def length(self) -> int:
        return len(self._data)

    def update(self, data) -> None:
        self._data += bytes(data)

    def zero(self, length: int) -> None:
        self._data += bytes(length)

    def digest(self) -> bytes:
        outer = hashlib.sha256()
        for off in range(0, len(self._data), IMAGE_BLOCK_SIZE):
            outer.update(hashlib.sha256(self._data[off : off + IMAGE_BLOCK_SIZE]).digest())
        outer.update(len(self._data).to_bytes(8, "little"))
        return outer.digest()
