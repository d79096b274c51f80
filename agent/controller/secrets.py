"""Secrets at rest (backup point passwords, CHAP secrets): AES-256-GCM with
a key file the controller creates (0600) on first start. Stored as
"v1:" + base64(nonce || ciphertext); the plaintext never reaches the
database, a log or a response."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.errors import ConfigError, DataCorrupt

PREFIX = "v1:"


class SecretBox:
    def __init__(self, key: bytes):
        if len(key) != 32:
            raise ConfigError("controller secret key must be 32 bytes", field="secret_key_file")
        self._aead = AESGCM(key)
        # a separate key for signatures (the status page's session cookies), derived from the same file
        self._mac_key = hmac.new(key, b"blockferry signatures v1", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: str) -> SecretBox:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, os.urandom(32))
                os.fsync(fd)
            finally:
                os.close(fd)
        if os.stat(path).st_mode & 0o077:
            raise ConfigError(f"{path}: the controller secret key must be mode 0600", field="secret_key_file")
        with open(path, "rb") as f:
            return cls(f.read())

    def seal(self, plaintext: str) -> str:
        if not plaintext:
            return ""
        nonce = os.urandom(12)
        return PREFIX + base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext.encode(), b"bf-secret")).decode()

    def sign(self, message: str) -> str:
        """A hex HMAC-SHA256 of the message, with this controller's key."""
        return hmac.new(self._mac_key, message.encode(), hashlib.sha256).hexdigest()

    def verify(self, message: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(message), signature)

    def open(self, sealed: str) -> str:
        if not sealed:
            return ""
        try:
            raw = base64.b64decode(sealed[len(PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], b"bf-secret").decode()
        except Exception:
            raise DataCorrupt(
                "a stored secret cannot be decrypted with this controller's key", field="secret_key_file"
            ) from None
