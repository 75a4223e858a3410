"""HE contexts: creation at the keyserver, and loading with the right key material.

A federation has one context, CKKS (``ckks-seeded-last-v2``) or BFV (``bfv-packed-v1``). Sites
get the *secret* context (they encrypt and decrypt); the aggregator gets the *evaluation*
context, which carries the encryption parameters and no key at all: summing ciphertexts needs
neither a secret, public, relinearisation nor Galois key.

Both schemes are serialised by TenSEAL (``Context.serialize``): it accepts BFV with a
power-of-two plain modulus (no batching is ever asked of it), so one container, one loader and
one key check serve both. A loaded context is an opaque handle (``SecretContext`` or
``EvaluationContext``), to be passed to ``codec_for`` and nowhere else; TenSEAL itself stays
inside ``fedhe.he``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, model_validator

from fedhe.errors import InvalidRequest
from fedhe.he._seal.context import EvaluationContext, SecretContext, load, new_bfv, new_ckks, serialise

# Largest total coefficient modulus (bits) for 128-bit classical security with SEAL's ternary
# secret and sigma = 3.2, from the HomomorphicEncryption.org standard (SEAL enforces the same).
MAX_MODULUS_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _check_ring(poly_modulus_degree: int, coeff_mod_bit_sizes: list[int]) -> None:
    if poly_modulus_degree not in MAX_MODULUS_BITS_128:
        raise ValueError("poly_modulus_degree must be one of 4096, 8192, 16384, 32768")
    if any(not 20 <= bits <= 60 for bits in coeff_mod_bit_sizes):
        raise ValueError("every coefficient prime must have between 20 and 60 bits")
    max_bits = MAX_MODULUS_BITS_128[poly_modulus_degree]
    if sum(coeff_mod_bit_sizes) > max_bits:
        raise ValueError(
            f"coefficient modulus of {sum(coeff_mod_bit_sizes)} bits is over the "
            f"{max_bits}-bit limit for 128-bit security at n={poly_modulus_degree}"
        )


class CkksParameters(BaseModel):
    """Encryption parameters of a federation's CKKS context.

    The defaults follow the measurements in DESIGN.md: n=8192 and [60, 40, 60] bits give
    128-bit security (SEAL's table allows 218 bits at n=8192); values are encoded at the last
    level, where the 60-bit prime minus the 40-bit scale leaves about 2^19 of headroom for the
    magnitude of the summed, normalised weights.
    """

    scheme: Literal["ckks"] = "ckks"
    poly_modulus_degree: int = Field(default=8192, description="CKKS ring dimension n; slots = n/2")
    coeff_mod_bit_sizes: list[int] = Field(default_factory=lambda: [60, 40, 60])
    scale_bits: int = Field(default=40, ge=20, le=60)

    @model_validator(mode="after")
    def _check(self) -> CkksParameters:
        if not 2 <= len(self.coeff_mod_bit_sizes) <= 16:
            raise ValueError("coeff_mod_bit_sizes needs between 2 and 16 primes")
        _check_ring(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if self.coeff_mod_bit_sizes[0] <= self.scale_bits:
            raise ValueError("the last-level prime must have more bits than the scale (no headroom)")
        return self

    @property
    def slot_count(self) -> int:
        """Number of values one ciphertext holds."""
        return self.poly_modulus_degree // 2


class BfvParameters(BaseModel):
    """Encryption parameters of a federation's BFV context (format ``bfv-packed-v1``).

    One data prime plus the special prime: sums need no multiplicative depth, and ciphertexts
    live at the data level, so every byte on the wire is one 60-bit word per coefficient.
    The plain modulus is a power of two (no batching: values are packed into coefficients).
    ADR 0006 derives the defaults: 120 bits at n = 8192 is far inside the 218-bit limit for
    128-bit security, and t = 2^46 leaves 2^13 of noise room, enough for 380 fresh additions.
    """

    scheme: Literal["bfv"] = "bfv"
    poly_modulus_degree: int = Field(default=8192, description="BFV ring dimension n (coefficients per ciphertext)")
    coeff_mod_bit_sizes: list[int] = Field(
        default_factory=lambda: [60, 60], description="one data prime, then the special prime"
    )
    plain_modulus_bits: int = Field(default=46, ge=8, le=53, description="t = 2^plain_modulus_bits")

    @model_validator(mode="after")
    def _check(self) -> BfvParameters:
        if len(self.coeff_mod_bit_sizes) != 2:
            raise ValueError("coeff_mod_bit_sizes must be exactly [data prime, special prime]")
        _check_ring(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if self.coeff_mod_bit_sizes[0] - self.plain_modulus_bits < 7:
            raise ValueError(
                "the data prime needs at least 7 bits more than the plain modulus (room for one fresh noise)"
            )
        return self


HeParameters = Annotated[CkksParameters | BfvParameters, Field(discriminator="scheme")]
_HE_PARAMETERS: TypeAdapter[CkksParameters | BfvParameters] = TypeAdapter(HeParameters)


def parameters_from(data: dict[str, Any]) -> CkksParameters | BfvParameters:
    """Parameters as stored or sent; a record without ``scheme`` predates BFV and is CKKS."""
    return _HE_PARAMETERS.validate_python({"scheme": "ckks", **data})


@dataclass(frozen=True)
class KeyMaterial:
    """A freshly created context, serialised two ways."""

    parameters: CkksParameters | BfvParameters
    secret_context: bytes
    evaluation_context: bytes


def _new_context(parameters: CkksParameters | BfvParameters) -> Any:
    if isinstance(parameters, BfvParameters):
        return new_bfv(
            parameters.poly_modulus_degree, list(parameters.coeff_mod_bit_sizes), parameters.plain_modulus_bits
        )
    return new_ckks(parameters.poly_modulus_degree, list(parameters.coeff_mod_bit_sizes), parameters.scale_bits)


def create_key_material(parameters: CkksParameters | BfvParameters) -> KeyMaterial:
    """Create a symmetric CKKS or BFV context and serialise its secret and keyless forms."""
    try:
        context = _new_context(parameters)
    except ValueError as exc:
        raise InvalidRequest(f"{parameters.scheme.upper()} parameters rejected: {exc}") from exc
    # make_context_public() refuses symmetric contexts, so drop the keys at serialisation.
    return KeyMaterial(
        parameters=parameters,
        secret_context=serialise(context, secret_key=True),
        evaluation_context=serialise(context, secret_key=False),
    )


def _load(data: bytes) -> Any:
    try:
        return load(data)
    except ValueError as exc:
        raise InvalidRequest("not a valid serialised TenSEAL context") from exc


def load_secret_context(data: bytes) -> SecretContext:
    """Load a site's context (CKKS or BFV); it must hold the secret key."""
    context = _load(data)
    if not context.has_secret_key():
        raise InvalidRequest("context has no secret key; a site needs the secret context")
    return SecretContext(context)


def load_evaluation_context(data: bytes) -> EvaluationContext:
    """Load the aggregator's context (CKKS or BFV); refuses any context that carries a secret key."""
    context = _load(data)
    if context.has_secret_key() or context.is_private():
        raise InvalidRequest("refusing an evaluation context that carries a secret key")
    return EvaluationContext(context)
