"""Packing quantised values into BFV plaintext coefficients, and the rules that keep it exact.

A plaintext coefficient is an integer modulo t = 2^k. ``values_per_coefficient`` signed slots of
``slot_bits`` bits share it: value j of a coefficient is multiplied by 2^(j * slot_bits) and the
terms are added modulo t (two's complement). Summing ciphertexts sums the coefficients, hence
every slot, with borrows and carries crossing slot boundaries exactly as in integer addition;
reading the slots back as centred remainders undoes them, so no count of summed updates is
needed. It stays exact while every slot's sum fits its signed range: each value is clipped to
[-levels, levels] and at most ``max_sites`` values are added, so ``max_sites * levels`` must
stay below 2^(slot_bits - 1).

The second rule is the BFV noise: each fresh ciphertext carries noise of at most 21 (SEAL's
centred binomial) plus 1/2 of rounding in q*m/t, and decryption is exact while the summed noise
stays below q / (2t). ADR 0006 derives both rules and the error bounds.

Chunk layout: chunk c holds values [c * n * P, (c + 1) * n * P); value c*n*P + j*n + i sits in
slot j of coefficient i.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from fedhe.errors import InvalidRequest
from fedhe.he._seal.context import coefficient_primes
from fedhe.he._seal.format import compact_ciphertext_size
from fedhe.he.context import BfvParameters

# Largest |noise| of one fresh SEAL encryption: the centred binomial sample is a difference of
# two 21-bit popcounts (rlwe.cpp, sample_poly_cbd); a clipped Gaussian build stops at 19.2.
FRESH_NOISE_BOUND = 21
# Rounding of q*m/t to an integer when the plaintext is scaled into the ciphertext.
ENCODING_ROUNDING_BOUND = 0.5


class PackingSettings(BaseModel):
    """A job's quantisation and packing settings for ``bfv-packed-v1``.

    Sites clip each value to ±``clip_range`` (R) and round it, unbiased, to one of
    2^bits - 1 levels; the aggregator may add up to ``max_sites`` updates.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_range: float = Field(gt=0, allow_inf_nan=False, description="R: values beyond ±R are clipped")
    bits: int = Field(default=16, ge=2, le=40, description="quantisation bits per value (2^bits - 1 levels)")
    max_sites: int = Field(default=128, ge=1, le=1_000_000, description="most updates one sum may hold")

    @property
    def levels(self) -> int:
        """L: quantised values are integers in [-L, L]; ±R maps to ±L exactly."""
        return int(2 ** (self.bits - 1) - 1)

    @property
    def step(self) -> float:
        """Δ = R / L, the spacing of the quantisation grid."""
        return self.clip_range / self.levels

    def sum_error_bound(self, num_sites: int) -> float:
        """Largest error of a decrypted sum of ``num_sites`` values within ±R: each is rounded to a
        neighbouring level (less than Δ away) and the sum is exact, so the error is below k·Δ."""
        return num_sites * self.step


