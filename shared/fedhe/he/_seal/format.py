"""SEAL's serialisation at the byte level: plaintexts built from coefficients, and a compact
re-encoding of ciphertexts for the wire.

SEAL's Python bindings have no coefficient setter, and ``fedhe.he._seal.io`` hands out every object
uncompressed, so:

- a plaintext is built by writing SEAL's own uncompressed layout (a 16-byte header with magic
  0xA15E and the version bytes of a header SEAL itself wrote, then parms_id, coefficient count,
  scale and the coefficient array with its own header) and loading it; SEAL's loader checks
  every coefficient is below t.
- ciphertext words are uniformly random modulo primes of at most 60 bits, yet SEAL stores
  each in 64 bits. The compact form keeps SEAL's metadata and
  seed record verbatim and stores each word in 60 bits (a lossless 6.25 % saving), which takes
  a seeded two-values-per-coefficient update under 4 bytes per value. ``seal_ciphertext``
  rebuilds SEAL's uncompressed bytes, and SEAL's loader then validates them as usual.

Compact ciphertext (little-endian)::

    b"FHC1"          magic and version
    73 bytes         SEAL's Ciphertext members: parms_id, is_ntt_form, size, n, coeff_modulus_size,
                     scale, correction_factor
    u64 W            number of 64-bit words SEAL stored
    15 * W / 2       the words, two per 15 bytes (60 bits each)
    0 or 81 bytes    a seeded ciphertext's PRNG record (its SEAL header, type, seed)

If SEAL ever writes something this cannot re-encode (another SEAL major version, a word over
60 bits), the chunk is SEAL's own uncompressed bytes unchanged; both forms load.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.he._seal.io import COMPR_NONE, SEAL_MAGIC, seal_version
from fedhe.he._seal.io import SEAL_HEADER as _HEADER

COMPACT_MAGIC = b"FHC1"
_MEMBERS = 73  # SEAL 4 Ciphertext members before its data array
_WORD_BITS = 60  # SEAL's coefficient primes have at most 60 bits
_LOW_60 = np.uint64((1 << _WORD_BITS) - 1)
_PAIR_BYTES = 2 * _WORD_BITS // 8
_MAX_WORDS = 1 << 24  # larger than any ciphertext of n <= 32768 with two primes; bounds allocations
_SEAL_MAJOR = 4


def _header(total_size: int) -> bytes:
    major, minor = seal_version()
    return _HEADER.pack(SEAL_MAGIC, _HEADER.size, major, minor, COMPR_NONE, 0, total_size)


# A plaintext's members: parms_id (32 bytes), coeff_count (u64) and scale (f64), then its array.
_PLAINTEXT_ARRAY_OFFSET = 32 + 16


def plaintext_bytes(coefficients: NDArray[np.uint64]) -> bytes:
    """SEAL's serialisation of a (non-NTT, BFV) plaintext with these coefficients."""
    words = np.ascontiguousarray(coefficients, dtype="<u8").tobytes()
    array = _header(_HEADER.size + 8 + len(words)) + struct.pack("<Q", coefficients.size) + words
    members = bytes(32) + struct.pack("<Qd", coefficients.size, 0.0) + array
    return _header(_HEADER.size + len(members)) + members


def plaintext_coefficients(data: bytes) -> NDArray[np.uint64]:
    """The coefficients of a plaintext from SEAL's uncompressed serialisation (the inverse of
    ``plaintext_bytes``): TenSEAL's bindings read a plaintext only one coefficient per call."""
    members = _members(data)
    if members is None or len(members) < _PLAINTEXT_ARRAY_OFFSET + _HEADER.size + 8:
        raise ValueError("not an uncompressed SEAL plaintext")
    array = members[_PLAINTEXT_ARRAY_OFFSET:]
    (count,) = struct.unpack_from("<Q", array, _HEADER.size)
    if len(array) != _HEADER.size + 8 + 8 * count:
        raise ValueError("SEAL plaintext of the wrong length")
    return np.frombuffer(array, dtype="<u8", count=count, offset=_HEADER.size + 8).astype(np.uint64)


