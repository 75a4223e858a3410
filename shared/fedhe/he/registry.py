"""The registry of update formats: a versioned format id to the codec that reads and writes it.

The interface and the ids live in ``fedhe.he.codec``; the SEAL codecs in ``fedhe.he._seal``.
Nothing imports this module back but the package itself, so the arrows point one way:
``codec`` ← codecs ← ``registry``.
"""

from __future__ import annotations

from fedhe.errors import InvalidRequest
from fedhe.he._seal.bfv_packed import PackedBfvCodec
from fedhe.he._seal.ckks_seeded import SeededCkksCodec
from fedhe.he._seal.context import EvaluationContext, SecretContext
from fedhe.he.codec import CKKS_FORMAT_ID, DEFAULT_FORMAT_ID, PACKED_FORMAT_ID, PLAINTEXT_FORMAT_ID, UpdateCodec
from fedhe.he.packing import PackingSettings
from fedhe.he.plaintext import PlaintextCodec, plaintext_allowed

_FORMAT_OF_SCHEME = {"BFV": DEFAULT_FORMAT_ID, "CKKS": CKKS_FORMAT_ID}


def supported_formats() -> list[str]:
    """Format ids this process accepts (the plaintext one only under its benchmark switch)."""
    encrypted = [DEFAULT_FORMAT_ID, CKKS_FORMAT_ID]
    return [*encrypted, PLAINTEXT_FORMAT_ID] if plaintext_allowed() else encrypted


def format_for(context: SecretContext | EvaluationContext) -> str:
    """The update format a federation's context takes when a job does not name one."""
    return _FORMAT_OF_SCHEME[context.scheme]


def codec_for(
    format_id: str,
    context: SecretContext | EvaluationContext,
    workers: int = 1,
    options: PackingSettings | None = None,
) -> UpdateCodec:
    """The codec for ``format_id`` bound to ``context``; ``workers`` processes encrypt large updates.

    ``options`` are the job's packing settings, required by ``bfv-packed-v1`` (sites and the
    aggregator must pass the same ones: they fix how many values a chunk holds).
    """
    if format_id == PLAINTEXT_FORMAT_ID:
        return PlaintextCodec()
    expected = {fmt: scheme for scheme, fmt in _FORMAT_OF_SCHEME.items()}.get(format_id)
    if expected is None:
        raise InvalidRequest(
            f"unknown update format {format_id!r}",
            code="unsupported_format",
            detail={"supported": supported_formats()},
        )
    if context.scheme != expected:
        raise InvalidRequest(f"format {format_id!r} needs a {expected} context", code="scheme_mismatch")
    if format_id == PACKED_FORMAT_ID:
        if options is None:
            raise InvalidRequest(
                f"format {format_id!r} needs the job's packing settings", code="missing_packing_settings"
            )
        return PackedBfvCodec(context, options, workers)
    return SeededCkksCodec(context, workers)