@dataclass(frozen=True)
class PackingLayout:
    """Where each value goes in a ciphertext, derived from the settings and the BFV parameters."""

    poly_modulus_degree: int
    plain_modulus_bits: int
    slot_bits: int
    values_per_coefficient: int
    levels: int
    max_sites: int
    noise_bound: float
    noise_room: float

    @property
    def values_per_chunk(self) -> int:
        """Values one ciphertext holds."""
        return self.poly_modulus_degree * self.values_per_coefficient

    def bytes_per_value(self) -> float:
        """Bytes a site uploads per value (one compact ciphertext over the values it holds),
        before the last chunk's padding."""
        return compact_ciphertext_size(self.poly_modulus_degree) / self.values_per_chunk

    def upload_bytes(self, num_values: int) -> int:
        """Bytes of one site's encrypted update of ``num_values`` values (whole ciphertexts)."""
        return -(-num_values // self.values_per_chunk) * compact_ciphertext_size(self.poly_modulus_degree)


def packing_layout(
    settings: PackingSettings, *, poly_modulus_degree: int, plain_modulus_bits: int, data_prime: int
) -> PackingLayout:
    """The layout for ``settings``; refuses (``InvalidRequest``) settings whose sums could overflow
    a slot or whose noise after ``max_sites`` additions could break decryption."""
    levels, sites = settings.levels, settings.max_sites
    fitting = [
        per_coefficient
        for per_coefficient in range(plain_modulus_bits, 0, -1)
        if sites * levels <= 2 ** (plain_modulus_bits // per_coefficient - 1) - 1
    ]
    if not fitting:
        needed = settings.bits + math.ceil(math.log2(sites))
        raise InvalidRequest(
            f"{settings.bits}-bit values summed over {sites} sites need about {needed} bits, more than the "
            f"{plain_modulus_bits}-bit plaintext coefficient holds: lower bits or max_sites",
            code="packing_overflow",
            detail={"bits": settings.bits, "max_sites": sites, "plain_modulus_bits": plain_modulus_bits},
        )
    per_coefficient = fitting[0]
    noise_bound = sites * (FRESH_NOISE_BOUND + ENCODING_ROUNDING_BOUND)
    noise_room = data_prime / 2 ** (plain_modulus_bits + 1)
    if noise_bound >= noise_room:
        most = math.ceil(noise_room / (FRESH_NOISE_BOUND + ENCODING_ROUNDING_BOUND)) - 1
        raise InvalidRequest(
            f"the noise of {sites} summed ciphertexts could reach {noise_bound:.0f}, over the {noise_room:.0f} "
            f"that decryption tolerates with t = 2^{plain_modulus_bits}: at most {most} sites",
            code="noise_budget_exceeded",
            detail={"max_sites": sites, "most_sites": most, "plain_modulus_bits": plain_modulus_bits},
        )
    return PackingLayout(
        poly_modulus_degree=poly_modulus_degree,
        plain_modulus_bits=plain_modulus_bits,
        slot_bits=plain_modulus_bits // per_coefficient,
        values_per_coefficient=per_coefficient,
        levels=levels,
        max_sites=sites,
        noise_bound=noise_bound,
        noise_room=noise_room,
    )


def check_packing(settings: PackingSettings, parameters: BfvParameters | None = None) -> PackingLayout:
    """Validate a job's packing settings against its federation's BFV parameters (the defaults if
    not given) before any site encrypts; raises ``InvalidRequest`` naming the problem."""
    parameters = parameters or BfvParameters()
    primes = coefficient_primes(parameters.poly_modulus_degree, list(parameters.coeff_mod_bit_sizes))
    return packing_layout(
        settings,
        poly_modulus_degree=parameters.poly_modulus_degree,
        plain_modulus_bits=parameters.plain_modulus_bits,
        data_prime=primes[0],
    )


def bytes_per_value(settings: PackingSettings, parameters: BfvParameters | None = None) -> float:
    """Bytes a site uploads per parameter with ``settings`` (the packing layout's values per
    ciphertext over one compact ciphertext's size), before the last chunk's padding."""
    return check_packing(settings, parameters).bytes_per_value()


def upload_bytes(settings: PackingSettings, num_values: int, parameters: BfvParameters | None = None) -> int:
    """Bytes of one site's encrypted update of ``num_values`` parameters (whole ciphertexts)."""
    return check_packing(settings, parameters).upload_bytes(num_values)


def pack(levels: NDArray[Any], layout: PackingLayout) -> NDArray[np.uint64]:
    """Plaintext coefficients, one row of ``poly_modulus_degree`` per chunk, for integer levels."""
    per_chunk, n = layout.values_per_chunk, layout.poly_modulus_degree
    num_chunks = -(-levels.size // per_chunk)
    padded = np.zeros(num_chunks * per_chunk, dtype=np.int64)
    padded[: levels.size] = levels
    slots = padded.reshape(num_chunks, layout.values_per_coefficient, n)
    coefficients = slots[:, 0, :].copy()
    for slot in range(1, layout.values_per_coefficient):
        coefficients += slots[:, slot, :] << (layout.slot_bits * slot)
    # Two's complement modulo t: a negative sum is its residue, as BFV arithmetic sees it.
    coefficients &= (1 << layout.plain_modulus_bits) - 1
    return coefficients.view(np.uint64)


def unpack(coefficients: NDArray[np.uint64], layout: PackingLayout, num_values: int) -> NDArray[np.int64]:
    """The summed integer levels in plaintext coefficients (rows of a decrypted sum)."""
    t = 1 << layout.plain_modulus_bits
    rest = coefficients.astype(np.int64)
    rest[rest >= t // 2] -= t
    width = layout.slot_bits
    half = 1 << (width - 1)
    out = np.empty((rest.shape[0], layout.values_per_coefficient, rest.shape[1]), dtype=np.int64)
    for slot in range(layout.values_per_coefficient - 1):
        low = ((rest + half) & ((1 << width) - 1)) - half
        out[:, slot, :] = low
        rest = (rest - low) >> width
    out[:, -1, :] = rest
    return out.reshape(-1)[:num_values]
