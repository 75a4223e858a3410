"""The intake's BodyReader cuts exact reads out of a body however it arrives in parts."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

import pytest

from aggregator.intake import BodyReader
from fedhe.errors import InvalidUpdate, PayloadTooLarge


async def _parts(body: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in [*cuts, len(body)]:
        yield body[start:cut]  # empty parts too, as a server may send them
        start = cut


def _read_all(body: bytes, cuts: list[int], sizes: list[int], limit: int) -> tuple[list[bytes], BodyReader]:
    async def run() -> tuple[list[bytes], BodyReader]:
        reader = BodyReader(_parts(body, cuts), limit)
        reads = [await reader.read_exactly(size, f"read {i}") for i, size in enumerate(sizes)]
        await reader.expect_end()
        return reads, reader

    return asyncio.run(run())


@pytest.mark.parametrize("seed", range(40))
def test_reads_are_the_body_in_order_whatever_the_parts(seed: int) -> None:
    rng = random.Random(seed)
    body = rng.randbytes(rng.randrange(0, 5000))
    cuts = sorted(rng.randrange(0, len(body) + 1) for _ in range(rng.randrange(0, 30)))
    sizes: list[int] = []
    left = len(body)
    while left:
        size = min(left, rng.choice([0, 1, 7, 100, 1000, left]))
        sizes.append(size)
        left -= size
    reads, reader = _read_all(body, cuts, sizes, limit=len(body))
    assert b"".join(reads) == body
    assert [len(read) for read in reads] == sizes
    assert all(type(read) is bytes for read in reads)
    assert reader.read_bytes == len(body)
    assert reader.digest.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_body_that_ends_early_or_runs_on_or_is_too_large_is_refused() -> None:
    body = bytes(range(100))
    with pytest.raises(InvalidUpdate, match="ends inside read 1"):
        _read_all(body, [30], [60, 60], limit=1000)
    with pytest.raises(InvalidUpdate, match="after its last declared chunk"):
        _read_all(body, [30], [60], limit=1000)  # the rest of the buffered part
    with pytest.raises(InvalidUpdate, match="after its last declared chunk"):
        _read_all(body, [60], [60], limit=1000)  # a part not yet received
    with pytest.raises(PayloadTooLarge):
        _read_all(body, [50], [100], limit=99)
