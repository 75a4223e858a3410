"""A custom model builder, imported by path the way a job's ``custom`` spec names one."""

from __future__ import annotations

import tensorflow as tf


def tiny(input_shape: tuple[int, ...], num_classes: int, units: int = 4) -> tf.keras.Model:
    """Flatten, one hidden Dense layer of ``units``, logits."""
    inputs = tf.keras.layers.Input(input_shape)
    hidden = tf.keras.layers.Dense(units, activation="relu")(tf.keras.layers.Flatten()(inputs))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(num_classes)(hidden))


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    """Returns something that is not a Keras model."""
    return f"{input_shape} {num_classes}"
