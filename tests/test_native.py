"""The C kernels against the pure-Python reference, and golden digests."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys

import pytest

from agent import _native, native

from support.agents import REPO

SIZES = [0, 1, 15, 16, 17, 4095, 4096, 65535, 65536, 65537, 3 * 65536 + 5, 1 << 20, (1 << 22) + 123]


def make(kind: str, size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "zero":
        return bytes(size)
    buf = bytearray(size)  # mixed: zero blocks, data blocks, single stray bytes
    for _ in range(max(1, size // 40000)):
        if size:
            off = rnd.randrange(size)
            buf[off : off + rnd.randrange(1, 70000)] = rnd.randbytes(min(70000, size - off))[
                : len(buf[off : off + 70000])
            ]
    if size > 100:
        buf[-1] = 7  # a last byte that is not zero
        buf[size // 2] = 1
    return bytes(buf[:size])


@pytest.mark.parametrize("kind", ["random", "zero", "mixed"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("algo", native.ALGORITHMS)
def test_block_digests_match_reference(kind, size, algo):
    data = make(kind, size, size)
    for block_size in (4096, 65536, 1 << 20, 4 << 20):
        ref = native.ref_block_digests(algo, data, block_size)
        for threads in (0, 1, 2, 3):
            assert native.block_digests(algo, data, block_size, threads) == ref


@pytest.mark.parametrize("kind", ["random", "zero", "mixed"])
@pytest.mark.parametrize("size", SIZES)
def test_zero_detection_matches_reference(kind, size):
    data = make(kind, size, size + 1)
    assert native.is_zero(data) == native.ref_is_zero(data)
    for block_size in (1, 7, 4096, 65536):
        if size > 300000 and block_size < 4096:
            continue
        assert native.zero_flags(data, block_size) == native.ref_zero_flags(data, block_size)


def test_zero_detection_every_position():
    # A single non-zero byte anywhere, at every alignment, must be seen.
    for size in (1, 8, 31, 64, 255, 256, 257, 1000):
        for pos in range(size):
            buf = bytearray(size)
            buf[pos] = 0x80
            assert not native.is_zero(buf), (size, pos)
            assert not native.is_zero(memoryview(bytes(3) + bytes(buf))[3:])


@pytest.mark.parametrize("seed", range(8))
def test_image_hash_pieces_match_reference(seed):
    rnd = random.Random(seed)
    size = rnd.choice([0, 1, 65535, 65536, 65537, 1 << 20, (5 << 20) + 77])
    data = make(rnd.choice(["random", "zero", "mixed"]), size, seed)
    h, ref = native.ImageHash(threads=rnd.choice([0, 1, 2])), native.RefImageHash()
    pos = 0
    while pos < size:
        n = min(rnd.choice([1, 3, 4096, 65536, 65537, 1 << 20]), size - pos)
        piece = data[pos : pos + n]
        if native.ref_is_zero(piece) and rnd.random() < 0.7:
            h.zero(n)
        else:
            h.update(piece)
        ref.update(piece)
        pos += n
    assert h.length == size
    assert h.digest() == ref.digest() == h.digest()


GOLDEN = {
    # name: (content, bf-image-sha256-v1 digest). Never change these: they pin
    # the format stored in every backup manifest.
    "empty": (b"", "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"),
    "one": (b"a", "70cafaf13301f652a800eccb1ce6af2fed1e85e978d2197d7f1a7aeee39b5191"),
    "zero64k": (bytes(65536), "8ab067ab7939a3d4f40cbb118956c07c06aeae2d075d6e0a2ebbb94bd42832af"),
    "pattern1m": (bytes(range(256)) * 4096, "1fe777808341c3145772be5a12d0d2a5acafd7710b7be81f64b18f200f2a89fe"),
    "odd": (
        (bytes(range(256)) * 1000)[: 3 * 65536 + 5],
        "fda69e3f62235c6279a63199f35103052c42892197a9c74998e790cba654ec58",
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_image_digest_golden(name):
    content, expected = GOLDEN[name]
    h = native.ImageHash()
    h.update(content)
    ref = native.RefImageHash()
    ref.update(content)
    assert h.digest().hex() == expected
    assert ref.digest().hex() == expected
    # the format, spelled out with hashlib alone
    outer = hashlib.sha256()
    for off in range(0, len(content), 65536):
        outer.update(hashlib.sha256(content[off : off + 65536]).digest())
    outer.update(len(content).to_bytes(8, "little"))
    assert outer.hexdigest() == expected


def test_image_digest_of_a_terabyte_of_zeros_is_golden():
    h = native.ImageHash()
    h.zero(1 << 40)
    assert h.digest().hex() == "e3918f867fb182a40237a7b7e30ba90dbd78defcf6ac1c502bff489670e79f85"


def test_block_digest_known_vectors():
    d = native.block_digests("sha256", b"abc", 4096)
    assert d[0].hex() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    d = native.block_digests("xxh3-128", b"", 4096)
    assert len(d) == 0


@pytest.mark.parametrize("seed", range(10))
def test_diff_matches_reference(seed):
    rnd = random.Random(seed)
    block = rnd.choice([4096, 65536])
    old = bytearray(rnd.randbytes(rnd.randrange(0, 40) * block + rnd.randrange(block)))
    new = bytearray(old)
    for _ in range(rnd.randrange(6)):
        if new:
            off = rnd.randrange(len(new))
            new[off] ^= 0xFF
    new += rnd.randbytes(rnd.choice([0, 1, block, 3 * block + 5]))
    if rnd.random() < 0.3:
        new = new[: len(new) // 2]
    for algo in native.ALGORITHMS:
        a, b = native.block_digests(algo, old, block), native.block_digests(algo, new, block)
        ra, rb = native.ref_block_digests(algo, old, block), native.ref_block_digests(algo, new, block)
        got = native.diff_digests(a, b, len(new))
        assert got == native.ref_diff_digests(ra, rb, len(new))
        # the extents cover exactly the changed blocks
        for e in got:
            assert e.end <= len(new)
        patched = bytearray(old[: len(new)].ljust(len(new), b"\0"))
        for e in got:
            patched[e.start : e.end] = new[e.start : e.end]
        assert bytes(patched) == bytes(new)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="algo"):
        native.block_digests("md5", b"x", 4096)
    with pytest.raises(ValueError, match="block_size"):
        native.block_digests("sha256", b"x", 0)
    with pytest.raises(ValueError, match="block_size"):
        native.zero_flags(b"x", -1)
    with pytest.raises(ValueError, match="length"):
        native.ImageHash().zero(-1)
    a = native.block_digests("sha256", b"x" * 10, 4)
    with pytest.raises(ValueError, match="length"):
        native.diff_digests(a, a, 100)


def test_kernels_release_the_gil():
    # Two threads hashing at once must overlap: with the GIL held they could not.
    import threading
    import time

    data = os.urandom(64 << 20)
    t0 = time.perf_counter()
    native.block_digests("sha256", data, 4 << 20, threads=1)
    single = time.perf_counter() - t0
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    t = threading.Thread(target=spin)
    t.start()
    native.block_digests("sha256", data, 4 << 20, threads=1)
    stop.set()
    t.join()
    assert single > 0 and ticks > 1000  # the Python thread ran while C hashed


def test_kernels_under_address_and_undefined_sanitizers(tmp_path):
    """Build the C kernels with ASan+UBSan and check them against the reference."""
    subprocess.run(["make", "-s", "-C", str(REPO / "native"), "sanitize"], check=True)
    exe = REPO / "native" / "build" / "kernel_selftest"
    for seed, (kind, size, block) in enumerate(
        [
            ("random", 300000, 65536),
            ("mixed", (3 << 20) + 7, 65536),
            ("zero", 200001, 4096),
            ("mixed", 0, 4096),
            ("random", 5, 4096),
            ("mixed", 2 << 20, 1 << 20),
            ("random", 37 * 4096 + 60, 4096),
        ]
    ):
        new = make(kind, size, seed)
        old = bytearray(new[: size - size // 3])
        if old:
            old[len(old) // 2] ^= 1
        (tmp_path / "old").write_bytes(bytes(old))
        (tmp_path / "new").write_bytes(new)
        for isa in ("avx512", "openssl"):  # both SHA-256 builds (avx512 only where the CPU has it)
            env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1", "BF_SHA256_ISA": isa}
            out = subprocess.run(
                [str(exe), str(tmp_path / "old"), str(tmp_path / "new"), str(block), "2"],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout
            assert f"sha256-isa {isa}\n" in out or _native.SHA256_ISA != "avx512"
            check_selftest(out, old, new, block)


def check_selftest(out: str, old: bytes, new: bytes, block: int) -> None:
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.splitlines())
    for algo in native.ALGORITHMS:
        ref = native.ref_block_digests(algo, new, block)
        assert lines[algo] == ",".join(ref[i].hex() for i in range(len(ref)))
        assert lines[f"zero-{algo}"] == "".join(str(z) for z in ref.zero)
    assert lines["zeroflags"] == "".join(str(z) for z in native.ref_zero_flags(new, block))
    assert lines["iszero"] == str(int(native.ref_is_zero(new)))
    r = native.RefImageHash()
    r.update(new)
    assert lines["image"] == r.digest().hex()
    diff = native.ref_diff_digests(
        native.ref_block_digests("sha256", bytes(old), block), native.ref_block_digests("sha256", new, block), len(new)
    )
    assert lines["diff"] == ",".join(f"{e.start}:{e.length}" for e in diff)
    assert lines["zstd"] == "ok"


@pytest.mark.parametrize("isa", ["sse2", "avx2", "avx512"])
def test_every_xxh3_build_matches_reference(isa):
    """Each per-ISA XXH3 build (forced with BF_XXH3_ISA) against xxhash."""
    code = (
        "import os, random\n"
        "from agent import native, _native\n"
        "print(_native.XXH3_ISA)\n"
        "for size in (0, 1, 15, 16, 17, 128, 129, 240, 241, 1000, 65537, 1 << 20):\n"
        "    d = random.Random(size).randbytes(size)\n"
        "    assert native.block_digests('xxh3-128', d, 4096, 2) == native.ref_block_digests('xxh3-128', d, 4096)\n"
        "    assert native.block_digests('xxh3-128', d, 1 << 20) == native.ref_block_digests('xxh3-128', d, 1 << 20)\n"
    )
    if isa == "avx512" and _native.XXH3_ISA != "avx512":
        pytest.skip("this CPU has no AVX-512F")  # the build is still compiled and linked
    run_forced_build("BF_XXH3_ISA", isa, code)


@pytest.mark.parametrize("isa", ["avx512", "openssl"])
def test_every_sha256_build_matches_reference(isa):
    """Block digests through the 16-lane AVX-512 SHA-256 and through OpenSSL
    (forced with BF_SHA256_ISA) against hashlib: every message length class
    (padding in one block or two), 0-40 non-zero blocks in a call (a full
    group, a part-filled group on spare lanes, a few through OpenSSL), zero
    blocks between them, a short last block, and threads splitting groups."""
    code = (
        "import random\n"
        "from agent import native, _native\n"
        "print(_native.SHA256_ISA)\n"
        "rnd = random.Random(7)\n"
        "for block in (64, 100, 119, 120, 128, 4096, 65536):\n"
        "    for nblocks in (0, 1, 7, 8, 9, 15, 16, 17, 23, 24, 31, 32, 33, 40):\n"
        "        blocks = [rnd.randbytes(block) if rnd.random() < 0.8 else bytes(block) for _ in range(nblocks)]\n"
        "        data = b''.join(blocks) + rnd.randbytes(rnd.choice((0, 1, 55, 56, block - 1)))\n"
        "        ref = native.ref_block_digests('sha256', data, block)\n"
        "        for threads in (1, 2, 3):\n"
        "            assert native.block_digests('sha256', data, block, threads) == ref, (block, nblocks, threads)\n"
    )
    if isa == "avx512" and _native.SHA256_ISA != "avx512":
        pytest.skip("this CPU has no AVX-512F/BW")  # the build is still compiled and linked
    run_forced_build("BF_SHA256_ISA", isa, code)


def run_forced_build(variable: str, isa: str, code: str) -> None:
    """Run code (which prints the build it got, then checks it) in a new
    interpreter with the build forced through the environment variable."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, variable: isa})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa


