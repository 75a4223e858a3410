"""Credentials, key-release signatures and sealing of secret contexts at rest."""

from __future__ import annotations

import base64
import os

import pytest

from fedhe.auth import (
    bearer_token,
    generate_signing_key,
    hash_token,
    new_token,
    public_key_b64,
    sign_key_release,
    tokens_match,
    verify_key_release,
)
from fedhe.errors import FedheError, InvalidRequest, Unauthenticated
from keyserver.sealing import SecretSealer


def test_tokens_are_random_and_stored_only_as_hashes() -> None:
    a, b = new_token("fhs_"), new_token("fhs_")
    assert a != b
    assert a.startswith("fhs_")
    assert len(a) > 40
    assert hash_token(a) != a
    assert len(hash_token(a)) == 64
    assert tokens_match(a, a)
    assert not tokens_match(a, b)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "token"])
def test_malformed_authorization_is_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        bearer_token(header)


def test_key_release_signature_verifies_only_for_its_site_key_and_time() -> None:
    key = generate_signing_key()
    public = public_key_b64(key)
    ts, sig = sign_key_release(key, "site-1", "key-1", timestamp=1_000_000)
    verify_key_release(public, "site-1", "key-1", ts, sig, max_skew_s=60, now=1_000_030)
    with pytest.raises(Unauthenticated, match="older or newer"):
        verify_key_release(public, "site-1", "key-1", ts, sig, max_skew_s=60, now=1_000_100)
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_key_release(public, "site-1", "key-2", ts, sig, max_skew_s=60, now=ts)
    with pytest.raises(Unauthenticated, match="does not verify"):
        verify_key_release(public_key_b64(generate_signing_key()), "site-1", "key-1", ts, sig, max_skew_s=60, now=ts)


def test_sealed_context_is_bound_to_key_id_and_kek() -> None:
    kek = base64.b64encode(os.urandom(32)).decode()
    sealer = SecretSealer(kek)
    sealed = sealer.seal("key-a", b"secret context bytes")
    assert b"secret context bytes" not in sealed
    assert sealer.unseal("key-a", sealed) == b"secret context bytes"
    with pytest.raises(FedheError):
        sealer.unseal("key-b", sealed)
    with pytest.raises(FedheError):
        SecretSealer(base64.b64encode(os.urandom(32)).decode()).unseal("key-a", sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(FedheError):
        sealer.unseal("key-a", tampered)


@pytest.mark.parametrize("kek", ["not base64!", base64.b64encode(b"short").decode()])
def test_bad_kek_is_refused(kek: str) -> None:
    with pytest.raises(InvalidRequest):
        SecretSealer(kek)
