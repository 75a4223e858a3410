"""Masks added to packed plaintext coefficients modulo t = 2^k (ADR 0010).

Each mask is an AES-256-CTR keystream read as 64-bit words and reduced modulo t: since t is a
power of two, that is a bit mask, and the words are uniform modulo t. Chunk c of an update
takes the keystream from byte c * degree * 8, so any range of chunks can be masked on its own
(by an encryption worker, say) and every site derives the same words for the same chunk.

A site adds its self mask and, for every other roster member, their pairwise mask with the
sign their ids decide (+ for the smaller id, − for the larger), so pairwise masks cancel in the
roster's sum; removing the self masks after decryption is adding them with the opposite sign.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedhe.secagg.statements import RoundAttempt, statement

_WORD = 8
_AES_BLOCK = 16


@dataclass(frozen=True)
class MaskTerm:
    """One keystream, added (sign +1) or subtracted (sign −1)."""

    key: bytes
    sign: int


@dataclass(frozen=True)
class CoefficientMasks:
    """The sum of several keystream masks over an update's plaintext coefficients (picklable, so
    encryption workers can apply it to their share of the chunks)."""

    terms: tuple[MaskTerm, ...]

    def block(self, start_chunk: int, count: int, degree: int, modulus_bits: int) -> NDArray[np.uint64]:
        """The masks of chunks ``start_chunk`` … ``start_chunk + count − 1``: ``count`` rows of
        ``degree`` coefficients, each in [0, 2^modulus_bits)."""
        total = np.zeros(count * degree, dtype=np.uint64)
        zeros = bytes(count * degree * _WORD)
        counter = (start_chunk * degree * _WORD // _AES_BLOCK).to_bytes(_AES_BLOCK, "big")
        for term in self.terms:
            encryptor = Cipher(algorithms.AES(term.key), modes.CTR(counter)).encryptor()
            words = np.frombuffer(encryptor.update(zeros), dtype=np.uint64)
            if term.sign > 0:
                total += words
            else:
                total -= words
        total &= np.uint64((1 << modulus_bits) - 1)
        return total.reshape(count, degree)

    def negated(self) -> CoefficientMasks:
        """The masks that undo these."""
        return CoefficientMasks(tuple(MaskTerm(term.key, -term.sign) for term in self.terms))


def self_mask_key(at: RoundAttempt, owner: str, seed: bytes) -> bytes:
    """The keystream key of ``owner``'s self mask, from its 128-bit seed."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=statement("self-mask-key", [*at.fields(), owner])
    ).derive(seed)


def pairwise_sign(me: str, peer: str) -> int:
    """+1 for the member whose id sorts first, −1 for the other: the two masks cancel."""
    return 1 if me < peer else -1


def self_masks(at: RoundAttempt, seeds: Mapping[str, bytes]) -> CoefficientMasks:
    """The sum of the self masks of the members whose seeds are given."""
    return CoefficientMasks(tuple(MaskTerm(self_mask_key(at, owner, seed), 1) for owner, seed in sorted(seeds.items())))
