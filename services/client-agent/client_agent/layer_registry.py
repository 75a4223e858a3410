"""The layers fast gradient clipping covers: tensorflow-privacy's (Dense, Embedding), Conv2D,
DepthwiseConv2D and BatchNormalization in inference mode.

A registry function runs its layer without the activation, so the tape can hand back the
gradient G of the summed loss with respect to the pre-activations, and returns a function of
G giving each example's squared gradient norm for the layer's variables.

Conv2D (channels last, ``groups == 1``): with P the example's input patches (one row per
output position, ``tf.image.extract_patches`` with the layer's window, strides, dilation and
padding) and G its output gradients (one row per position), the kernel gradient is P'G, a
k·k·C_in x C_out matrix, and the bias gradient the column sums of G. Materialising P'G per
example costs batch x k·k·C_in x C_out values, as much as the kernel itself per example and far
less than vectorising the whole backward pass; its squared Frobenius norm plus that of the
bias gradient is the example's squared norm. (The order of the patch features does not
change the norm.)

DepthwiseConv2D (channels last, depth multiplier m): each input channel c has its own k·k x m
kernel, and output channel c·m + j sees only channel c, so with the patches split by channel
(k·k features each; ``extract_patches`` orders a patch's features row, column, channel) the
kernel gradient of channel c is P_c'G_c, and the per-example gradient (k·k·C·m values, the size
of the kernel) is one einsum. The bias gradient is again the column sums of G.

BatchNormalization: DP-SGD runs it in inference mode (``client_agent.dp_sgd``), where it is the
per-channel affine map y = γ·x̂ + β with x̂ = (x − moving mean) / sqrt(moving variance + ε)
fixed. The example's gradients are Σ G·x̂ for γ and Σ G for β, summed over every position.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import (
    LayerRegistry,
    make_default_layer_registry,
)


def _without_activation(
    layer: tf.keras.layers.Layer, inputs: tf.Tensor, tape: tf.GradientTape
) -> tuple[tf.Tensor, tf.Tensor]:
    """The layer's pre-activations (watched by ``tape``) and its outputs."""
    activation = layer.activation
    layer.activation = None
    pre_activation = layer(inputs)
    tape.watch(pre_activation)
    layer.activation = activation
    outputs = activation(pre_activation) if activation is not None else pre_activation
    return pre_activation, outputs


def _patches(layer: tf.keras.layers.Layer, inputs: tf.Tensor) -> tf.Tensor:
    """Each example's input patches under the layer's window: [batch, positions, k·k·C_in]."""
    height, width = layer.kernel_size
    patches = tf.image.extract_patches(
        inputs,
        sizes=[1, height, width, 1],
        strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1],
        padding=layer.padding.upper(),
    )
    return tf.reshape(patches, [tf.shape(patches)[0], -1, patches.shape[-1]])


def _bias_norms(layer: tf.keras.layers.Layer, grads: tf.Tensor) -> tf.Tensor:
    """Each example's squared bias-gradient norm from its output gradients [batch, positions, C_out]."""
    if not layer.use_bias:
        return tf.zeros([tf.shape(grads)[0]], dtype=grads.dtype)
    return tf.reduce_sum(tf.square(tf.reduce_sum(grads, axis=1)), axis=1)


def _check_call(
    layer: tf.keras.layers.Layer, input_args: Sequence[Any], input_kwargs: Mapping[str, Any], num_microbatches: Any
) -> tf.Tensor:
    if input_kwargs or len(input_args) != 1 or num_microbatches is not None or not layer_supported(layer):
        raise NotImplementedError(f"fast clipping does not cover this call of {layer.name}")
    return input_args[0]


RegistryFunction = Callable[..., tuple[tf.Tensor, tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]]


