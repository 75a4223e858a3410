"""Compact CKKS codec: symmetric, seeded ciphertexts encoded at the last level.

Every site holds the secret context, so updates can be encrypted symmetrically. SEAL then
serialises a *seeded* ciphertext: the uniformly random half is replaced by the PRNG seed that
regenerates it, which halves the bytes. Encoding at the last level of the modulus chain drops
the primes a sum never uses. Together about 16 bytes per parameter on the wire (float32: 4,
TenSEAL's usual [60,40,40] public-key setting: ~81). A summed ciphertext is no longer seeded
(32 bytes per slot); that is what the aggregator stores and publishes.

Ciphertexts cross the wire uncompressed and are checked before SEAL parses them
(``fedhe.he._seal.io``): SEAL's zstd loader aborts the process on some hostile inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from numpy.typing import NDArray

from fedhe.he._seal.codec import SealCodec
from fedhe.he._seal.context import EvaluationContext, SecretContext
from fedhe.he._seal.io import SealIO
from fedhe.he.codec import CKKS_FORMAT_ID, CoefficientMask


class SeededCkksCodec(SealCodec):
    """Seeded symmetric CKKS at the last level (format ``ckks-seeded-last-v2``)."""

    format_id = CKKS_FORMAT_ID
    _format_checks = "level, scale or size"

    def __init__(self, context: SecretContext | EvaluationContext, workers: int = 1):
        super().__init__(context, workers)
        self._scale = float(self._tenseal_context.global_scale)
        self._last_parms_id = self._seal_context.last_parms_id()
        self._encoder = seal.CKKSEncoder(self._seal_context)
        self.slot_count: int = self._encoder.slot_count()
        self.io = SealIO(self._seal_context)

    @classmethod
    def _in_worker(cls, context: SecretContext, options: str | None) -> SeededCkksCodec:
        return cls(context)

    @property
    def values_per_chunk(self) -> int:
        return self.slot_count

    def serialise(self, ciphertext: seal.Ciphertext) -> bytes:
        return self.io.save(ciphertext)

    def _encrypt_block(self, flat: NDArray[np.float64], masks: CoefficientMask | None, first_chunk: int) -> list[bytes]:
        encryptor = seal.Encryptor(self._seal_context, self._secret_key())
        chunks: list[bytes] = []
        plain = seal.Plaintext()
        for start in range(0, flat.size, self.slot_count):
            self._encoder.encode(
                flat[start : start + self.slot_count].tolist(), self._last_parms_id, self._scale, plain
            )
            chunks.append(self.io.save(encryptor.encrypt_symmetric(plain)))
        return chunks

    def _deserialise(self, data: bytes) -> seal.Ciphertext:
        return self.io.load(data)

    def _has_format(self, ciphertext: seal.Ciphertext) -> bool:
        return (
            ciphertext.size() == 2
            and list(ciphertext.parms_id()) == list(self._last_parms_id)
            and math.isclose(ciphertext.scale, self._scale, rel_tol=1e-9)
            and ciphertext.is_ntt_form()
        )

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        num_values: int,
        *,
        masks: CoefficientMask | None = None,
        summed_inputs: int | None = None,
    ) -> NDArray[Any]:
        self.refuse_masks(masks)
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        parsed = self.parse(chunks, self.num_chunks(num_values))
        out = np.empty(len(parsed) * self.slot_count, dtype=np.float64)
        plain = seal.Plaintext()
        for index, ciphertext in enumerate(parsed):
            decryptor.decrypt(ciphertext, plain)
            out[index * self.slot_count : (index + 1) * self.slot_count] = self._encoder.decode_double(plain)
        return out[:num_values]
