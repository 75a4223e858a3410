"""The layers fast gradient clipping covers: tensorflow-privacy's (Dense, Embedding) and Conv2D.

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import (
    LayerRegistry,
    make_default_layer_registry,
)


def conv2d_supported(layer: tf.keras.layers.Layer) -> bool:
    """Whether ``conv2d_layer_computation`` handles this Conv2D's configuration."""
    return bool(layer.data_format == "channels_last" and layer.groups == 1)


def conv2d_layer_computation(
    layer: tf.keras.layers.Conv2D,
    input_args: Sequence[Any],
    input_kwargs: Mapping[str, Any],
    tape: tf.GradientTape,
    num_microbatches: Any = None,
) -> tuple[tf.Tensor, tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
    """Registry function for ``tf.keras.layers.Conv2D`` (module docstring)."""
    if input_kwargs or len(input_args) != 1 or num_microbatches is not None or not conv2d_supported(layer):
        raise NotImplementedError(f"fast clipping does not cover this call of {layer.name}")
    inputs = input_args[0]
    activation = layer.activation
    layer.activation = None
    pre_activation = layer(inputs)
    tape.watch(pre_activation)
    layer.activation = activation
    outputs = activation(pre_activation) if activation is not None else pre_activation
    height, width = layer.kernel_size

    def squared_norms(grads: tf.Tensor) -> tf.Tensor:
        patches = tf.image.extract_patches(
            inputs,
            sizes=[1, height, width, 1],
            strides=[1, *layer.strides, 1],
            rates=[1, *layer.dilation_rate, 1],
            padding=layer.padding.upper(),
        )
        batch = tf.shape(patches)[0]
        patches = tf.reshape(patches, [batch, -1, patches.shape[-1]])
        grads = tf.reshape(grads, [batch, -1, grads.shape[-1]])
        kernel = tf.einsum("bpk,bpo->bko", patches, grads)
        norms = tf.reduce_sum(tf.square(kernel), axis=[1, 2])
        if layer.use_bias:
            norms += tf.reduce_sum(tf.square(tf.reduce_sum(grads, axis=1)), axis=1)
        return norms

    return pre_activation, outputs, squared_norms


def fast_clipping_registry() -> LayerRegistry:
    """tensorflow-privacy's default registry plus Conv2D."""
    registry = make_default_layer_registry()
    registry.insert(tf.keras.layers.Conv2D, conv2d_layer_computation)
    return registry
