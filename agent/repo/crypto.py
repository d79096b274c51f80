"""Keys and sealing for a repository.

An unencrypted repository addresses chunks by SHA-256 (native core) and
stores objects as they are. An encrypted one (a backup point with a
password):

- derives 64 bytes from the password with scrypt (salt and cost in the
  repository config): the first 32 are the AES-256-GCM key, the last 32 the
  HMAC-SHA256 key;
- addresses chunks by HMAC-SHA256(mac key, block digests of the plaintext),
  so ids reveal nothing about the content;
- seals every chunk, manifest, index and block-digest record with
  AES-256-GCM under a fresh 96-bit random nonce, with the object's identity
  as associated data (a record cannot be moved to another place unnoticed);
- keeps only a verifier in the config: a GCM seal of a fixed text, which a
  wrong password cannot open. The password itself is never stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.errors import DataCorrupt, WrongPassword

NONCE = 12
TAG = 16
OVERHEAD = NONCE + TAG
CHECK_TEXT = b"blockferry repository key check v1"
DEFAULT_KDF = {"name": "scrypt", "n": 1 << 15, "r": 8, "p": 1}


class Sealer:
    """No encryption: chunk ids are SHA-256 of the chunk's block digests,
    objects are stored as they are."""

    encrypted = False
    overhead = 0

    def chunk_id(self, block_digests: bytes) -> bytes:
        return hashlib.sha256(block_digests).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return bytes(data)

    def open(self, data: bytes, aad: bytes, what: str) -> bytes:
        return data


class AeadSealer(Sealer):
    encrypted = True
    overhead = OVERHEAD

    def __init__(self, key: bytes, mac_key: bytes):
        self._aead = AESGCM(key)
        self._mac_key = mac_key

    def chunk_id(self, block_digests: bytes) -> bytes:
        return hmac.new(self._mac_key, block_digests, hashlib.sha256).digest()

    def seal(self, data, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(data), aad)

    def open(self, data: bytes, aad: bytes, what: str) -> bytes:
        if len(data) < OVERHEAD:
            raise DataCorrupt(f"{what}: sealed data is truncated")
        try:
            return self._aead.decrypt(data[:NONCE], data[NONCE:], aad)
        except InvalidTag:
            raise DataCorrupt(f"{what}: authentication failed (damaged or tampered)") from None


def _derive(password: str, kdf: dict) -> tuple[bytes, bytes]:
    material = Scrypt(salt=bytes.fromhex(kdf["salt"]), length=64, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        password.encode()
    )
    return material[:32], material[32:]


def new_encryption(password: str, repo_id: str) -> tuple[dict, AeadSealer]:
    """The config entry of a new encrypted repository, and its sealer."""
    kdf = dict(DEFAULT_KDF, salt=os.urandom(16).hex())
    key, mac_key = _derive(password, kdf)
    sealer = AeadSealer(key, mac_key)
    return {"cipher": "aes-256-gcm", "kdf": kdf, "verifier": sealer.seal(CHECK_TEXT, repo_id.encode()).hex()}, sealer


def open_encryption(config: dict, password: str) -> Sealer:
    """The sealer of an existing repository; refuses a missing, unneeded or
    wrong password with a clear error (never garbage)."""
    enc = config.get("encryption")
    if not enc:
        if password:
            raise WrongPassword(
                "pass_word: this backup point's repository is not encrypted; "
                "remove the password or use a new backup point",
                field="pass_word",
            )
        return Sealer()
    if not password:
        raise WrongPassword(
            "pass_word: this backup point's repository is encrypted; its password is required", field="pass_word"
        )
    key, mac_key = _derive(password, enc["kdf"])
    sealer = AeadSealer(key, mac_key)
    try:
        ok = sealer.open(bytes.fromhex(enc["verifier"]), config["id"].encode(), "verifier") == CHECK_TEXT
    except DataCorrupt:
        ok = False
    if not ok:
        raise WrongPassword("pass_word: wrong password for this backup point's repository", field="pass_word")
    return sealer
