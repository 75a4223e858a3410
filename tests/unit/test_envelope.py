"""The wire envelope: round trip and a named error for every structural problem."""

from __future__ import annotations

import struct

import pytest

from fedhe.errors import InvalidUpdate
from fedhe.he import Envelope, decode_envelope, encode_envelope
from fedhe.he.envelope import MAGIC


def _sample() -> Envelope:
    return Envelope(format_id="f1", key_id="k1", num_values=10, chunks=[b"abc", b"defgh"], meta={"num_samples": 7})


def test_round_trip() -> None:
    decoded = decode_envelope(encode_envelope(_sample()))
    assert decoded == _sample()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not an envelope", "invalid_envelope"),
        (MAGIC + b"\x00", "invalid_envelope"),
        (MAGIC + struct.pack(">I", 5) + b"{bad}", "invalid_envelope"),
        (MAGIC + struct.pack(">I", 2) + b"[]", "invalid_envelope"),
        (encode_envelope(_sample())[:-1], "truncated_update"),
        (encode_envelope(_sample()) + b"x", "truncated_update"),
    ],
    ids=["magic", "short", "json", "not-object", "truncated", "trailing"],
)
def test_structural_problems_are_named(data: bytes, code: str) -> None:
    with pytest.raises(InvalidUpdate) as raised:
        decode_envelope(data)
    assert raised.value.code == code
