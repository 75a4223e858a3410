"""Bytes in and out of SEAL objects, in the one serialised form fedhe accepts: uncompressed.

SEAL's Python bindings serialise only through files, and only with SEAL's default compression
(zstd). Its zstd loader cannot be trusted with hostile input: a mutated zstd stream makes it
throw from a place that ends in ``std::terminate``, killing the whole process (a site could take
the aggregator down with one upload; ``tests/unit/test_envelope_fuzz.py`` found it). Ciphertext
halves are uniformly random, so compression saves nothing anyway.

So every object leaves here uncompressed (SEAL's own zstd output, inflated in Python and
re-framed with SEAL's header), and a byte string reaches SEAL only after its 16-byte
serialisation header was checked in Python: SEAL's magic, header size and version, no
compression, reserved bytes zero, and a size field equal to the bytes given. Uncompressed input
never reaches the zstd code path at all.

Scratch files hold ciphertexts and plaintexts only, never a key; they live on tmpfs when there
is one and are created 0600 (``mkstemp``), one per thread, reused for every object.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import weakref
from typing import Any

import tenseal.sealapi as seal
import zstandard

from fedhe.errors import InvalidUpdate

_SHM = "/dev/shm"  # noqa: S108
_TMP_ROOT = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None

HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major, minor, compression, reserved, size
SEAL_MAGIC = 0xA15E
COMPR_NONE = 0
COMPR_ZSTD = 2
MAX_OBJECT_BYTES = 64 * 1024 * 1024


class _ScratchFiles(threading.local):
    """One private scratch file per thread (creating one per object cost a third of encryption time)."""

    path: str | None = None

    def get(self) -> str:
        if self.path is None or not os.path.exists(self.path):
            fd, self.path = tempfile.mkstemp(prefix="fedhe-seal-", dir=_TMP_ROOT)
            os.close(fd)
            weakref.finalize(self, _remove, self.path)
        return self.path


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_SCRATCH = _ScratchFiles()


def _uncompressed(data: bytes) -> bytes:
    """SEAL's serialisation of an object, re-framed without compression."""
    magic, header_size, major, minor, compression, _reserved, _size = HEADER.unpack_from(data)
    if compression == COMPR_NONE:
        return data
    if compression != COMPR_ZSTD:
        raise RuntimeError(f"SEAL wrote compression mode {compression}; expected zstd or none")
    payload = zstandard.ZstdDecompressor().decompress(data[header_size:], max_output_size=MAX_OBJECT_BYTES)
    return HEADER.pack(magic, header_size, major, minor, COMPR_NONE, 0, HEADER.size + len(payload)) + payload


def save(obj: Any) -> bytes:
    """Serialise a SEAL object (ciphertext, plaintext), uncompressed."""
    path = _SCRATCH.get()
    obj.save(path)
    with open(path, "rb") as fh:
        return _uncompressed(fh.read())


def seal_version() -> tuple[int, int]:
    """The serialisation version this SEAL build writes (read from an object it saves)."""
    path = _SCRATCH.get()
    seal.Plaintext().save(path)
    with open(path, "rb") as fh:
        _, _, major, minor, *_ = HEADER.unpack_from(fh.read(HEADER.size))
    return major, minor


_VERSION = seal_version()


def check_header(data: bytes, what: str, index: int) -> None:
    """``InvalidUpdate`` unless ``data`` is framed exactly as ``save`` frames it."""
    if len(data) < HEADER.size or len(data) > MAX_OBJECT_BYTES:
        raise InvalidUpdate(
            f"{what} {index} has an impossible size", code="invalid_ciphertext", detail={"chunk": index}
        )
    magic, header_size, major, minor, compression, reserved, size = HEADER.unpack_from(data)
    if (
        magic != SEAL_MAGIC
        or header_size != HEADER.size
        or (major, minor) != _VERSION
        or compression != COMPR_NONE
        or reserved != 0
        or size != len(data)
    ):
        raise InvalidUpdate(
            f"{what} {index} is not an uncompressed SEAL {_VERSION[0]}.{_VERSION[1]} object of its stated size",
            code="invalid_ciphertext",
            detail={"chunk": index},
        )


def load_ciphertext(context: seal.SEALContext, data: bytes, index: int) -> seal.Ciphertext:
    """A ciphertext from bytes that passed ``check_header``; ``InvalidUpdate`` if SEAL refuses them."""
    check_header(data, "chunk", index)
    path = _SCRATCH.get()
    with open(path, "wb") as fh:
        fh.write(data)
    ciphertext = seal.Ciphertext(context)
    try:
        ciphertext.load(context, path)
    except (RuntimeError, ValueError) as exc:
        raise InvalidUpdate(
            f"chunk {index} is not a valid ciphertext for this context",
            code="invalid_ciphertext",
            detail={"chunk": index},
        ) from exc
    return ciphertext
