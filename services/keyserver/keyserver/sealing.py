"""Encryption at rest of secret contexts (AES-256-GCM under a key-encryption key).

The key-encryption key (KEK) comes from the environment or a mounted file and never touches
the database or a log. Each sealed blob records a fingerprint of the KEK that sealed it, so
an operator rotating the KEK can tell which rows still need re-sealing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedhe.errors import FedheError, InvalidRequest

_VERSION = b"\x01"


class SecretSealer:
    """Seals and unseals secret contexts, binding each to its ``key_id``."""

    def __init__(self, kek_b64: str):
        try:
            kek = base64.b64decode(kek_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("KEK must be base64") from exc
        if len(kek) != 32:
            raise InvalidRequest("KEK must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(kek)
        self.fingerprint = hashlib.sha256(b"fedhe-kek-fingerprint" + kek).hexdigest()[:16]

    @staticmethod
    def _aad(key_id: str) -> bytes:
        return b"fedhe-secret-context\n" + key_id.encode()

    def seal(self, key_id: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` for storage; the result is bound to ``key_id``."""
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, self._aad(key_id))

    def unseal(self, key_id: str, sealed: bytes) -> bytes:
        """Decrypt a stored blob; fails if it was altered, moved to another key_id, or sealed by another KEK."""
        if not sealed.startswith(_VERSION) or len(sealed) < 1 + 12 + 16:
            raise FedheError("stored secret context has an unknown format", code="sealed_blob_invalid")
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], self._aad(key_id))
        except InvalidTag as exc:
            raise FedheError(
                "stored secret context does not decrypt with the configured KEK", code="sealed_blob_invalid"
            ) from exc