def _members(data: bytes) -> bytes | None:
    """The uncompressed members of a SEAL 4 object's serialisation, if it can be read here."""
    if len(data) < _HEADER.size:
        return None
    magic, _, major, _, compression, _, size = _HEADER.unpack_from(data)
    if magic != SEAL_MAGIC or major != _SEAL_MAJOR or size != len(data):
        return None
    if compression == COMPR_NONE:
        return data[_HEADER.size :]
    return None


def _strided_words(buffer: Any, offset: int, rows: int) -> NDArray[Any]:
    """One little-endian u64 per 15-byte row, starting ``offset`` bytes into each row."""
    return np.ndarray((rows,), dtype="<u8", buffer=buffer, offset=offset, strides=(_PAIR_BYTES,))


def _pack_words(words: NDArray[Any]) -> bytes:
    """Two 60-bit words a, b per 15 bytes (120 bits, little-endian): bytes 0-7 are a | b << 60,
    bytes 7-14 are a >> 56 | b << 4; the two views agree on byte 7."""
    rows = words.size // 2
    first, second = words[0::2], words[1::2]
    buffer = np.empty(rows * _PAIR_BYTES, dtype=np.uint8)
    _strided_words(buffer, 0, rows)[:] = first | (second << np.uint64(_WORD_BITS))
    _strided_words(buffer, 7, rows)[:] = (first >> np.uint64(56)) | (second << np.uint64(64 - _WORD_BITS))
    return buffer.tobytes()


def _unpack_words(data: bytes, offset: int, count: int, out: NDArray[Any]) -> None:
    rows = count // 2
    out[0::2] = _strided_words(data, offset, rows) & _LOW_60
    out[1::2] = _strided_words(data, offset + 7, rows) >> np.uint64(64 - _WORD_BITS)


def compact_ciphertext(data: bytes) -> bytes:
    """The compact form of SEAL's serialisation of a ciphertext (or ``data`` itself if it cannot
    be re-encoded losslessly)."""
    members = _members(data)
    array_at = _MEMBERS + _HEADER.size
    if members is None or len(members) < array_at + 8:
        return data
    (count,) = struct.unpack_from("<Q", members, array_at)
    words_end = array_at + 8 + 8 * count
    if count % 2 or words_end > len(members):
        return data
    words = np.frombuffer(members, dtype="<u8", count=count, offset=array_at + 8)
    if int(words.max()) >> _WORD_BITS:
        return data
    return b"".join(
        [COMPACT_MAGIC, members[:_MEMBERS], struct.pack("<Q", count), _pack_words(words), members[words_end:]]
    )


# Ciphertext members SEAL writes after the data array (the seed the second polynomial is expanded
# from); checked against real encryptions in tests/unit/test_packed_codec.py.
_AFTER_WORDS = 81


def compact_ciphertext_size(poly_modulus_degree: int) -> int:
    """Bytes of one fresh (seeded) ciphertext's compact form at the data level of a one-data-prime
    context: headers, then ``poly_modulus_degree`` words of 60 bits."""
    return len(COMPACT_MAGIC) + _MEMBERS + 8 + poly_modulus_degree * _WORD_BITS // 8 + _AFTER_WORDS


