"""Packed BFV codec (``bfv-packed-v1``): quantised values, several per plaintext coefficient,
encrypted with seeded symmetric BFV at one data prime; under 4 bytes per value on the wire.

Site side: clip and quantise (``quantise``), pack into coefficients (``packing``), build each
plaintext from SEAL bytes, ``encrypt_symmetric`` and keep the compact form of SEAL's seeded
ciphertext (``fedhe.he._seal.format``). Aggregator side: every chunk is loaded by SEAL (which regenerates
the seeded half and checks every word) and must sit at the data level with two components,
not in NTT form and not transparent; sums are plain ciphertext additions. Decryption reads the
summed coefficients back as centred slots, so it needs no count of summed updates. ADR 0006
derives the layout, the noise rule and the error bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from numpy.typing import NDArray

from fedhe.errors import ImplausibleAggregate, InvalidRequest
from fedhe.he._seal.codec import SealCodec
from fedhe.he._seal.context import EvaluationContext, SecretContext
from fedhe.he._seal.format import (
    CompactLayout,
    compact_ciphertext,
    plaintext_bytes,
    plaintext_coefficients,
    seal_ciphertext,
)
from fedhe.he._seal.io import SealIO
from fedhe.he.codec import PACKED_FORMAT_ID, CoefficientMask
from fedhe.he.packing import PackingLayout, PackingSettings, pack, packing_layout, unpack
from fedhe.he.quantise import dequantise, quantise

# Values quantised and packed at a time: whole chunks, and few enough that the float
# temporaries of a 10M-value update do not all exist at once.
_BLOCK_CHUNKS = 64


def _plain_modulus(seal_context: seal.SEALContext) -> int:
    """t, re-read through ``tenseal.sealapi`` (TenSEAL's own bindings cannot return it)."""
    parameters = SealIO.load_parameters(SealIO.save(seal_context.key_context_data().parms()))
    return int(parameters.plain_modulus().value())


class PackedBfvCodec(SealCodec):
    """Quantised, packed, seeded symmetric BFV (format ``bfv-packed-v1``).

    ``settings`` are the job's (``PackingSettings``); the layout they imply is checked against
    the context here, so a codec exists only for settings that cannot overflow. With
    ``workers > 1`` large updates are encrypted by a pool of processes (``SealCodec``).
    ``rounding_rng`` is for tests only: it makes the stochastic rounding reproducible (and keeps
    encryption in this process); left None, every update draws fresh OS entropy.
    """

    format_id = PACKED_FORMAT_ID
    supports_masks = True
    _format_checks = "level or size"

    def __init__(
        self,
        context: SecretContext | EvaluationContext,
        settings: PackingSettings,
        workers: int = 1,
        *,
        rounding_rng: np.random.Generator | None = None,
    ):
        super().__init__(context, workers, settings.model_dump_json())
        key_parameters = self._seal_context.key_context_data().parms()
        data_level = self._seal_context.first_context_data()
        if context.scheme != "BFV" or len(data_level.parms().coeff_modulus()) != 1:
            raise InvalidRequest(
                f"format {PACKED_FORMAT_ID} needs a BFV context with one data prime", code="scheme_mismatch"
            )
        plain_modulus = _plain_modulus(self._seal_context)
        if plain_modulus & (plain_modulus - 1):
            raise InvalidRequest(f"format {PACKED_FORMAT_ID} needs a power-of-two plain modulus")
        self.settings = settings
        self.layout: PackingLayout = packing_layout(
            settings,
            poly_modulus_degree=key_parameters.poly_modulus_degree(),
            plain_modulus_bits=plain_modulus.bit_length() - 1,
            data_prime=data_level.total_coeff_modulus(),
        )
        self._data_parms_id = list(self._seal_context.first_parms_id())
        self._compact = CompactLayout(
            self._data_parms_id, self.layout.poly_modulus_degree, data_level.parms().coeff_modulus()[0].value()
        )
        self._rng = rounding_rng
        self.io = SealIO(self._seal_context)

    @classmethod
    def _in_worker(cls, context: SecretContext, options: str | None) -> PackedBfvCodec:
        assert options is not None
        return cls(context, PackingSettings.model_validate_json(options))

    @property
    def values_per_chunk(self) -> int:
        return self.layout.values_per_chunk

    def _parallel_allowed(self) -> bool:
        # A test's seeded rounding generator lives in this process only.
        return self._rng is None

    def _encrypt_block(self, flat: NDArray[np.float64], masks: CoefficientMask | None, first_chunk: int) -> list[bytes]:
        encryptor = seal.Encryptor(self._seal_context, self._secret_key())
        rng = self._rng if self._rng is not None else np.random.default_rng()
        block = _BLOCK_CHUNKS * self.layout.values_per_chunk
        chunks: list[bytes] = []
        for start in range(0, flat.size, block):
            coefficients = pack(quantise(flat[start : start + block], self.settings, rng), self.layout)
            if masks is not None:
                self._add_masks(coefficients, masks, first_chunk + start // self.layout.values_per_chunk)
            for row in coefficients:
                plain = self.io.load_plaintext(plaintext_bytes(row))
                chunks.append(compact_ciphertext(self.io.save(encryptor.encrypt_symmetric(plain))))
        return chunks

    def _deserialise(self, data: bytes) -> seal.Ciphertext:
        return self.io.load(seal_ciphertext(data))

    def _has_format(self, ciphertext: seal.Ciphertext) -> bool:
        return (
            ciphertext.size() == 2
            and list(ciphertext.parms_id()) == self._data_parms_id
            and not ciphertext.is_ntt_form()
            and not ciphertext.is_transparent()
        )

    def serialise(self, ciphertext: seal.Ciphertext) -> bytes:
        """The wire form of a (summed) ciphertext."""
        return compact_ciphertext(self.io.save(ciphertext))

    def check_chunk(self, index: int, data: bytes) -> None:
        """Sites send the compact form: checked by numpy in one pass, with no SEAL object made
        and no seed expanded (``CompactLayout.check`` accepts what SEAL's loader would); a chunk
        in SEAL's own form is loaded by SEAL."""
        try:
            compact = self._compact.check(data)
        except ValueError as exc:
            raise self._refusal(index, exc) from exc
        if not compact:
            self.load_chunk(index, data)

    def _add_masks(self, coefficients: NDArray[np.uint64], masks: CoefficientMask, first_chunk: int) -> None:
        """Add ``masks`` to rows of plaintext coefficients in place, modulo t."""
        layout = self.layout
        for start in range(0, coefficients.shape[0], _BLOCK_CHUNKS):
            rows = coefficients[start : start + _BLOCK_CHUNKS]
            rows += masks.block(
                first_chunk + start, rows.shape[0], layout.poly_modulus_degree, layout.plain_modulus_bits
            )
            rows &= np.uint64((1 << layout.plain_modulus_bits) - 1)

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        num_values: int,
        *,
        masks: CoefficientMask | None = None,
        summed_inputs: int | None = None,
    ) -> NDArray[Any]:
        """The sum of the dequantised updates in ``chunks`` (a sum of any number up to
        ``max_sites``; no count needed), ``masks`` removed first; with ``summed_inputs`` = k, a
        slot beyond k·L (what k inputs of at most L levels can sum to, and how a wrap at the
        packing limit shows) raises ``ImplausibleAggregate``."""
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        self.check_count(chunks, self.num_chunks(num_values))
        n = self.layout.poly_modulus_degree
        coefficients = np.zeros((len(chunks), n), dtype=np.uint64)
        plain = seal.Plaintext()
        for index, data in enumerate(chunks):
            decryptor.decrypt(self.load_chunk(index, data), plain)
            words = plaintext_coefficients(self.io.save(plain))
            coefficients[index, : words.size] = words
        if masks is not None:
            self._add_masks(coefficients, masks, 0)
        levels = unpack(coefficients, self.layout, num_values)
        if summed_inputs is not None:
            self._check_plausible(levels, summed_inputs)
        return dequantise(levels, self.settings)

    def _check_plausible(self, levels: NDArray[np.int64], summed_inputs: int) -> None:
        bound = summed_inputs * self.layout.levels
        beyond = int(np.count_nonzero(np.abs(levels) > bound))
        if beyond:
            largest = int(np.abs(levels).max())
            raise ImplausibleAggregate(
                f"{beyond} of {levels.size} values of the decrypted sum lie beyond what {summed_inputs} inputs "
                f"within ±R can add up to (largest {largest * self.settings.step:.4g}, bound "
                f"{bound * self.settings.step:.4g}): an input was forged or the sum is not the roster's",
                detail={"values_beyond": beyond, "largest_level": largest, "bound_level": bound},
            )

    def noise_budget(self, chunk: bytes) -> int:
        """SEAL's remaining invariant noise budget (bits) of a chunk (needs the secret key)."""
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        return int(decryptor.invariant_noise_budget(self.load_chunk(0, chunk)))
