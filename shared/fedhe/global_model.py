"""What sites encrypt each round and how they read the published sum back.

A training round's upload is the site's change to the global model, weighted by its share of
the public bound S: ``(w_k - w_global) * n_k / S``. The aggregator adds them; the published
envelope carries ``total_samples`` = Σ n_k and ``weight_scale`` = S in the clear, so every site
recovers the sample-weighted mean change as ``sum * S / Σ n_k`` and applies it (with server
momentum, ``client_agent.server_momentum``) to the global model it holds. Changes are small
and centred on zero, which is what lets the packed codec quantise them over a narrow ±R.

A statistics round (``client_agent.normalisation``) publishes a plain sum the sites decode themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.he.codec import CoefficientMask, UpdateCodec
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
    attempt: int,
    kind: RoundKind,
    total_samples: int,
    num_inputs: int,
    weight_scale: int,
) -> bytes:
    """The start of a published aggregate's envelope; its summed chunks follow as they are."""
    meta = {
        "job_id": job_id,
        "round": round_number,
        "attempt": attempt,
        "kind": kind,
        "total_samples": total_samples,
        "num_inputs": num_inputs,
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
class AggregateFacts:
    """What a published aggregate's envelope says in the clear about the sum it holds."""

    kind: RoundKind
    round_number: int
    attempt: int
    total_samples: int
    num_inputs: int
    weight_scale: int


@dataclass(frozen=True)
class Decryption:
    """How to decrypt one aggregate: the codec, the masks to remove, how many inputs it sums."""

    codec: UpdateCodec
    masks: CoefficientMask | None
    summed_inputs: int


@dataclass(frozen=True)
class DecodedAggregate:
    """A published round, decrypted: the mean update of a training round, or a statistics sum."""

    kind: RoundKind
    round_number: int
    values: NDArray[Any]
    total_samples: int
    num_inputs: int


def _facts(meta: dict[str, Any]) -> AggregateFacts:
    kind, number, attempt = meta.get("kind"), meta.get("round"), meta.get("attempt")
    total, inputs, scale = meta.get("total_samples"), meta.get("num_inputs"), meta.get("weight_scale")
    if kind not in ("statistics", "training") or not all(isinstance(v, int) for v in (number, attempt)):
        raise InvalidRequest("aggregate envelope lacks its round, attempt and kind")
    if not all(isinstance(v, int) and v > 0 for v in (total, inputs, scale)):
        raise InvalidRequest("aggregate envelope lacks positive total_samples, num_inputs and weight_scale")
    return AggregateFacts(kind, number, attempt, total, inputs, scale)  # type: ignore[arg-type]


def decode_aggregate(data: bytes, prepare: Callable[[Envelope, AggregateFacts], Decryption]) -> DecodedAggregate:
    """Decrypt a published aggregate as ``prepare`` (which checks it first) says; a training round's
    sum becomes the sample-weighted mean update."""
    envelope = decode_envelope(data)
    facts = _facts(envelope.meta)
    how = prepare(envelope, facts)
    summed = how.codec.decrypt_aggregate(
        envelope.chunks, envelope.num_values, masks=how.masks, summed_inputs=how.summed_inputs
    )
    values = summed * (facts.weight_scale / facts.total_samples) if facts.kind == "training" else summed
    return DecodedAggregate(
        kind=facts.kind,
        round_number=facts.round_number,
        values=values,
        total_samples=facts.total_samples,
        num_inputs=how.summed_inputs,
    )
