"""Per-attempt X25519 keys, what each pair of members derives from them, and sealed shares.

Each site makes a fresh X25519 key pair for every round attempt it takes part in. Two members
agree on one shared secret; HKDF-SHA256 turns it into two independent keys, one seeding their
pairwise mask (``fedhe.secagg.masks``) and one sealing the Shamir share one sends the other
(AES-GCM, the attempt and both ids as associated data). The secret half never leaves the site
(it is kept, 0600, from upload to unmasking).
"""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhe.errors import InvalidRequest
from fedhe.secagg.statements import RoundAttempt, statement

_NONCE_BYTES = 12


class AttemptKey:
    """A site's X25519 key pair for one round attempt."""

    def __init__(self, private_key: X25519PrivateKey):
        self._private = private_key

    @classmethod
    def generate(cls) -> AttemptKey:
        """A fresh key pair from OS entropy."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> AttemptKey:
        """A key pair kept with ``private_bytes``."""
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The raw 32-byte secret, for the site's own 0600 state file only."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> str:
        """Base64 of the 32-byte public key, as advertised."""
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def pair_keys(self, at: RoundAttempt, me: str, peer: str, peer_public_key: str) -> PairKeys:
        """The keys this site shares with ``peer`` in attempt ``at``."""
        try:
            peer_key = X25519PublicKey.from_public_bytes(base64.b64decode(peer_public_key, validate=True))
            shared = self._private.exchange(peer_key)
        except ValueError as exc:
            raise InvalidRequest(f"{peer} advertised a key that is not a valid X25519 public key") from exc
        low, high = sorted((me, peer))
        material = HKDF(
            algorithm=hashes.SHA256(), length=64, salt=None, info=statement("pair", [*at.fields(), low, high])
        ).derive(shared)
        return PairKeys(mask_key=material[:32], seal_key=material[32:])


class PairKeys:
    """What two members of one attempt derive from their X25519 agreement."""

    def __init__(self, mask_key: bytes, seal_key: bytes):
        self.mask_key = mask_key
        self._seal = AESGCM(seal_key)

    def seal(self, at: RoundAttempt, owner: str, holder: str, share: bytes) -> str:
        """``share`` of ``owner``'s seed, readable only by ``holder`` (base64 of nonce, ciphertext, tag)."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._seal.encrypt(nonce, share, _share_context(at, owner, holder))
        return base64.b64encode(nonce + sealed).decode()

    def open(self, at: RoundAttempt, owner: str, holder: str, sealed: str) -> bytes:
        """The share ``owner`` sealed for ``holder``; ``InvalidRequest`` if it was not sealed so."""
        try:
            raw = base64.b64decode(sealed, validate=True)
            return self._seal.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _share_context(at, owner, holder))
        except (InvalidTag, ValueError) as exc:
            raise InvalidRequest(f"the share {owner} sealed for {holder} does not open", code="bad_share") from exc


def _share_context(at: RoundAttempt, owner: str, holder: str) -> bytes:
    return statement("sealed-share", [*at.fields(), owner, holder])
