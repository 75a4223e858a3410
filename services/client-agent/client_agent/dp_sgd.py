"""DP-SGD with Poisson sampling, per-example clipping and noise nobody can regenerate.

The mechanism (Abadi et al. 2016, as dp_accounting's Poisson-subsampled Gaussian analyses it)
---------------------------------------------------------------------------------------------
Each step includes every training example independently with probability q = batch_size / n
(so batch sizes vary, mean q·n), computes each included example's gradient, clips it to L2
norm C (``l2_norm_clip``), sums, adds Gaussian noise N(0, (σ·C)²) to every coordinate and
divides by the *expected* batch size q·n, a constant: dividing by the realised size would
make the step's scale depend on the data. A local epoch is n / batch_size steps.

How per-example gradients are clipped (``choose_clipping_path``)
-----------------------------------------------------------------
``FAST``: every layer with trainable variables is in the layer registry (tensorflow-privacy's
    Dense and Embedding; our Conv2D, DepthwiseConv2D and BatchNormalization in inference mode,
    ``client_agent.layer_registry``) and the model is functional/Sequential.
    ``clip_grads.compute_gradient_norms`` gets every example's gradient norm from one forward/backward pass
    (ghost clipping, arXiv:1510.01799, arXiv:2009.03106); a second backward pass of the loss
    weighted by each example's clip factor yields the sum of clipped gradients.
``VECTORIZED``: anything else (grouped convolutions, LayerNormalization, ...). Per-example gradients are
    materialised with ``tf.vectorized_map`` over a chunk of examples (``tf.map_fn``, one example
    after another, for models with grouped convolutions, which TensorFlow cannot vectorise on
    every CPU), clipped and summed; a ``tf.while_loop`` walks the chunks so memory stays at one
    chunk x the parameter count.

Either way a batch is padded with masked rows (to a multiple of 8, or of the chunk size) and
the step is traced once with an unknown batch dimension: no retracing as sizes vary, and an
empty Poisson batch (possible when q·n is small) is just a batch of masked rows.

BatchNormalization and Dropout
------------------------------
Batch statistics couple the examples of a batch: one example's gradient would depend on the
others, so it is no longer a per-example quantity and clipping it bounds nothing. Every
forward pass here runs in inference mode (``training=False``): BatchNormalization normalises
with its fixed moving statistics (never updated, so their entries in ``get_weights()`` keep
their initial values and their deltas stay 0) and stays a per-example affine map whose gamma
and beta are still trained; Dropout is off, so both passes of the fast path see the same
network.

Local momentum
--------------
With ``momentum`` = β > 0 the step applies heavy-ball momentum to the noisy (and proximal)
gradient: v ← β·v + g, w ← w − lr·v, v starting at 0 each run. Like the proximal term it only
transforms released noisy gradients, so it costs no privacy.

FedProx
-------
With ``proximal_mu`` = μ > 0 the step adds μ·(w − w_global) to the noisy gradient, outside
clipping and noise. It depends only on the current weights (themselves a function of earlier
noisy steps) and the global model every site received, never on an example, so it is
post-processing of DP outputs and the guarantee (and the accounting) is unchanged. Clipping
it instead would waste clip budget on a data-independent term.

Where the randomness comes from, on every path
----------------------------------------------
``client_agent.dp_randomness.draw_run_secrets`` is called once per run (``DPSGDRun``), never per
job, round or site id:

* noise: a ``tf.random.Generator`` built ``from_state`` with the Philox algorithm, its 192-bit
  state (128-bit counter, 64-bit key) read from ``os.urandom``. Both paths draw every noise
  tensor from it inside the traced step; no TensorFlow global or op seed is involved (nothing
  here calls ``tf.random.set_seed`` or ``tf.keras.utils.set_random_seed``, and the noise ops
  use only the generator's state).
* sampling: a NumPy ``Generator`` (PCG64) seeded with 128 bits from ``secrets``; it decides
  each step's batch and nothing else.

No value derived from them leaves the run: the result is the trained weights (noise already
added), the loss, and the public step count and q. The secrets object prints no value and
is dropped when the run ends; the job's public ``seed`` only fixes round-0 weights. Philox is
a counter-based generator built for statistical quality (Salmon et al. 2011), not a proven
CSPRNG; recovering its state from float32 noise buried in gradients is not a known attack,
and the float-level concerns of Gaussian sampling (Mironov 2012) apply as to any float DP-SGD.
``FEDHE_INSECURE_DP_SEED=test-only:<int>`` replaces both secrets with values derived from the
integer, for tests only (see ``client_agent.dp_randomness``).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads, gradient_clipping_utils

from client_agent.dp_randomness import RunSecrets, draw_run_secrets
from client_agent.layer_registry import fast_clipping_registry, layer_supported
from fedhe.errors import InvalidRequest
from fedhe.privacy import sampling_probability, steps_per_epoch

# Per-example gradients held at once on the vectorised path: chunk x trainable parameters floats.
_VECTORIZED_FLOATS_PER_CHUNK = 1 << 24
_MAX_CHUNK = 32
_PAD_MULTIPLE = 8


class ClippingPath(enum.StrEnum):
    """How per-example gradient norms are obtained (the mechanism is the same)."""

    FAST = "fast_gradient_clipping"
    VECTORIZED = "vectorized_per_example"


def _all_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """Every layer, nested models' included (the fast path walks into them)."""
    return [layer for layer in model.submodules if isinstance(layer, tf.keras.layers.Layer)]


