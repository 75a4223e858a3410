"""Import TensorFlow without the native log lines it prints on every CPU-only machine.

TensorFlow 2.15's import registers its CUDA plugins twice and says so at ERROR level
("Unable to register cuDNN factory …") on machines with no GPU at all. Those lines come from
C++ straight to file descriptor 2, past Python's logging, and land in the middle of a site
admin's agent log and the demo's round table. ``TF_CPP_MIN_LOG_LEVEL=3`` would hide them but
also every real error later on, so only the import itself is silenced; an import that fails
still raises, and is reported after stderr is restored.
"""

from __future__ import annotations

import os
import sys


def import_tensorflow() -> None:
    """Import TensorFlow once, with native stderr silenced for the import only."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401 (importing is the point)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
