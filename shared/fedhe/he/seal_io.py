"""Bytes in and out of SEAL objects through a private scratch file.

SEAL's Python bindings (``tenseal.sealapi``) serialise only to and from files, so bytes pass
through one scratch file per thread, on tmpfs where there is one. Only ciphertexts and
plaintexts built from public or encrypted data go there, never a key.
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


class SealIO:
    """Byte-level (de)serialisation of SEAL objects through the thread's scratch file."""

    def __init__(self, seal_context: seal.SEALContext):
        self._context = seal_context

    @staticmethod
    def save(obj: Any) -> bytes:
        """SEAL's own serialisation of ``obj`` (anything with ``save(path)``)."""
        path = _SCRATCH.get()
        obj.save(path)
        with open(path, "rb") as fh:
            return fh.read()

    @staticmethod
    def _stage(data: bytes) -> str:
        """Write ``data`` at the start of the scratch file for SEAL to load.

        The file is not truncated (on tmpfs that costs more than the write), so bytes of an
        earlier object may follow. SEAL reads exactly the size its header declares, so that
        size must be the length of ``data``: a short object must never be completed by stale
        bytes.
        """
        if len(data) < SEAL_HEADER.size:
            raise ValueError("too short for a SEAL object")
        magic, *_, declared = SEAL_HEADER.unpack_from(data)
        if magic != SEAL_MAGIC or declared != len(data):
            raise ValueError("SEAL header does not declare the length of the data")
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
