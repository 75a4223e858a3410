"""Credentials and signatures: issuing, hashing and checking them.

- API credentials (operator, site, service) are bearer tokens of 256 random bits. Services
  store only their SHA-256 (a slow hash adds nothing for tokens with that much entropy) and
  compare digests in constant time.
- Each site holds an Ed25519 signing key; it registers the public half. The keyserver
  releases a secret context only against a fresh signature by an approved site's key, so it
  never needs the site's API credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhe.errors import InvalidRequest, Unauthenticated

SITE_CREDENTIAL_PREFIX = "fhs_"


def new_token(prefix: str = "") -> str:
    """A fresh bearer token with 256 bits of entropy."""
    return prefix + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(presented: str, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return hmac.compare_digest(hash_token(presented), hash_token(expected))


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header, or ``Unauthenticated``."""
    if not authorization:
        raise Unauthenticated("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization header must be 'Bearer <token>'")
    return token.strip()


def generate_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 site signing key."""
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    """Serialise a signing key (unencrypted PKCS#8; the file itself must be protected)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    """Load a site signing key from PEM."""
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidRequest("signing key must be an Ed25519 private key")
    return key


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The registered form of a site's public key: base64 of the 32 raw bytes."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(encoded: str) -> Ed25519PublicKey:
    """Parse a registered public key, raising ``InvalidRequest`` if it is not one."""
    try:
        raw = base64.b64decode(encoded, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidRequest("public_key must be base64 of a 32-byte Ed25519 public key") from exc


def key_release_message(site_id: str, key_id: str, timestamp: int) -> bytes:
    """The exact bytes a site signs to ask for a federation's secret context."""
    return f"fedhe-key-release\n{site_id}\n{key_id}\n{timestamp}".encode()


def sign_key_release(
    key: Ed25519PrivateKey, site_id: str, key_id: str, timestamp: int | None = None
) -> tuple[int, str]:
    """Sign a key-release request; returns (timestamp, base64 signature)."""
    ts = int(time.time()) if timestamp is None else timestamp
    signature = key.sign(key_release_message(site_id, key_id, ts))
    return ts, base64.b64encode(signature).decode()


def verify_key_release(
    public_key: str,
    site_id: str,
    key_id: str,
    timestamp: int,
    signature: str,
    *,
    max_skew_s: int,
    now: float | None = None,
) -> None:
    """Check a key-release signature and its freshness; raise ``Unauthenticated`` if not valid."""
    current = time.time() if now is None else now
    if abs(current - timestamp) > max_skew_s:
        raise Unauthenticated(f"key-release request is older or newer than {max_skew_s} s; check the site's clock")
    try:
        parse_public_key(public_key).verify(
            base64.b64decode(signature), key_release_message(site_id, key_id, timestamp)
        )
    except (InvalidSignature, ValueError) as exc:
        raise Unauthenticated("key-release signature does not verify with the site's registered key") from exc
