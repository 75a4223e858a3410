"""TensorFlow's CUDA registration errors on a CPU-only machine stay out of the agent's and the demo's output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NOISE = "Unable to register cuDNN factory"


def _stderr(code: str) -> str:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    return run.stderr


@pytest.mark.slow  # imports TensorFlow in a fresh interpreter: 5-15 s of CPU
def test_tensorflow_is_imported_without_its_native_noise_and_stderr_works_after() -> None:
    assert NOISE in _stderr("import tensorflow")  # what a plain import prints on this machine
    quiet = _stderr(
        "import os, sys\n"
        "from client_agent.quiet_tensorflow import import_tensorflow\n"
        "import_tensorflow()\n"
        "import tensorflow as tf\n"
        "assert tf.constant(2).numpy() == 2\n"
        "os.write(2, b'native stderr still open\\n')\n"
        "print('python stderr still open', file=sys.stderr)\n"
    )
    assert NOISE not in quiet
    assert "native stderr still open" in quiet
    assert "python stderr still open" in quiet
