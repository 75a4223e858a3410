"""Where a site gets a job's given round-0 weights: its own files first, else the aggregator.

A job that starts from given weights names them by the sha256 of their flat float64 vector
(``fedhe.modelspec.ModelSpec.initial_weights_sha256``). A site whose admin already holds them
(ImageNet weights, a backbone pre-trained in house) points ``initial_weights_dir`` at them, and
nothing is downloaded; otherwise the vector comes from the aggregator. Either way the site uses
it only if it is the job's: every value there, no more, and the same hash. A downloaded vector
is kept (0600) in the state directory, so a restart does not fetch it again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest
from fedhe.files import write_private
from fedhe.modelspec import ModelSpec

logger = logging.getLogger(__name__)


class WeightsDownload(Protocol):
    """How the vector is fetched (``fedhe.api_client.AggregatorClient.initial_weights``)."""

    def __call__(self, sha256: str, num_values: int) -> bytes: ...


class InitialWeightsSource:
    """Finds, or fetches and keeps, the given round-0 weights of a job's spec."""

    def __init__(
        self,
        download: WeightsDownload,
        cache_dir: Path,
        *,
        local_dir: Path | None = None,
        custom_modules: Collection[str] = (),
    ):
        self._download = download
        self._cache_dir = cache_dir
        self._local_dir = local_dir
        self._custom_modules = custom_modules

    def __call__(self, spec: ModelSpec) -> NDArray[Any]:
        """The vector ``spec.initial_weights_sha256`` names, checked against it."""
        from client_agent.models import check_given_weights

        sha256 = spec.initial_weights_sha256
        if sha256 is None:
            raise InvalidRequest("this job's round 0 comes from its seed, not from given weights")
        size = spec.num_parameters()
        cached = self._cache_dir / f"initial-weights-{sha256}.f8"
        if cached.exists():
            vector = np.frombuffer(cached.read_bytes(), dtype="<f8")
            if vector.size == size:
                try:
                    check_given_weights(vector, sha256, size)
                    return vector.astype(np.float64)
                except InvalidRequest:
                    logger.warning("kept initial weights %s no longer match; fetching them again", cached.name)
        local = self._local(spec, sha256)
        if local is not None:
            return local
        data = self._download(sha256, size)
        if len(data) != 8 * size:
            raise InvalidRequest(
                f"the aggregator sent {len(data)} bytes of initial weights, the job's model needs {8 * size} "
                f"({size} float64 values): truncated or not this job's",
                code="initial_weights_mismatch",
            )
        vector = np.frombuffer(data, dtype="<f8")
        check_given_weights(vector, sha256, size)
        write_private(cached, data)
        return vector.astype(np.float64)

    def _local(self, spec: ModelSpec, sha256: str) -> NDArray[Any] | None:
        """The vector from a file in the admin's directory whose weights hash to ``sha256``, if any."""
        from client_agent.models import WEIGHT_FILE_SUFFIXES, weights_from_file, weights_sha256

        if self._local_dir is None:
            return None
        for path in sorted(self._local_dir.iterdir()):
            if path.suffix not in WEIGHT_FILE_SUFFIXES or not path.is_file():
                continue
            try:
                vector = weights_from_file(spec, path, custom_modules=self._custom_modules)
            except InvalidRequest as exc:
                logger.info("initial weights: %s does not fit this job's model (%s)", path.name, exc)
                continue
            if weights_sha256(vector) == sha256:
                logger.info("initial weights: using this site's own %s", path.name)
                return vector
        return None
