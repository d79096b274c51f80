"""Pin repository format v1: golden bytes of chunk records, the manifest's
keys, the key derivation and chunk ids. A failure here means the on-disk
format changed: bump FORMAT_VERSION and keep reading v1."""

from __future__ import annotations

import hashlib
import json

import pytest
import zstandard

from agent.errors import DataCorrupt, FailedPrecondition, WrongPassword
from agent.repo import crypto
from agent.repo.format import (
    BLOCK_SIZE,
    FORMAT_VERSION,
    HEADER,
    ImageDigest,
    Manifest,
    VmRecord,
    block_digests,
    block_record_size,
    decode_chunk,
    encode_chunk,
)

DATA = b"blockferry" * 1000


def test_header_layout_is_pinned():
    assert FORMAT_VERSION == 1 and BLOCK_SIZE == 65536
    assert HEADER.format == "<4sB3xQQ32s" and HEADER.size == 56


def enc(*a) -> bytes:
    return b"".join(bytes(p) for p in encode_chunk(*a))


def test_chunk_id_is_sha256_of_the_block_digests():
    data = DATA * 10  # 100000 bytes: one full 64 KiB block and a short one
    blocks = hashlib.sha256(data[:BLOCK_SIZE]).digest() + hashlib.sha256(data[BLOCK_SIZE:]).digest()
    assert block_digests(data) == blocks
    assert crypto.Sealer().chunk_id(blocks) == hashlib.sha256(blocks).digest()
    golden = "ae3f9c49bbc9d2d8aba6636206196ac6424f85fec8e6a251173848bf5ae966bc"
    assert crypto.Sealer().chunk_id(blocks).hex() == golden


def test_image_digest_from_blocks_equals_the_native_image_hash():
    from agent import native

    data = DATA * 30 + bytes(200000) + b"end"
    h = native.ImageHash()
    h.update(data[:300000])
    h.zero(200000)
    h.update(b"end")
    img = ImageDigest()
    img.add(block_digests(data[: 4 * BLOCK_SIZE]), 4 * BLOCK_SIZE)
    img.add(block_digests(data[4 * BLOCK_SIZE :]), len(data) - 4 * BLOCK_SIZE)
    assert img.hexdigest() == h.digest().hex()
    z = ImageDigest()
    z.add_zero(3 * BLOCK_SIZE + 5)
    hz = native.ImageHash()
    hz.zero(3 * BLOCK_SIZE + 5)
    assert z.hexdigest() == hz.digest().hex()


def test_plain_record_golden_bytes():
    cid = crypto.Sealer().chunk_id(block_digests(DATA))
    rec = enc(DATA, cid, None, crypto.Sealer())
    assert rec[:4] == b"BFC1" and rec[4] == 0
    assert int.from_bytes(rec[8:16], "little") == len(DATA) == int.from_bytes(rec[16:24], "little")
    assert rec[24:56] == cid and rec[56:] == DATA
    golden = "80a505c3b58bba89d4920ef269f49c963b1d6c0e269959b0e0fc3fa1c9ad90c5"
    assert hashlib.sha256(rec).hexdigest() == golden
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), crypto.Sealer(), "p") == (DATA, block_digests(DATA))


def test_zstd_only_when_it_pays():
    cid = crypto.Sealer().chunk_id(block_digests(DATA))
    rec = enc(DATA, cid, zstandard.ZstdCompressor(level=1), crypto.Sealer())
    assert rec[4] == 1 and len(rec) < len(DATA) // 10
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), crypto.Sealer(), "p")[0] == DATA
    import os

    rnd = os.urandom(65536)
    rec = enc(rnd, crypto.Sealer().chunk_id(block_digests(rnd)), zstandard.ZstdCompressor(level=1), crypto.Sealer())
    assert rec[4] == 0 and rec[56:] == rnd


