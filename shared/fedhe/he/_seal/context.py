"""TenSEAL contexts behind opaque handles: ``SecretContext`` (a site's) and ``EvaluationContext``
(the aggregator's).

A handle holds a loaded TenSEAL context and offers nothing of it but its scheme and which keys
it carries: no serialisation, no key, no SEAL object. Outside ``fedhe.he`` a context is only
passed from ``load_secret_context`` / ``load_evaluation_context`` to ``codec_for``; inside,
the SEAL codecs reach the TenSEAL object with ``tenseal_context``.
"""

from __future__ import annotations

from typing import Any

import tenseal as ts
import tenseal.sealapi as seal


class _Context:
    """A loaded TenSEAL context, held out of reach."""

    __slots__ = ("_tenseal",)

    def __init__(self, context: ts.Context) -> None:
        self._tenseal = context

    @property
    def scheme(self) -> str:
        """``"CKKS"`` or ``"BFV"``."""
        return scheme_of(self._tenseal)

    def has_secret_key(self) -> bool:
        """Whether the context carries the secret key (a site's does, the aggregator's never)."""
        return bool(self._tenseal.has_secret_key())

    def is_private(self) -> bool:
        """TenSEAL's own flag for a context that holds a secret key."""
        return bool(self._tenseal.is_private())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.scheme}>"


class SecretContext(_Context):
    """A site's HE context, secret key included (``load_secret_context``): it encrypts and decrypts.

    Opaque: it is only passed to ``codec_for``; it cannot be serialised or read from outside
    ``fedhe.he``. It tells only its ``scheme`` (``"CKKS"`` or ``"BFV"``), ``has_secret_key()``
    and ``is_private()``."""

    __slots__ = ()


class EvaluationContext(_Context):
    """The aggregator's HE context, with the encryption parameters and no key at all
    (``load_evaluation_context``): codecs bound to it check and sum ciphertexts only.

    Opaque: it is only passed to ``codec_for``. It tells only its ``scheme`` (``"CKKS"`` or
    ``"BFV"``), ``has_secret_key()`` and ``is_private()`` (both false: the loader refuses any other)."""

    __slots__ = ()


def tenseal_context(context: SecretContext | EvaluationContext) -> Any:
    """The TenSEAL context behind a handle (for the SEAL codecs; nothing outside ``fedhe.he``)."""
    return context._tenseal


def scheme_of(context: ts.Context) -> str:
    """``"CKKS"`` or ``"BFV"``: the scheme of a loaded TenSEAL context."""
    return str(context.seal_context().data.key_context_data().parms().scheme().name)


def new_ckks(poly_modulus_degree: int, coeff_mod_bit_sizes: list[int], scale_bits: int) -> ts.Context:
    """A fresh symmetric CKKS context; ``ValueError`` if TenSEAL refuses the parameters."""
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=coeff_mod_bit_sizes,
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    context.global_scale = float(2**scale_bits)
    return context


def new_bfv(poly_modulus_degree: int, coeff_mod_bit_sizes: list[int], plain_modulus_bits: int) -> ts.Context:
    """A fresh symmetric BFV context with t = 2^plain_modulus_bits; ``ValueError`` if refused."""
    return ts.context(
        ts.SCHEME_TYPE.BFV,
        poly_modulus_degree=poly_modulus_degree,
        plain_modulus=2**plain_modulus_bits,
        coeff_mod_bit_sizes=coeff_mod_bit_sizes,
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )


def serialise(context: ts.Context, *, secret_key: bool) -> bytes:
    """TenSEAL's serialisation with the secret key or with no key at all (never public,
    relinearisation or Galois keys: sums need none, and symmetric contexts have no public key)."""
    data: bytes = context.serialize(
        save_public_key=False, save_secret_key=secret_key, save_galois_keys=False, save_relin_keys=False
    )
    return data


def load(data: bytes) -> ts.Context:
    """A TenSEAL context from its serialisation; ``ValueError`` if ``data`` is not one."""
    try:
        return ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare RuntimeError/ValueError on bad bytes
        raise ValueError("not a valid serialised TenSEAL context") from exc


def coefficient_primes(poly_modulus_degree: int, bit_sizes: list[int]) -> list[int]:
    """The primes SEAL picks for a coefficient modulus of ``bit_sizes`` at degree n."""
    return [int(prime.value()) for prime in seal.CoeffModulus.Create(poly_modulus_degree, bit_sizes)]
