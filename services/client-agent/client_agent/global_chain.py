"""The global model as a site holds it: public initial weights plus every published round, applied in order.

The aggregator never holds a model, only encrypted sums of the sites' changes. Each site starts
from the public initial weights (``client_agent.models.initial_weights`` of the job's spec and seed)
and, after each published round, decrypts the mean update and applies it with server momentum
(``client_agent.server_momentum``); a statistics round instead fixes the input normalisation.
The arithmetic is element-wise float64, so every site holds bit-identical weights.

A job that trains only some layers publishes aggregates of those layers' values alone
(``trainable_mask``); the frozen values keep their round-0 weights (and zero momentum).

The chain is saved (0600) after every round so a restart resumes where it stopped; a site
without it (new, or its state lost) replays the published rounds from the start.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from client_agent.normalisation import StatisticsNoise, normalisation_from_sum
from client_agent.server_momentum import ServerState, apply_server_momentum, initial_state
from fedhe.errors import InvalidRequest
from fedhe.files import write_private
from fedhe.global_model import DecodedAggregate
from fedhe.modelspec import InputNormalisation, ModelSpec
from fedhe.schemas import JobPublic


@dataclass
class ChainState:
    """How far the chain has got: the model round ``next_round`` trains from."""

    next_round: int
    server: ServerState
    normalisation: InputNormalisation | None


class GlobalModelChain:
    """One job's global model at this site, advanced round by round and kept on disk."""

    def __init__(
        self,
        job: JobPublic,
        path: Path,
        *,
        custom_modules: Collection[str] = (),
        given_weights: Callable[[ModelSpec], NDArray[Any]] | None = None,
    ):
        self._job = job
        self._path = path
        self._custom_modules = custom_modules
        self._given_weights = given_weights
        self.state = self._load() or self._start()

    @property
    def next_round(self) -> int:
        """The round whose aggregate is applied next (= the round the current model trains)."""
        return self.state.next_round

    @property
    def weights(self) -> NDArray[Any]:
        """The current global weights."""
        return self.state.server.weights

    @cached_property
    def architecture_sha256(self) -> str:
        """The hash of the architecture this site builds for the job (uploads carry it)."""
        from client_agent.models import architecture_sha256, build_model

        return architecture_sha256(build_model(self._job.model, custom_modules=self._custom_modules))

    @cached_property
    def trainable_mask(self) -> NDArray[np.bool_] | None:
        """Which values of the weights an update carries; None when every value does."""
        if self._job.model.trainable is None:
            return None
        from client_agent.models import build_model, trainable_mask

        return trainable_mask(build_model(self._job.model, custom_modules=self._custom_modules))

    def update_values(self, change: NDArray[Any]) -> NDArray[Any]:
        """The part of a whole-model change an upload carries (only trainable values, if the job says so)."""
        mask = self.trainable_mask
        return change if mask is None else change[mask]

    @property
    def spec(self) -> ModelSpec:
        """The job's model spec with the normalisation the statistics step found, if it had one."""
        if self.state.normalisation is None:
            return self._job.model
        return self._job.model.model_copy(update={"normalisation": self.state.normalisation})

    def _start(self) -> ChainState:
        from client_agent.models import initial_weights

        spec = self._job.model
        given = None
        if spec.initial_weights_sha256 is not None:
            if self._given_weights is None:
                raise InvalidRequest("this job starts from given initial weights and this site cannot fetch them")
            given = self._given_weights(spec)
        weights = initial_weights(spec, self._job.seed, custom_modules=self._custom_modules, given=given)
        if weights.size != self._job.num_parameters:
            raise InvalidRequest(
                f"the model builds {weights.size} weights here, the job says {self._job.num_parameters}",
                code="model_fingerprint_mismatch",
            )
        return ChainState(next_round=0, server=initial_state(weights), normalisation=None)

    def apply(self, aggregate: DecodedAggregate) -> None:
        """Advance by one published round and save."""
        if aggregate.round_number != self.state.next_round:
            raise InvalidRequest(f"expected round {self.state.next_round}'s aggregate, got {aggregate.round_number}'s")
        job = self._job
        if aggregate.kind == "statistics":
            if job.statistics is None:
                raise InvalidRequest("a statistics aggregate for a job without a statistics step")
            noise = StatisticsNoise(
                num_inputs=aggregate.num_inputs,
                noise_multiplier=job.statistics.noise_multiplier,
                clip_norm=job.statistics.row_clip_norm,
            )
            self.state.normalisation = normalisation_from_sum(
                aggregate.values,
                job.statistics.feature_bounds,
                aggregate.total_samples,
                job.max_samples_per_round,
                noise,
            )
        else:
            values = aggregate.values
            mask = self.trainable_mask
            if mask is not None:
                values = np.zeros(mask.size)
                values[mask] = aggregate.values
            self.state.server = apply_server_momentum(
                self.state.server,
                values,
                momentum=job.algorithm.server_momentum,
                server_learning_rate=job.algorithm.server_learning_rate,
            )
        self.state.next_round += 1
        self._save()

    def _save(self) -> None:
        buffer = io.BytesIO()
        meta = {
            "job_id": self._job.id,
            "next_round": self.state.next_round,
            "normalisation": None if self.state.normalisation is None else self.state.normalisation.model_dump(),
        }
        np.savez(
            buffer,
            weights=self.state.server.weights,
            velocity=self.state.server.velocity,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        write_private(self._path, buffer.getvalue())

    def _load(self) -> ChainState | None:
        """The saved chain, if it is this job's and whole; anything else is replayed instead."""
        if not self._path.exists():
            return None
        try:
            with np.load(self._path, allow_pickle=False) as saved:
                meta = json.loads(saved["meta"].tobytes())
                server = ServerState(weights=saved["weights"].astype(np.float64), velocity=saved["velocity"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        if meta.get("job_id") != self._job.id or server.weights.size != self._job.num_parameters:
            return None
        normalisation = meta.get("normalisation")
        return ChainState(
            next_round=int(meta["next_round"]),
            server=server,
            normalisation=None if normalisation is None else InputNormalisation.model_validate(normalisation),
        )