def seal_ciphertext(chunk: bytes) -> bytes:
    """SEAL's serialisation of a chunk in either form; raises ``ValueError`` if a compact chunk
    is malformed (SEAL's loader checks everything else)."""
    if not chunk.startswith(COMPACT_MAGIC):
        return chunk
    words_at = len(COMPACT_MAGIC) + _MEMBERS + 8
    if len(chunk) < words_at:
        raise ValueError("compact ciphertext is truncated")
    (count,) = struct.unpack_from("<Q", chunk, words_at - 8)
    packed_end = words_at + _PAIR_BYTES * (count // 2)
    if count == 0 or count % 2 or count > _MAX_WORDS or packed_end > len(chunk):
        raise ValueError("compact ciphertext has an impossible word count")
    tail = chunk[packed_end:]
    array_size = _HEADER.size + 8 + 8 * count
    total = _HEADER.size + _MEMBERS + array_size + len(tail)
    out = bytearray(total)
    array_at = _HEADER.size + _MEMBERS
    out[:array_at] = _header(total) + chunk[len(COMPACT_MAGIC) : words_at - 8]
    out[array_at : array_at + _HEADER.size + 8] = _header(array_size) + struct.pack("<Q", count)
    words_start = array_at + _HEADER.size + 8
    _unpack_words(chunk, words_at, count, np.frombuffer(out, dtype="<u8", count=count, offset=words_start))
    out[words_start + 8 * count :] = tail
    return bytes(out)


_SEAL_MEMBERS = struct.Struct("<4Q?QQQdQ")  # parms_id, is_ntt_form, size, n, coeff_modulus_size, scale, correction
_PRNG_TYPES = (1, 2)  # SEAL's prng_type blake2xb and shake256: the seeds its loader can expand


class CompactLayout:
    """The compact chunks of one context's data level (one prime q, coefficient form, two
    components, BFV's scale and correction factor), checked with numpy.

    ``check`` accepts only what SEAL's loader accepts in this form (every word below q, the
    metadata of a fresh or summed ciphertext at the data level, a PRNG record SEAL can expand),
    refusing also bytes SEAL would ignore, so a chunk is checked once, with no SEAL object made
    and no seed expanded (ADR 0011).
    """

    def __init__(self, parms_id: Sequence[int], degree: int, prime: int):
        self.degree = degree
        self.prime = prime
        self.members = _SEAL_MEMBERS.pack(*parms_id, False, 2, degree, 1, 1.0, 1)
        self._words_at = len(COMPACT_MAGIC) + _MEMBERS + 8
        self._half_bytes = _PAIR_BYTES * degree // 2
        self._seeded_size = self._words_at + self._half_bytes + _AFTER_WORDS
        self._summed_size = self._words_at + 2 * self._half_bytes
        self._record_header = _header(_AFTER_WORDS)

    def check(self, chunk: bytes) -> bool:
        """True for a valid compact chunk of this level, False if ``chunk`` is not in the compact
        form (SEAL's own form, for SEAL to read); ``ValueError`` naming what is wrong otherwise
        (``FormatMismatch`` for a well-formed chunk of another level, size or form)."""
        if not chunk.startswith(COMPACT_MAGIC):
            return False
        if chunk[len(COMPACT_MAGIC) : len(COMPACT_MAGIC) + _MEMBERS] != self.members:
            raise FormatMismatch("not a fresh or summed ciphertext of this context's data level")
        (count,) = struct.unpack_from("<Q", chunk, self._words_at - 8)
        if count == self.degree and len(chunk) == self._seeded_size:
            record = chunk[-_AFTER_WORDS:]
            if record[: _HEADER.size] != self._record_header or record[_HEADER.size] not in _PRNG_TYPES:
                raise ValueError("the seed record is not one SEAL wrote")
            self._words(chunk, 0)
            return True
        if count == 2 * self.degree and len(chunk) == self._summed_size:
            self._words(chunk, 0)
            if not self._words(chunk, 1).any():
                raise FormatMismatch("a transparent ciphertext (its second half is zero)")
            return True
        raise FormatMismatch("neither a seeded nor a summed ciphertext of this context's degree")

    def _words(self, chunk: bytes, half: int) -> NDArray[np.uint64]:
        words = np.empty(self.degree, dtype=np.uint64)
        _unpack_words(chunk, self._words_at + half * self._half_bytes, self.degree, words)
        if int(words.max()) >= self.prime:
            raise ValueError("a word is not below the data prime")
        return words


class FormatMismatch(ValueError):
    """A well-formed chunk that is not of this format's level, size or form."""
