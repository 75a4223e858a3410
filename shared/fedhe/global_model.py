"""What sites encrypt each round and how they read the published sum back.

A training round's upload is the site's change to the global model, weighted by its share of
the public bound S: ``(w_k - w_global) * n_k / S``. The aggregator adds them; the published
envelope carries ``total_samples`` = Σ n_k and ``weight_scale`` = S in the clear, so every site
recovers the sample-weighted mean change as ``sum * S / Σ n_k`` and applies it (with server
momentum, ``client_agent.server_momentum``) to the global model it holds. Changes are small
and centred on zero, which is what lets the packed codec quantise them over a narrow ±R.

A statistics round (``fedhe.normalisation``) publishes a plain sum the sites decode themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.he.codec import UpdateCodec
from fedhe.he.envelope import Envelope, decode_envelope, encode_header

RoundKind = Literal["statistics", "training"]


def aggregate_header(
    *,
    chunk_sizes: list[int],
    format_id: str,
    key_id: str,
    num_values: int,
    job_id: str,
    round_number: int,
    kind: RoundKind,
    total_samples: int,
    weight_scale: int,
) -> bytes:
    """The start of a published aggregate's envelope; its summed chunks follow as they are."""
    meta = {
        "job_id": job_id,
        "round": round_number,
        "kind": kind,
        "total_samples": total_samples,
        "weight_scale": weight_scale,
    }
    return encode_header(format_id=format_id, key_id=key_id, num_values=num_values, chunk_sizes=chunk_sizes, meta=meta)


def weighted_update(
    weights: NDArray[Any], global_weights: NDArray[Any], num_samples: int, weight_scale: int
) -> NDArray[Any]:
    """What a site encrypts after training: its change to the global model times n_k / S."""
    change = np.asarray(weights, dtype=np.float64) - np.asarray(global_weights, dtype=np.float64)
    return change * (num_samples / weight_scale)


@dataclass(frozen=True)
class DecodedAggregate:
    """A published round, decrypted: the mean update of a training round, or a statistics sum."""

    kind: RoundKind
    round_number: int
    values: NDArray[Any]
    total_samples: int


def decode_aggregate(data: bytes, codec_for_envelope: Callable[[Envelope], UpdateCodec]) -> DecodedAggregate:
    """Decrypt a published aggregate; a training round's sum becomes the sample-weighted mean update."""
    envelope = decode_envelope(data)
    meta = envelope.meta
    kind, number = meta.get("kind"), meta.get("round")
    total, scale = meta.get("total_samples"), meta.get("weight_scale")
    if kind not in ("statistics", "training") or not isinstance(number, int):
        raise InvalidRequest("aggregate envelope lacks its round and kind")
    if not isinstance(total, int) or not isinstance(scale, int) or total <= 0 or scale <= 0:
        raise InvalidRequest("aggregate envelope lacks positive total_samples and weight_scale")
    summed = codec_for_envelope(envelope).decrypt_aggregate(envelope.chunks, envelope.num_values)
    values = summed * (scale / total) if kind == "training" else summed
    return DecodedAggregate(kind=kind, round_number=number, values=values, total_samples=total)
