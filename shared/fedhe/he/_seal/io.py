"""Bytes in and out of SEAL objects, in the one serialised form fedhe accepts: uncompressed.

SEAL's Python bindings (``tenseal.sealapi``) serialise only to and from files, and only with
SEAL's default compression (zstd). Its zstd loader cannot be trusted with hostile input: a
mutated zstd stream makes it throw from a place that ends in ``std::terminate``, killing the
whole process (a site could take the aggregator down with one upload;
``tests/unit/test_envelope_fuzz.py`` found it). Ciphertext words are uniformly random, so
compression saves nothing anyway.

So every object leaves ``save`` uncompressed (SEAL's zstd output inflated in Python and
re-framed with SEAL's header), and bytes reach SEAL only after their 16-byte serialisation
header was checked in Python: SEAL's magic, header size and version, no compression, reserved
bytes zero, and a size equal to the bytes given. Hostile input never reaches the zstd path.

Bytes pass through one scratch file per thread, on tmpfs where there is one. Only ciphertexts
and plaintexts built from public or encrypted data go there, never a key.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import tempfile
import threading
import weakref
from typing import Any

import tenseal.sealapi as seal
import zstandard

# Scratch files hold ciphertexts only; tmpfs keeps them off disk. mkstemp makes them 0600.
_SHM = "/dev/shm"  # noqa: S108
_TMP_ROOT = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


class _ScratchFiles(threading.local):
    """One private scratch file per thread, reused for every chunk (creating one per chunk
    cost about a third of the encryption time)."""

    path: str | None = None

    def get(self) -> str:
        if self.path is None or not os.path.exists(self.path):
            fd, self.path = tempfile.mkstemp(prefix="fedhe-ct-", dir=_TMP_ROOT)
            os.close(fd)
            weakref.finalize(self, _remove, self.path)
        return self.path


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_SCRATCH = _ScratchFiles()
SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
COMPR_NONE = 0
COMPR_ZSTD = 2
MAX_OBJECT_BYTES = 64 * 1024 * 1024


def _read_scratch(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read()
    magic, header_size, major, minor, compression, _reserved, size = SEAL_HEADER.unpack_from(data)
    data = data[:size]
    if compression == COMPR_NONE:
        return data
    if compression != COMPR_ZSTD:
        raise RuntimeError(f"SEAL wrote compression mode {compression}; expected zstd or none")
    payload = zstandard.ZstdDecompressor().decompress(data[header_size:], max_output_size=MAX_OBJECT_BYTES)
    return SEAL_HEADER.pack(magic, header_size, major, minor, COMPR_NONE, 0, SEAL_HEADER.size + len(payload)) + payload


@functools.cache
def seal_version() -> tuple[int, int]:
    """The (major, minor) serialisation version this SEAL build writes (read from a header it wrote)."""
    path = _SCRATCH.get()
    seal.Plaintext().save(path)
    with open(path, "rb") as fh:
        _, _, major, minor, *_ = SEAL_HEADER.unpack_from(fh.read(SEAL_HEADER.size))
    return major, minor


def check_header(data: bytes) -> None:
    """``ValueError`` unless ``data`` is framed exactly as ``SealIO.save`` frames an object."""
    if not SEAL_HEADER.size <= len(data) <= MAX_OBJECT_BYTES:
        raise ValueError("impossible size for a SEAL object")
    magic, header_size, major, minor, compression, reserved, size = SEAL_HEADER.unpack_from(data)
    if (
        magic != SEAL_MAGIC
        or header_size != SEAL_HEADER.size
        or (major, minor) != seal_version()
        or compression != COMPR_NONE
        or reserved != 0
        or size != len(data)
    ):
        raise ValueError("not an uncompressed SEAL object of this version and its stated size")


class SealIO:
    """Byte-level (de)serialisation of SEAL objects through the thread's scratch file."""

    def __init__(self, seal_context: seal.SEALContext):
        self._context = seal_context

    @staticmethod
    def save(obj: Any) -> bytes:
        """SEAL's serialisation of ``obj`` (anything with ``save(path)``), uncompressed."""
        path = _SCRATCH.get()
        obj.save(path)
        return _read_scratch(path)

    @staticmethod
    def _stage(data: bytes) -> str:
        """Write ``data`` at the start of the scratch file for SEAL to load.

        The file is not truncated (on tmpfs that costs more than the write), so bytes of an
        earlier object may follow. SEAL reads exactly the size its header declares, so that
        size must be the length of ``data`` (``check_header``): a short object must never be
        completed by stale bytes. Only uncompressed objects pass, so SEAL's zstd loader never
        sees these bytes.
        """
        check_header(data)
        path = _SCRATCH.get()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        return path

    def load(self, data: bytes) -> seal.Ciphertext:
        """A ciphertext from SEAL's serialisation; SEAL raises on anything malformed."""
        ciphertext = seal.Ciphertext(self._context)
        ciphertext.load(self._context, self._stage(data))
        return ciphertext

    @staticmethod
    def load_parameters(data: bytes) -> seal.EncryptionParameters:
        """Encryption parameters from SEAL's serialisation, as ``tenseal.sealapi`` objects."""
        parameters = seal.EncryptionParameters(seal.SCHEME_TYPE.NONE)
        parameters.load(SealIO._stage(data))
        return parameters

    def load_plaintext(self, data: bytes) -> seal.Plaintext:
        """A plaintext from SEAL's serialisation; SEAL checks every coefficient is below t."""
        plain = seal.Plaintext()
        plain.load(self._context, self._stage(data))
        return plain
