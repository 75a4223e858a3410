"""Bytes in and out of SEAL objects through a private scratch file.

SEAL's Python bindings (``tenseal.sealapi``) serialise only to and from files, so bytes pass
through one scratch file per thread, on tmpfs where there is one. Only ciphertexts and
plaintexts built from public or encrypted data go there, never a key.
"""

from __future__ import annotations

import contextlib
import os
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

    def _stage(self, data: bytes) -> str:
        path = _SCRATCH.get()
        with open(path, "wb") as fh:
            fh.write(data)
        return path

    def load(self, data: bytes) -> seal.Ciphertext:
        """A ciphertext from SEAL's serialisation; SEAL raises on anything malformed."""
        ciphertext = seal.Ciphertext(self._context)
        ciphertext.load(self._context, self._stage(data))
        return ciphertext

    def load_plaintext(self, data: bytes) -> seal.Plaintext:
        """A plaintext from SEAL's serialisation; SEAL checks every coefficient is below t."""
        plain = seal.Plaintext()
        plain.load(self._context, self._stage(data))
        return plain