def choose_clipping_path(model: tf.keras.Model) -> ClippingPath:
    """``FAST`` when the registry covers every trainable layer (and its configuration), else ``VECTORIZED``."""
    functional = gradient_clipping_utils.has_internal_compute_graph(model)
    covered = gradient_clipping_utils.all_trainable_layers_are_registered(model, fast_clipping_registry())
    if functional and covered and all(layer_supported(layer) for layer in _all_layers(model)):
        return ClippingPath.FAST
    return ClippingPath.VECTORIZED


@dataclass(frozen=True)
class DPParameters:
    """The Gaussian mechanism of one step: clip norm C and noise multiplier σ (std σ·C)."""

    l2_norm_clip: float
    noise_multiplier: float


def _per_example_loss(y: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


class _Step:
    """One traced training step over a padded batch, on one clipping path (or none, non-private)."""

    def __init__(
        self,
        model: tf.keras.Model,
        *,
        dp: DPParameters | None,
        expected_batch_size: float,
        learning_rate: float,
        proximal_mu: float,
        momentum: float,
        noise: tf.random.Generator | None,
    ):
        self.model = model
        self.path = choose_clipping_path(model) if dp is not None else None
        variables = model.trainable_variables
        parameters = sum(int(np.prod(v.shape)) for v in variables)
        if self.path is ClippingPath.VECTORIZED:
            fit = max(1, _VECTORIZED_FLOATS_PER_CHUNK // max(1, parameters))
            self.chunk = min(_MAX_CHUNK, 1 << (fit.bit_length() - 1))
        else:
            self.chunk = 0  # the whole padded batch at once
        self._dp = dp
        self._noise = noise
        self._denominator = float(expected_batch_size)
        self._lr = float(learning_rate)
        self._mu = float(proximal_mu)
        self._anchor = [tf.constant(v.numpy()) for v in variables] if proximal_mu > 0 else []
        self._momentum = float(momentum)
        self._velocity = [tf.Variable(tf.zeros_like(v), trainable=False) for v in variables] if momentum > 0 else []
        self._registry = fast_clipping_registry()
        # TensorFlow's vectorisation of a grouped convolution's kernel gradient fails on some CPUs
        # ("filter_size does not have enough elements"); those models compute each example's
        # gradient in turn instead, the same values at a chunk's worth of steps.
        self._one_at_a_time = any(getattr(layer, "groups", 1) > 1 for layer in _all_layers(model))
        spec = tf.TensorSpec([None, None, *model.input_shape[1:]], tf.float32)
        rows = tf.TensorSpec([None, None], tf.float32)
        labels = tf.TensorSpec([None, None], tf.int64)
        # No autograph: the loops are explicit, and tensorflow-privacy's helpers need no conversion.
        self.run = tf.function(self._run, input_signature=[spec, labels, rows], autograph=False)

    def pad(self, x: NDArray[Any], y: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        """(chunks, chunk) shaped inputs, labels and 0/1 mask for ``x``, ``y`` (any length, even 0)."""
        count = x.shape[0]
        if self.chunk:
            chunks = max(1, math.ceil(count / self.chunk))
            width = self.chunk
        else:
            chunks, width = 1, max(_PAD_MULTIPLE, _PAD_MULTIPLE * math.ceil(count / _PAD_MULTIPLE))
        total = chunks * width
        xs = np.zeros((total, *x.shape[1:]), dtype=np.float32)
        xs[:count] = x
        ys = np.zeros(total, dtype=np.int64)
        ys[:count] = y
        mask = np.zeros(total, dtype=np.float32)
        mask[:count] = 1.0
        return xs.reshape(chunks, width, *x.shape[1:]), ys.reshape(chunks, width), mask.reshape(chunks, width)

    def _clipped_sum(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Σ over unmasked rows of each example's gradient clipped to C, and Σ of their losses."""
        model, variables = self.model, self.model.trainable_variables
        if self._dp is None:
            with tf.GradientTape() as tape:
                losses = _per_example_loss(y, model(x, training=False)) * mask
                total = tf.reduce_sum(losses)
            return tape.gradient(total, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO), total
        clip = self._dp.l2_norm_clip
        if self.path is ClippingPath.FAST:
            norms = clip_grads.compute_gradient_norms(
                model,
                self._registry,
                x,
                y,
                per_example_loss_fn=lambda labels, logits, _: _per_example_loss(labels, logits),
                trainable_vars=variables,
            )
            factors = mask * clip / tf.maximum(clip, norms)
            with tf.GradientTape() as tape:
                losses = _per_example_loss(y, model(x, training=False))
                weighted = tf.reduce_sum(losses * factors)
            grads = tape.gradient(weighted, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads, tf.reduce_sum(losses * mask)

        def one_example(example: tuple[tf.Tensor, tf.Tensor]) -> tuple[list[tf.Tensor], tf.Tensor]:
            features, label = example
            with tf.GradientTape() as tape:
                loss = _per_example_loss(label[None], model(features[None], training=False))[0]
            grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return grads, loss

        if self._one_at_a_time:
            signature = ([tf.TensorSpec(v.shape, v.dtype) for v in variables], tf.TensorSpec([], tf.float32))
            per_example, losses = tf.map_fn(one_example, (x, y), fn_output_signature=signature)
        else:
            per_example, losses = tf.vectorized_map(one_example, (x, y))
        squares = tf.add_n([tf.reduce_sum(tf.reshape(g * g, [tf.shape(g)[0], -1]), axis=1) for g in per_example])
        factors = mask * clip / tf.maximum(clip, tf.sqrt(squares))
        return [tf.tensordot(factors, g, axes=1) for g in per_example], tf.reduce_sum(losses * mask)

    def _run(self, x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        variables = self.model.trainable_variables

        def body(
            i: tf.Tensor, sums: Sequence[tf.Tensor], loss: tf.Tensor
        ) -> tuple[tf.Tensor, list[tf.Tensor], tf.Tensor]:
            grads, chunk_loss = self._clipped_sum(x[i], y[i], mask[i])
            return i + 1, [s + g for s, g in zip(sums, grads, strict=True)], loss + chunk_loss

        start = (tf.constant(0), [tf.zeros_like(v) for v in variables], tf.constant(0.0))
        _, sums, loss = tf.while_loop(lambda i, *_: i < tf.shape(x)[0], body, start)
        for k, (variable, total) in enumerate(zip(variables, sums, strict=True)):
            update = total
            if self._dp is not None:
                assert self._noise is not None
                stddev = self._dp.noise_multiplier * self._dp.l2_norm_clip
                update += self._noise.normal(tf.shape(variable), stddev=stddev, dtype=variable.dtype)
            update /= self._denominator
            if self._anchor:
                update += self._mu * (variable - self._anchor[k])
            if self._velocity:
                update = self._velocity[k].assign(self._momentum * self._velocity[k] + update)
            variable.assign_sub(self._lr * update)
        return loss / tf.maximum(tf.reduce_sum(mask), 1.0)


@dataclass(frozen=True)
class RunSummary:
    """What a local run reveals: its public accounting inputs and the training loss."""

    steps: int
    sampling_probability: float
    last_epoch_loss: float
    path: ClippingPath | None


class DPSGDRun:
    """Local DP-SGD on ``model`` (trained in place) with this run's own secret randomness."""

    def __init__(
        self,
        model: tf.keras.Model,
        *,
        dp: DPParameters | None,
        batch_size: int,
        num_examples: int,
        learning_rate: float,
        proximal_mu: float = 0.0,
        momentum: float = 0.0,
        test_stream: str = "",
    ):
        if proximal_mu < 0:
            raise InvalidRequest("proximal_mu must be at least 0")
        if not 0 <= momentum < 1:
            raise InvalidRequest("momentum must be in [0, 1)")
        self._q = sampling_probability(num_examples, batch_size)
        self._batch_size = batch_size
        self._secrets: RunSecrets | None = draw_run_secrets(test_stream)
        noise = None
        if dp is not None:
            state = np.array(self._secrets.noise_state, dtype=np.uint64).view(np.int64)
            noise = tf.random.Generator.from_state(state, alg=tf.random.Algorithm.PHILOX)
        self._sampler = np.random.Generator(np.random.PCG64(self._secrets.sampling_seed))
        self._secrets = None  # the generators hold all that is needed; drop the seeds now
        self._step = _Step(
            model,
            dp=dp,
            expected_batch_size=self._q * num_examples,
            learning_rate=learning_rate,
            proximal_mu=proximal_mu,
            momentum=momentum,
            noise=noise,
        )

    @property
    def path(self) -> ClippingPath | None:
        """The clipping path (``None`` when training without DP)."""
        return self._step.path

    def tracing_count(self) -> int:
        """How many times the step was traced (once per run, whatever the batch sizes)."""
        return int(self._step.run.experimental_get_tracing_count())

    def poisson_batch(self, num_examples: int) -> NDArray[np.int64]:
        """Indices of one Poisson sample: each row independently with probability q."""
        return np.flatnonzero(self._sampler.random(num_examples) < self._q)

    def step(self, x: NDArray[Any], y: NDArray[Any]) -> float:
        """One step on the given batch (already sampled); returns its mean per-example loss."""
        xs, ys, mask = self._step.pad(x, y)
        return float(self._step.run(tf.constant(xs), tf.constant(ys), tf.constant(mask)))

    def train(self, x: NDArray[Any], y: NDArray[Any], epochs: int) -> RunSummary:
        """``epochs`` x n/batch_size Poisson-sampled steps over (``x``, ``y``)."""
        n = x.shape[0]
        per_epoch = steps_per_epoch(n, self._batch_size)
        losses: list[tuple[float, int]] = []
        for _ in range(epochs):
            losses = []
            for _ in range(per_epoch):
                rows = self.poisson_batch(n)
                losses.append((self.step(x[rows], y[rows]), rows.size))
        seen = sum(count for _, count in losses)
        mean_loss = sum(loss * count for loss, count in losses) / seen if seen else float("nan")
        return RunSummary(
            steps=epochs * per_epoch, sampling_probability=self._q, last_epoch_loss=mean_loss, path=self.path
        )
