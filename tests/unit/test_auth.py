"""Credentials, key-release signatures and sealing of secret contexts at rest."""

from __future__ import annotations

import base64
import os

import pytest

from fedhe.auth import (
    ENDORSE_PURPOSE,
    KEY_RELEASE_PURPOSE,
    bearer_token,
    generate_signing_key,
    hash_token,
    new_nonce,
    new_token,
    public_key_b64,
    sign_request,
    tokens_match,
    verify_request,
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


AUDIENCE = "https://keys.example.org"


def test_signed_request_verifies_only_for_its_key_fields_audience_nonce_and_time() -> None:
    key = generate_signing_key()
    public = public_key_b64(key)
    ts, nonce, sig = sign_request(key, KEY_RELEASE_PURPOSE, AUDIENCE, ["key-1"], timestamp=1_000_000)
    assert len(nonce) == 32

    def check(**changed: object) -> None:
        fields: dict[str, object] = {
            "public_key": public,
            "purpose": KEY_RELEASE_PURPOSE,
            "audience": AUDIENCE,
            "fields": ["key-1"],
            "timestamp": ts,
            "nonce": nonce,
            "signature": sig,
            "max_skew_s": 60,
            "now": 1_000_030,
        } | changed
        verify_request(**fields)  # type: ignore[arg-type]

    check()
    with pytest.raises(Unauthenticated) as late:
        check(now=1_000_100)
    assert late.value.code == "request_expired"
    for changed in (
        {"fields": ["key-2"]},
        {"audience": "https://other.example.org"},
        {"purpose": ENDORSE_PURPOSE},
        {"nonce": "0" * 32},
        {"public_key": public_key_b64(generate_signing_key())},
        {"signature": "not base64!"},
    ):
        with pytest.raises(Unauthenticated) as refused:
            check(**changed)
        assert refused.value.code == "bad_signature", changed


def test_nonces_are_fresh_128_bit_values() -> None:
    nonces = {new_nonce() for _ in range(1000)}
    assert len(nonces) == 1000
    assert all(len(bytes.fromhex(n)) == 16 and n == n.lower() for n in nonces)
    # Random 128-bit values: across 1,000 of them every bit is seen both set and clear.
    values = [int(n, 16) for n in nonces]
    ones, zeros = 0, 0
    for value in values:
        ones |= value
        zeros |= ~value & (2**128 - 1)
    assert ones == zeros == 2**128 - 1


def test_line_breaks_cannot_smuggle_fields_into_a_signed_message() -> None:
    with pytest.raises(InvalidRequest):
        sign_request(generate_signing_key(), KEY_RELEASE_PURPOSE, AUDIENCE, ["key-1\nsite-2"])


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
