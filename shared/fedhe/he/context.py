"""CKKS contexts: creation at the keyserver, and loading with the right key material.

A federation has one CKKS context. Sites get the *secret* context (they encrypt and decrypt);
the aggregator gets the *evaluation* context, which carries the encryption parameters and no
key at all: summing ciphertexts needs neither a secret, public, relinearisation nor Galois key.
"""

from __future__ import annotations

from dataclasses import dataclass

import tenseal as ts
from pydantic import BaseModel, Field, model_validator

from fedhe.errors import InvalidRequest


class CkksParameters(BaseModel):
    """Encryption parameters of a federation's CKKS context.

    The defaults follow the measurements in DESIGN.md: n=8192 and [60, 40, 60] bits give
    128-bit security (SEAL's table allows 218 bits at n=8192); values are encoded at the last
    level, where the 60-bit prime minus the 40-bit scale leaves about 2^19 of headroom for the
    magnitude of the summed, normalised weights.
    """

    poly_modulus_degree: int = Field(default=8192, description="CKKS ring dimension n; slots = n/2")
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [60, 40, 60])
    scale_bits: int = Field(default=40, ge=20, le=60)

    @model_validator(mode="after")
    def _check(self) -> CkksParameters:
        if self.poly_modulus_degree not in (4096, 8192, 16384, 32768):
            raise ValueError("poly_modulus_degree must be one of 4096, 8192, 16384, 32768")
        if not 2 <= len(self.coeff_mod_bit_sizes) <= 16:
            raise ValueError("coeff_mod_bit_sizes needs between 2 and 16 primes")
        if any(not 20 <= bits <= 60 for bits in self.coeff_mod_bit_sizes):
            raise ValueError("every coefficient prime must have between 20 and 60 bits")
        max_bits = {4096: 109, 8192: 218, 16384: 438, 32768: 881}[self.poly_modulus_degree]
        if sum(self.coeff_mod_bit_sizes) > max_bits:
            raise ValueError(
                f"coefficient modulus of {sum(self.coeff_mod_bit_sizes)} bits is over the "
                f"{max_bits}-bit limit for 128-bit security at n={self.poly_modulus_degree}"
            )
        if self.coeff_mod_bit_sizes[0] <= self.scale_bits:
            raise ValueError("the last-level prime must have more bits than the scale (no headroom)")
        return self

    @property
    def slot_count(self) -> int:
        """Number of values one ciphertext holds."""
        return self.poly_modulus_degree // 2


@dataclass(frozen=True)
class KeyMaterial:
    """A freshly created context, serialised two ways."""

    parameters: CkksParameters
    secret_context: bytes
    evaluation_context: bytes


def create_key_material(parameters: CkksParameters) -> KeyMaterial:
    """Create a symmetric CKKS context and serialise its secret and keyless forms."""
    try:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=parameters.poly_modulus_degree,
            coeff_mod_bit_sizes=list(parameters.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
        )
    except ValueError as exc:
        raise InvalidRequest(f"CKKS parameters rejected: {exc}") from exc
    context.global_scale = float(2**parameters.scale_bits)
    secret = context.serialize(
        save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    # make_context_public() refuses symmetric contexts, so drop the keys at serialisation.
    evaluation = context.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return KeyMaterial(parameters=parameters, secret_context=secret, evaluation_context=evaluation)


def _load(data: bytes) -> ts.Context:
    try:
        return ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare RuntimeError/ValueError on bad bytes
        raise InvalidRequest("not a valid serialised TenSEAL context") from exc


def load_secret_context(data: bytes) -> ts.Context:
    """Load a site's context; it must hold the secret key."""
    context = _load(data)
    if not context.has_secret_key():
        raise InvalidRequest("context has no secret key; a site needs the secret context")
    return context


def load_evaluation_context(data: bytes) -> ts.Context:
    """Load the aggregator's context; refuses any context that carries a secret key."""
    context = _load(data)
    if context.has_secret_key() or context.is_private():
        raise InvalidRequest("refusing an evaluation context that carries a secret key")
    return context
