"""Homomorphic encryption for fedhe: contexts, update codecs and the wire envelope.

Only this package touches TenSEAL. Services use the recipe layer:
``create_key_material`` / ``load_secret_context`` / ``load_evaluation_context``, then
``codec_for(format_id, context, workers, options)`` and its ``encrypt_update``, ``check_chunk``,
``sum_chunk`` and ``decrypt_aggregate``. The packed BFV format also takes the job's ``PackingSettings``
(validated up front by ``check_packing``) and reports clipping with ``quantisation_report``.

A loaded context is opaque (``SecretContext``, ``EvaluationContext``): it is passed to
``codec_for`` and offers nothing of TenSEAL. ``__all__`` is the public surface. The modules
``codec`` (the interface and the format ids), ``registry``, ``context``, ``packing``,
``quantise``, ``envelope`` and ``plaintext`` are public too; ``fedhe.he._seal`` holds the SEAL
internals, like pyca/cryptography's hazmat, and nothing outside this package imports it.
"""

from fedhe.he._seal.bfv_packed import PackedBfvCodec
from fedhe.he._seal.context import EvaluationContext, SecretContext
from fedhe.he.codec import CKKS_FORMAT_ID, DEFAULT_FORMAT_ID, PACKED_FORMAT_ID, UpdateCodec
from fedhe.he.context import (
    BfvParameters,
    CkksParameters,
    HeParameters,
    KeyMaterial,
    create_key_material,
    load_evaluation_context,
    load_secret_context,
    parameters_from,
)
from fedhe.he.envelope import Envelope, decode_envelope, encode_envelope
from fedhe.he.packing import PackingLayout, PackingSettings, check_packing
from fedhe.he.quantise import quantisation_report
from fedhe.he.registry import codec_for, format_for, supported_formats

__all__ = [
    "CKKS_FORMAT_ID",
    "DEFAULT_FORMAT_ID",
    "PACKED_FORMAT_ID",
    "BfvParameters",
    "CkksParameters",
    "Envelope",
    "EvaluationContext",
    "HeParameters",
    "KeyMaterial",
    "PackedBfvCodec",
    "PackingLayout",
    "PackingSettings",
    "SecretContext",
    "UpdateCodec",
    "check_packing",
    "codec_for",
    "create_key_material",
    "decode_envelope",
    "encode_envelope",
    "format_for",
    "load_evaluation_context",
    "load_secret_context",
    "parameters_from",
    "quantisation_report",
    "supported_formats",
]