@pytest.mark.parametrize("sealed", [False, True])
def test_decoding_into_a_recycled_buffer_checks_the_same(sealed):
    """A restore decodes compressed chunks into recycled buffers (the native
    core): the same data and digests as a fresh decode, only the chunk's
    length of the buffer written, and every damage still refused by name."""
    sealer = crypto.new_encryption("secret", "repo-id")[1] if sealed else crypto.Sealer()
    cid = sealer.chunk_id(block_digests(DATA))
    rec = enc(DATA, cid, zstandard.ZstdCompressor(level=1), sealer)
    assert rec[4] & 1  # compressed
    out = bytearray(b"\xee" * (len(DATA) + 100))
    data, digests = decode_chunk(rec, cid, zstandard.ZstdDecompressor(), sealer, "p", out)
    assert bytes(data) == DATA and digests == block_digests(DATA)
    assert out[len(DATA) :] == b"\xee" * 100
    for pos in (HEADER.size + 5, len(rec) // 2, len(rec) - 1):  # flipped bytes in the frame
        bad = bytearray(rec)
        bad[pos] ^= 0x40
        with pytest.raises(DataCorrupt, match=cid.hex()):
            decode_chunk(bytes(bad), cid, zstandard.ZstdDecompressor(), sealer, "p", bytearray(len(DATA)))
    if not sealed:  # a frame that decodes to more than the record says
        big = enc(DATA + b"x", cid, zstandard.ZstdCompressor(level=1), sealer)
        lie = bytearray(big)
        lie[8:16] = len(DATA).to_bytes(8, "little")
        with pytest.raises(DataCorrupt, match=cid.hex()):
            decode_chunk(bytes(lie), cid, zstandard.ZstdDecompressor(), sealer, "p", bytearray(len(DATA) + 1))


def test_key_derivation_and_chunk_ids_are_pinned():
    kdf = {"name": "scrypt", "n": 1 << 10, "r": 8, "p": 1, "salt": "00" * 16}
    key, mac = crypto._derive("pw", kdf)
    # scrypt(pw, salt=16 zero bytes, N=1024, r=8, p=1, 64 bytes), split 32/32
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    material = Scrypt(salt=bytes(16), length=64, n=1 << 10, r=8, p=1).derive(b"pw")
    assert (key, mac) == (material[:32], material[32:])
    s = crypto.AeadSealer(key, mac)
    import hmac

    assert s.chunk_id(block_digests(DATA)) == hmac.new(mac, block_digests(DATA), hashlib.sha256).digest()
    sealed = s.seal(b"x", b"aad")
    assert len(sealed) == 1 + crypto.OVERHEAD and s.open(sealed, b"aad", "t") == b"x"
    with pytest.raises(DataCorrupt, match="authentication failed"):
        s.open(sealed, b"other place", "t")  # a record moved elsewhere is refused
    assert block_record_size(4 << 20, s) == 64 * 32 + 28


def test_sealed_record_roundtrip_and_tamper():
    cfg, sealer = crypto.new_encryption("secret", "repo-id")
    assert set(cfg) == {"cipher", "kdf", "verifier"} and cfg["cipher"] == "aes-256-gcm"
    assert "secret" not in json.dumps(cfg)
    cid = sealer.chunk_id(block_digests(DATA))
    rec = enc(DATA, cid, zstandard.ZstdCompressor(level=1), sealer)
    assert rec[4] == 3 and b"blockferry" not in rec
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), sealer, "p")[0] == DATA
    bad = bytearray(rec)
    bad[-1] ^= 1
    with pytest.raises(DataCorrupt, match=cid.hex()):
        decode_chunk(bytes(bad), cid, zstandard.ZstdDecompressor(), sealer, "p")
    config = {"id": "repo-id", "encryption": cfg}
    assert crypto.open_encryption(config, "secret").chunk_id(block_digests(DATA)) == cid
    with pytest.raises(WrongPassword, match="pass_word"):
        crypto.open_encryption(config, "nope")
    with pytest.raises(WrongPassword, match="required"):
        crypto.open_encryption(config, "")
    with pytest.raises(WrongPassword, match="not encrypted"):
        crypto.open_encryption({"id": "x"}, "secret")


def test_manifest_keys_are_pinned_and_newer_format_refused():
    m = Manifest(
        backup_id="b",
        volume_uuid="v",
        snapshot_uuid="s",
        size=5 << 20,
        chunk_size=4 << 20,
        chunks=["ab", ""],
        image_digest="d",
        created_at=1.0,
    )
    d = json.loads(m.to_bytes())
    assert sorted(d) == sorted(
        [
            "backup_id",
            "volume_uuid",
            "snapshot_uuid",
            "size",
            "chunk_size",
            "chunks",
            "image_digest",
            "created_at",
            "parent",
            "name",
            "description",
            "tenant",
            "pool_uuid",
            "snapshot_name",
            "agent_version",
            "mode",
            "format_version",
            "stats",
        ]
    )
    assert Manifest.from_bytes(m.to_bytes(), "b") == m
    assert m.data_bytes == 4 << 20
    assert d["format_version"] == 1  # without a VM: readable by agents of format 1
    with pytest.raises(FailedPrecondition, match="upgrade the agent"):
        Manifest.from_bytes(json.dumps(dict(d, format_version=3)).encode(), "b")
    with pytest.raises(DataCorrupt, match="lists 1 chunks"):
        Manifest.from_bytes(json.dumps(dict(d, chunks=["ab"])).encode(), "b")


def test_a_manifest_with_its_vm_is_format_2_and_pinned():
    """A backup of a running VM's snapshot keeps the VM (manifest format 2):
    its consistency and definition; the bytes are pinned."""
    vm = VmRecord("application", json.dumps({"type": "qemu", "argv": ["qemu-system-x86_64"], "files": {}}))
    m = Manifest(
        backup_id="b",
        volume_uuid="v",
        snapshot_uuid="s",
        size=5 << 20,
        chunk_size=4 << 20,
        chunks=["ab", ""],
        image_digest="d",
        created_at=1.0,
        vm=vm,
    )
    raw = m.to_bytes()
    d = json.loads(raw)
    assert d["format_version"] == 2 and d["vm"] == {"consistency": "application", "definition": vm.definition}
    assert hashlib.sha256(raw).hexdigest() == "c834bf35b6f9711184a32855294958d3435831d6ddd6decefb30a776bc19e2a6"
    back = Manifest.from_bytes(raw, "b")
    assert back == m and back.vm == vm
