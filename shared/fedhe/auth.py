"""Credentials and signatures: issuing, hashing and checking them.

- API credentials (operator, site, service) are bearer tokens of 256 random bits. Services
  store only their SHA-256 (a slow hash adds nothing for tokens with that much entropy) and
  compare digests in constant time.
- Each site holds an Ed25519 signing key; the keyserver pins the public half in its own
  membership table. It releases a secret context only against a fresh, single-use signature
  by a member's pinned key, so it never needs the site's API credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence

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


SIGNED_REQUEST_VERSION = "fedhe-signed-request-v1"
KEY_RELEASE_PURPOSE = "release-secret-context"
ENDORSE_PURPOSE = "endorse-member"
PINNED_KEYS_PURPOSE = "list-pinned-keys"


def new_nonce() -> str:
    """A single-use request nonce: 128 random bits, hex."""
    return secrets.token_hex(16)


def signed_message(purpose: str, audience: str, timestamp: int, nonce: str, fields: Sequence[str]) -> bytes:
    """The exact bytes a site signs: purpose, audience, time, nonce and the request's fields.

    The audience names the keyserver the request is meant for, so a request captured at one
    keyserver is worthless at another; the nonce makes it single-use at the one it names.
    """
    parts = [SIGNED_REQUEST_VERSION, purpose, audience, str(timestamp), nonce, *fields]
    if any("\n" in part for part in parts):
        raise InvalidRequest("signed request fields must not contain line breaks")
    return "\n".join(parts).encode()


def sign_request(
    key: Ed25519PrivateKey,
    purpose: str,
    audience: str,
    fields: Sequence[str],
    *,
    timestamp: int | None = None,
    nonce: str | None = None,
) -> tuple[int, str, str]:
    """Sign a request; returns (timestamp, nonce, base64 signature)."""
    ts = int(time.time()) if timestamp is None else timestamp
    once = new_nonce() if nonce is None else nonce
    signature = key.sign(signed_message(purpose, audience, ts, once, fields))
    return ts, once, base64.b64encode(signature).decode()


def verify_request(
    public_key: str,
    purpose: str,
    audience: str,
    fields: Sequence[str],
    *,
    timestamp: int,
    nonce: str,
    signature: str,
    max_skew_s: int,
    now: float | None = None,
) -> None:
    """Check a signed request's freshness and signature; raise ``Unauthenticated`` if either fails.

    Single use (the nonce not seen before) is the caller's check: it needs shared state.
    """
    current = time.time() if now is None else now
    if abs(current - timestamp) > max_skew_s:
        raise Unauthenticated(
            f"signed request is older or newer than {max_skew_s} s; check the site's clock", code="request_expired"
        )
    try:
        parse_public_key(public_key).verify(
            base64.b64decode(signature, validate=True), signed_message(purpose, audience, timestamp, nonce, fields)
        )
    except (InvalidSignature, ValueError) as exc:
        raise Unauthenticated(
            "signature does not verify with the site's pinned key for this keyserver", code="bad_signature"
        ) from exc
