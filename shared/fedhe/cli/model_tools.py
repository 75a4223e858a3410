"""The Keras steps of ``fedhe job create``, contributed by the agent package.

Fingerprinting a model the spec alone does not size (the Keras applications, custom models,
frozen layers) and reading ``--initial-weights`` build the model with TensorFlow, which only the
site agent installs. The common package imports no service, so the agent contributes these
steps through the ``fedhe.model_tools`` entry-point group (``keras = "client_agent.models"`` in
pyproject.toml); where the agent's packages are missing, the command says to install
``fedhe[agent]``.
"""

from __future__ import annotations

from collections.abc import Collection
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.modelspec import ModelFingerprint, ModelSpec

MODEL_TOOLS_GROUP = "fedhe.model_tools"
"""Entry-point group through which the agent contributes its Keras model tools."""
MODEL_TOOLS_NAME = "keras"


class ModelTools(Protocol):
    """What ``fedhe job create`` needs of the agent's model builder (``client_agent.models``)."""

    def fingerprint(
        self, spec: ModelSpec, seed: int, *, custom_modules: Collection[str] = (), given: NDArray[Any] | None = None
    ) -> ModelFingerprint:
        """The fingerprint of the job creator's build of ``spec``."""
        ...

    def weights_from_file(self, spec: ModelSpec, path: Path, *, custom_modules: Collection[str] = ()) -> NDArray[Any]:
        """The flat weight vector a ``.keras``, ``.h5`` or ``.npy`` file holds for ``spec``."""
        ...

    def weights_sha256(self, weights: NDArray[Any]) -> str:
        """How a job names its round-0 weights."""
        ...


def model_tools(purpose: str) -> ModelTools:
    """The agent's model tools, or a refusal naming ``purpose`` and the extra to install."""
    install = f"{purpose} builds the model with TensorFlow: install the agent's packages (pip install 'fedhe[agent]')"
    found = entry_points(group=MODEL_TOOLS_GROUP, name=MODEL_TOOLS_NAME)
    if not found:
        raise InvalidRequest(install)
    try:
        tools: ModelTools = next(iter(found)).load()
    except ImportError as exc:
        raise InvalidRequest(f"{install} ({exc})") from exc
    return tools
