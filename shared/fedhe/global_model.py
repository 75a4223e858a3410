"""The global model as sites receive it: round 0's plaintext weights or an encrypted sum.

Both travel in the same envelope. Round 0 carries the public initial weights (format
``initial-float64-v1``); every later round carries the previous round's encrypted sum of
``w_k * n_k / S`` with ``total_samples`` = Σ n_k and ``weight_scale`` = S in the clear, so a
site recovers the weighted average as ``sum * S / Σ n_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.he.codec import UpdateCodec
from fedhe.he.envelope import Envelope, decode_envelope, encode_envelope, encode_header

INITIAL_FORMAT_ID = "initial-float64-v1"


def encode_initial_model(weights: NDArray[Any], key_id: str, job_id: str) -> bytes:
    """Round 0's envelope: the public initial weights as little-endian float64."""
    flat = np.asarray(weights, dtype="<f8").ravel()
    return encode_envelope(
        Envelope(
            format_id=INITIAL_FORMAT_ID,
            key_id=key_id,
            num_values=int(flat.size),
            chunks=[flat.tobytes()],
            meta={"job_id": job_id, "round": 0},
        )
    )


def aggregate_header(
    *,
    chunk_sizes: list[int],
    format_id: str,
    key_id: str,
    num_values: int,
    job_id: str,
    round_number: int,
    total_samples: int,
    weight_scale: int,
) -> bytes:
    """The start of a published aggregate's envelope; its summed chunks follow as they are."""
    meta = {"job_id": job_id, "round": round_number, "total_samples": total_samples, "weight_scale": weight_scale}
    return encode_header(format_id=format_id, key_id=key_id, num_values=num_values, chunk_sizes=chunk_sizes, meta=meta)


def scale_for_upload(weights: NDArray[Any], num_samples: int, weight_scale: int) -> NDArray[Any]:
    """What a site encrypts: its weights times n_k / S (keeps the sum within CKKS headroom)."""
    return np.asarray(weights, dtype=np.float64) * (num_samples / weight_scale)


def decode_global_model(data: bytes, codec_for_envelope: Callable[[Envelope], UpdateCodec]) -> NDArray[Any]:
    """The weighted-average weights in a model envelope (decrypting it if it is an aggregate)."""
    envelope = decode_envelope(data)
    if envelope.format_id == INITIAL_FORMAT_ID:
        return np.frombuffer(envelope.chunks[0], dtype="<f8").astype(np.float64)
    total = envelope.meta.get("total_samples")
    scale = envelope.meta.get("weight_scale")
    if not isinstance(total, int) or not isinstance(scale, int) or total <= 0 or scale <= 0:
        raise InvalidRequest("aggregate envelope lacks positive total_samples and weight_scale")
    codec = codec_for_envelope(envelope)
    summed = codec.decrypt_aggregate(envelope.chunks, envelope.num_values)
    return summed * (scale / total)
