"""Homomorphic encryption for fedhe: contexts, update codecs and the wire envelope.

Only this package touches TenSEAL. Services use the recipe layer:
``create_key_material`` / ``load_secret_context`` / ``load_evaluation_context``, then
``codec_for(format_id, context)`` and its ``encrypt_update``, ``accumulator`` and
``decrypt_aggregate``.
"""

from fedhe.he.codec import DEFAULT_FORMAT_ID, Accumulator, UpdateCodec, codec_for, supported_formats
from fedhe.he.context import (
    CkksParameters,
    KeyMaterial,
    create_key_material,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.he.envelope import Envelope, decode_envelope, encode_envelope

__all__ = [
    "DEFAULT_FORMAT_ID",
    "Accumulator",
    "CkksParameters",
    "Envelope",
    "KeyMaterial",
    "UpdateCodec",
    "codec_for",
    "create_key_material",
    "decode_envelope",
    "encode_envelope",
    "load_evaluation_context",
    "load_secret_context",
    "supported_formats",
]