def _convolution(kernel_norms: Callable[[Any, tf.Tensor, tf.Tensor], tf.Tensor]) -> RegistryFunction:
    """A registry function for a convolution whose per-example squared kernel-gradient norms
    ``kernel_norms(layer, patches, grads)`` gives from patches [batch, positions, k·k·C_in] and
    output gradients [batch, positions, C_out] (module docstring)."""

    def computation(
        layer: tf.keras.layers.Layer,
        input_args: Sequence[Any],
        input_kwargs: Mapping[str, Any],
        tape: tf.GradientTape,
        num_microbatches: Any = None,
    ) -> tuple[tf.Tensor, tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
        inputs = _check_call(layer, input_args, input_kwargs, num_microbatches)
        pre_activation, outputs = _without_activation(layer, inputs, tape)

        def squared_norms(grads: tf.Tensor) -> tf.Tensor:
            patches = _patches(layer, inputs)
            grads = tf.reshape(grads, [tf.shape(patches)[0], -1, grads.shape[-1]])
            return kernel_norms(layer, patches, grads) + _bias_norms(layer, grads)

        return pre_activation, outputs, squared_norms

    return computation


def _conv2d_kernel_norms(layer: tf.keras.layers.Conv2D, patches: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    kernel = tf.einsum("bpk,bpo->bko", patches, grads)
    return tf.reduce_sum(tf.square(kernel), axis=[1, 2])


def _depthwise_kernel_norms(layer: tf.keras.layers.DepthwiseConv2D, patches: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
    multiplier = layer.depth_multiplier
    channels = grads.shape[-1] // multiplier
    batch, positions = tf.shape(patches)[0], tf.shape(patches)[1]
    by_channel = tf.reshape(patches, [batch, positions, -1, channels])
    kernel = tf.einsum("bpkc,bpcm->bkcm", by_channel, tf.reshape(grads, [batch, positions, channels, multiplier]))
    return tf.reduce_sum(tf.square(kernel), axis=[1, 2, 3])


conv2d_layer_computation = _convolution(_conv2d_kernel_norms)
"""Registry function for ``tf.keras.layers.Conv2D``."""

depthwise_conv2d_layer_computation = _convolution(_depthwise_kernel_norms)
"""Registry function for ``tf.keras.layers.DepthwiseConv2D``."""


def batch_normalization_layer_computation(
    layer: tf.keras.layers.BatchNormalization,
    input_args: Sequence[Any],
    input_kwargs: Mapping[str, Any],
    tape: tf.GradientTape,
    num_microbatches: Any = None,
) -> tuple[tf.Tensor, tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """Registry function for ``tf.keras.layers.BatchNormalization`` in inference mode (module docstring)."""
    if set(input_kwargs) - {"training"} or input_kwargs.get("training"):
        raise NotImplementedError(f"fast clipping covers {layer.name} only in inference mode")
    inputs = _check_call(layer, input_args, {}, num_microbatches)
    outputs = layer(inputs, training=False)
    tape.watch(outputs)
    positions = list(range(1, len(inputs.shape) - 1))

    def squared_norms(grads: tf.Tensor) -> tf.Tensor:
        norms = tf.zeros([tf.shape(grads)[0]], dtype=grads.dtype)
        if layer.scale:
            normalised = (inputs - layer.moving_mean) * tf.math.rsqrt(layer.moving_variance + layer.epsilon)
            norms += tf.reduce_sum(tf.square(tf.reduce_sum(grads * normalised, axis=positions)), axis=1)
        if layer.center:
            norms += tf.reduce_sum(tf.square(tf.reduce_sum(grads, axis=positions)), axis=1)
        return norms

    return outputs, outputs, squared_norms


def layer_supported(layer: tf.keras.layers.Layer) -> bool:
    """Whether this layer's configuration is one its registry function handles (others: vectorised path)."""
    if type(layer) is tf.keras.layers.Conv2D:
        return bool(layer.data_format == "channels_last" and layer.groups == 1)
    if type(layer) is tf.keras.layers.DepthwiseConv2D:
        return bool(layer.data_format == "channels_last")
    if type(layer) is tf.keras.layers.BatchNormalization:
        # One statistic per channel on the last axis (a built layer's axes are non-negative).
        spec = layer.input_spec
        last_axis = spec is not None and spec.ndim is not None and list(layer.axis) == [spec.ndim - 1]
        return bool(last_axis and not layer.renorm and layer.virtual_batch_size is None)
    return True


def fast_clipping_registry() -> LayerRegistry:
    """tensorflow-privacy's default registry plus Conv2D, DepthwiseConv2D and BatchNormalization."""
    registry = make_default_layer_registry()
    registry.insert(tf.keras.layers.Conv2D, conv2d_layer_computation)
    registry.insert(tf.keras.layers.DepthwiseConv2D, depthwise_conv2d_layer_computation)
    registry.insert(tf.keras.layers.BatchNormalization, batch_normalization_layer_computation)
    return registry
