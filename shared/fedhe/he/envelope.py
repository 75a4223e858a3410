"""The wire envelope for encrypted updates and aggregates.

Layout (all integers big-endian)::

    b"FEDHE\\x01"                 magic and envelope version
    u32 header_length             then that many bytes of UTF-8 JSON
    header                        {"format_id", "key_id", "num_values", "chunk_sizes", ...}
    chunk 0 .. chunk k-1          raw ciphertext bytes, lengths from "chunk_sizes"

The header carries everything the receiver must check before it touches a ciphertext, and
whatever plaintext metadata the sender is allowed to reveal (sample count, metrics).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from fedhe.errors import InvalidUpdate

MAGIC = b"FEDHE\x01"
MAX_HEADER_BYTES = 256 * 1024
MAX_CHUNKS = 1_000_000
_REQUIRED = ("format_id", "key_id", "num_values", "chunk_sizes")


@dataclass
class Envelope:
    """A decoded envelope: its JSON header and its ciphertext chunks."""

    format_id: str
    key_id: str
    num_values: int
    chunks: list[bytes]
    meta: dict[str, Any] = field(default_factory=dict)


def encode_header(
    *, format_id: str, key_id: str, num_values: int, chunk_sizes: list[int], meta: dict[str, Any]
) -> bytes:
    """The bytes of an envelope up to its first chunk (the chunks follow as they are)."""
    header = dict(meta)
    header.update(format_id=format_id, key_id=key_id, num_values=num_values, chunk_sizes=chunk_sizes)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(raw)) + raw


def encode_envelope(envelope: Envelope) -> bytes:
    """Serialise an envelope."""
    prefix = encode_header(
        format_id=envelope.format_id,
        key_id=envelope.key_id,
        num_values=envelope.num_values,
        chunk_sizes=[len(chunk) for chunk in envelope.chunks],
        meta=envelope.meta,
    )
    return b"".join([prefix, *envelope.chunks])


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EnvelopeHeader:
    """Everything an envelope says before its first ciphertext byte."""

    format_id: str
    key_id: str
    num_values: int
    chunk_sizes: list[int]
    meta: dict[str, Any]

    @property
    def body_bytes(self) -> int:
        """How many ciphertext bytes follow the header."""
        return sum(self.chunk_sizes)


PREFIX_BYTES = len(MAGIC) + 4


def header_length(prefix: bytes) -> int:
    """The length of the JSON header announced by an envelope's first ``PREFIX_BYTES`` bytes."""
    if not prefix.startswith(MAGIC):
        raise InvalidUpdate("body is not a fedhe envelope (bad magic bytes)", code="invalid_envelope")
    if len(prefix) < PREFIX_BYTES:
        raise InvalidUpdate("envelope is truncated before its header", code="invalid_envelope")
    (length,) = struct.unpack_from(">I", prefix, len(MAGIC))
    if length > MAX_HEADER_BYTES:
        raise InvalidUpdate("envelope header is too large", code="invalid_envelope")
    return int(length)


def parse_header(raw: bytes, max_body_bytes: int) -> EnvelopeHeader:
    """Parse and check an envelope's JSON header; ``max_body_bytes`` bounds each chunk's declared size."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers past Python's digit limit;
        # RecursionError, nesting deeper than the parser's stack.
        raise InvalidUpdate("envelope header is not valid JSON", code="invalid_envelope") from exc
    if not isinstance(header, dict) or any(key not in header for key in _REQUIRED):
        raise InvalidUpdate(f"envelope header must have {', '.join(_REQUIRED)}", code="invalid_envelope")
    sizes = header.pop("chunk_sizes")
    if (
        not isinstance(sizes, list)
        or not 0 < len(sizes) <= MAX_CHUNKS
        or not all(_is_int(s) and 0 < s <= max_body_bytes for s in sizes)
    ):
        raise InvalidUpdate(
            f"chunk_sizes must be a list of 1 to {MAX_CHUNKS} positive integers no larger than the body",
            code="invalid_envelope",
        )
    num_values = header.pop("num_values")
    format_id = header.pop("format_id")
    key_id = header.pop("key_id")
    if not _is_int(num_values) or not 0 < num_values <= 2**40:
        raise InvalidUpdate("num_values must be a positive integer", code="invalid_envelope")
    if not isinstance(format_id, str) or not isinstance(key_id, str):
        raise InvalidUpdate("format_id and key_id must be strings", code="invalid_envelope")
    return EnvelopeHeader(format_id=format_id, key_id=key_id, num_values=num_values, chunk_sizes=sizes, meta=header)


def decode_envelope(data: bytes) -> Envelope:
    """Parse a whole envelope; any structural problem raises ``InvalidUpdate`` naming it."""
    length = header_length(data[:PREFIX_BYTES])
    if len(data) < PREFIX_BYTES + length:
        raise InvalidUpdate("envelope header is truncated", code="invalid_envelope")
    header = parse_header(data[PREFIX_BYTES : PREFIX_BYTES + length], len(data))
    offset = PREFIX_BYTES + length
    if offset + header.body_bytes != len(data):
        raise InvalidUpdate(
            f"envelope declares {header.body_bytes} ciphertext bytes but carries {len(data) - offset}",
            code="truncated_update",
        )
    chunks = []
    for size in header.chunk_sizes:
        chunks.append(data[offset : offset + size])
        offset += size
    return Envelope(
        format_id=header.format_id, key_id=header.key_id, num_values=header.num_values, chunks=chunks, meta=header.meta
    )
