"""Shamir t-of-N sharing of 128-bit self-mask seeds over the prime field GF(2^130 − 5).

Share x-coordinates are roster positions 1 … N. The owner's own share (its own position) is
made like the others and never sent: a seed is rebuilt only from t *other* members (ADR 0010).

Why not a library's: pycryptodome's ``Shamir`` works in GF(2^128) with field arithmetic written
in Python, about 30 ms to rebuild one seed from 25 shares (measured, ``bench/secagg.py``), so a
round's rebuild grew as sites × t². Python's own integers make the same interpolation about a
thousand times faster. The scheme is the textbook one: a random polynomial of degree t − 1 with
the secret as its constant term, coefficients from OS entropy, Lagrange interpolation at 0;
t − 1 shares are independent of the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

PRIME = 2**130 - 5
"""The field's modulus: a prime above every 128-bit seed."""
SEED_BYTES = 16
SHARE_BYTES = 17
"""A share is a field element, 130 bits, sent big-endian in 17 bytes."""


def split_seed(seed: bytes, threshold: int, holders: Mapping[str, int], members: int) -> dict[str, bytes]:
    """Each holder's share of ``seed`` (``holders``: site id → x-coordinate in 1 … ``members``)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed has {SEED_BYTES} bytes")
    if not 1 <= threshold <= members or any(not 1 <= x <= members for x in holders.values()):
        raise ValueError("threshold and x-coordinates must lie in 1 … members")
    coefficients = [int.from_bytes(seed, "big"), *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    return {holder: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for holder, x in holders.items()}


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def combine_shares(shares: Mapping[int, bytes]) -> bytes:
    """The seed from t shares (x-coordinate → share): Lagrange interpolation at 0. Other shares, or
    fewer than t, give another value (a seed's commitment tells)."""
    points = {x: int.from_bytes(share, "big") for x, share in shares.items()}
    if any(len(share) != SHARE_BYTES for share in shares.values()) or any(y >= PRIME for y in points.values()):
        raise ValueError(f"a share is a field element of {SHARE_BYTES} bytes")
    secret = 0
    for x, y in points.items():
        numerator, denominator = 1, 1
        for other in points:
            if other != x:
                numerator = numerator * other % PRIME
                denominator = denominator * (other - x) % PRIME
        secret = (secret + y * numerator * pow(denominator, -1, PRIME)) % PRIME
    return (secret % (1 << (8 * SEED_BYTES))).to_bytes(SEED_BYTES, "big")