def test_nonzero_runs_cover_exactly_the_nonzero_blocks():
    data = bytearray(10 * 4096 + 100)
    for i in (1, 2, 5, 10):
        data[i * 4096 + 7] = 1
    assert native.nonzero_runs(data, 4096) == [(4096, 3 * 4096), (5 * 4096, 6 * 4096), (40960, 41060)]
    assert native.nonzero_runs(bytes(8192), 4096) == []


@pytest.mark.parametrize("kind", ["random", "zero", "mixed"])
@pytest.mark.parametrize("size", [0, 1, 65537, (1 << 22)])
def test_zstd_decompress_into_matches_reference(kind, size):
    """Frames as the repository writes them (python-zstandard, level 1),
    decompressed into a caller's buffer: same bytes and count as the
    reference; a short buffer, a truncated frame or garbage are refused."""
    import zstandard

    data = make(kind, size, size)
    frame = zstandard.ZstdCompressor(level=1).compress(data)
    for impl in (native.zstd_decompress_into, native.ref_zstd_decompress_into):
        out = bytearray(b"\xaa" * (size + 10))  # room to spare: only size bytes are written
        assert impl(frame, out) == size
        assert bytes(out[:size]) == data and out[size:] == b"\xaa" * 10
        if size:  # (python-zstandard answers b"" for any frame that declares 0 bytes)
            with pytest.raises(ValueError, match="zstd"):
                impl(frame, bytearray(size - 1))
            with pytest.raises(ValueError, match="zstd"):
                impl(frame[:-1], bytearray(size + 10))
        with pytest.raises(ValueError, match="zstd"):
            impl(b"not a zstd frame at all", bytearray(size + 10))
    with pytest.raises(TypeError):
        native.zstd_decompress_into(frame, bytes(size + 10))  # not writable
