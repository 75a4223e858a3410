"""Shamir t-of-N sharing of 128-bit self-mask seeds (pycryptodome, GF(2^128)).

Share x-coordinates are roster positions 1 … N. The owner's own share (its own position) is
split like the others and never sent: a seed is rebuilt only from t *other* members (ADR 0010).
"""

from __future__ import annotations

from collections.abc import Mapping

from Crypto.Protocol.SecretSharing import Shamir

SEED_BYTES = 16


def split_seed(seed: bytes, threshold: int, holders: Mapping[str, int], members: int) -> dict[str, bytes]:
    """Each holder's share of ``seed`` (``holders``: site id → x-coordinate in 1 … ``members``)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a seed has {SEED_BYTES} bytes")
    by_index = dict(Shamir.split(threshold, members, seed))
    return {holder: bytes(by_index[index]) for holder, index in holders.items()}


def combine_shares(shares: Mapping[int, bytes]) -> bytes:
    """The seed from at least t shares (x-coordinate → share); a wrong share gives a wrong seed."""
    return bytes(Shamir.combine(list(shares.items())))
