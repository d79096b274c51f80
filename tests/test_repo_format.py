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
from agent.repo.format import (BLOCK_SIZE, FORMAT_VERSION, HEADER, Manifest, block_record_size, decode_chunk,
                               encode_chunk)

DATA = b"blockferry" * 1000


def test_header_layout_is_pinned():
    assert FORMAT_VERSION == 1 and BLOCK_SIZE == 65536
    assert HEADER.format == "<4sB3xQQ32s" and HEADER.size == 56


def test_plain_record_golden_bytes():
    cid = hashlib.sha256(DATA).digest()
    rec = encode_chunk(DATA, cid, None, crypto.Sealer())
    assert rec[:4] == b"BFC1" and rec[4] == 0
    assert int.from_bytes(rec[8:16], "little") == len(DATA) == int.from_bytes(rec[16:24], "little")
    assert rec[24:56] == cid and rec[56:] == DATA
    assert hashlib.sha256(rec).hexdigest() == "c3474f462f31e98f0c1424dcd8db7d3db5ca2ebc9dee934491d391e743b962e6"  # golden
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), crypto.Sealer(), "p") == DATA


def test_zstd_only_when_it_pays():
    cid = hashlib.sha256(DATA).digest()
    rec = encode_chunk(DATA, cid, zstandard.ZstdCompressor(level=1), crypto.Sealer())
    assert rec[4] == 1 and len(rec) < len(DATA) // 10
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), crypto.Sealer(), "p") == DATA
    import os

    rnd = os.urandom(65536)
    rec = encode_chunk(rnd, hashlib.sha256(rnd).digest(), zstandard.ZstdCompressor(level=1), crypto.Sealer())
    assert rec[4] == 0 and rec[56:] == rnd


def test_key_derivation_and_chunk_ids_are_pinned():
    kdf = {"name": "scrypt", "n": 1 << 10, "r": 8, "p": 1, "salt": "00" * 16}
    key, mac = crypto._derive("pw", kdf)
    # scrypt(pw, salt=16 zero bytes, N=1024, r=8, p=1, 64 bytes), split 32/32
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    material = Scrypt(salt=bytes(16), length=64, n=1 << 10, r=8, p=1).derive(b"pw")
    assert (key, mac) == (material[:32], material[32:])
    s = crypto.AeadSealer(key, mac)
    import hmac

    assert s.chunk_id(DATA) == hmac.new(mac, DATA, hashlib.sha256).digest()
    sealed = s.seal(b"x", b"aad")
    assert len(sealed) == 1 + crypto.OVERHEAD and s.open(sealed, b"aad", "t") == b"x"
    with pytest.raises(DataCorrupt, match="authentication failed"):
        s.open(sealed, b"other place", "t")  # a record moved elsewhere is refused
    assert block_record_size(4 << 20, s) == 64 * 32 + 28


def test_sealed_record_roundtrip_and_tamper():
    cfg, sealer = crypto.new_encryption("secret", "repo-id")
    assert set(cfg) == {"cipher", "kdf", "verifier"} and cfg["cipher"] == "aes-256-gcm"
    assert "secret" not in json.dumps(cfg)
    cid = sealer.chunk_id(DATA)
    rec = encode_chunk(DATA, cid, zstandard.ZstdCompressor(level=1), sealer)
    assert rec[4] == 3 and b"blockferry" not in rec
    assert decode_chunk(rec, cid, zstandard.ZstdDecompressor(), sealer, "p") == DATA
    bad = bytearray(rec)
    bad[-1] ^= 1
    with pytest.raises(DataCorrupt, match=cid.hex()):
        decode_chunk(bytes(bad), cid, zstandard.ZstdDecompressor(), sealer, "p")
    config = {"id": "repo-id", "encryption": cfg}
    assert crypto.open_encryption(config, "secret").chunk_id(DATA) == cid
    with pytest.raises(WrongPassword, match="pass_word"):
        crypto.open_encryption(config, "nope")
    with pytest.raises(WrongPassword, match="required"):
        crypto.open_encryption(config, "")
    with pytest.raises(WrongPassword, match="not encrypted"):
        crypto.open_encryption({"id": "x"}, "secret")


def test_manifest_keys_are_pinned_and_newer_format_refused():
    m = Manifest(backup_id="b", volume_uuid="v", snapshot_uuid="s", size=5 << 20, chunk_size=4 << 20,
                 chunks=["ab", ""], image_digest="d", created_at=1.0)
    d = json.loads(m.to_bytes())
    assert sorted(d) == sorted(["backup_id", "volume_uuid", "snapshot_uuid", "size", "chunk_size", "chunks",
                                "image_digest", "created_at", "parent", "name", "description", "tenant",
                                "pool_uuid", "snapshot_name", "agent_version", "mode", "format_version", "stats"])
    assert Manifest.from_bytes(m.to_bytes(), "b") == m
    assert m.data_bytes == 4 << 20
    with pytest.raises(FailedPrecondition, match="upgrade the agent"):
        Manifest.from_bytes(json.dumps(dict(d, format_version=2)).encode(), "b")
    with pytest.raises(DataCorrupt, match="lists 1 chunks"):
        Manifest.from_bytes(json.dumps(dict(d, chunks=["ab"])).encode(), "b")
