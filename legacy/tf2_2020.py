"""Reference (1): the 2020 TensorFlow 2 loss the paper's results came from, step by step.

Frozen: edit only to keep it running. Written for this project from the published description
of the original Keras loss; it reproduces its numerics, including the clipping constants, the
+1e-7 in the denominator, the ``y > 0.1`` target rule and the gradient through ``q``.

The original is a Keras loss on *probabilities* (the model ends in a softmax).
"""

from __future__ import annotations

import tensorflow as tf

EPSILON = 1e-7  # Keras' backend epsilon, used by the clip and by the KL divergence


def credal_target(y_true: tf.Tensor, y_pred: tf.Tensor, alpha: float) -> tf.Tensor:
    """The original's target q: ``1 - alpha`` where ``y > 0.1``, else ``alpha·p/(s + 1e-7)``."""
    y_pred = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
    y_pred = tf.clip_by_value(y_pred, EPSILON, 1.0 - EPSILON)
    non_target_mass = tf.reduce_sum((1.0 - y_true) * y_pred, axis=-1, keepdims=True)
    relaxed = alpha * y_pred / (non_target_mass + EPSILON)
    return tf.where(y_true > 0.1, (1.0 - alpha) * tf.ones_like(y_pred), relaxed)


def keras_kl_divergence(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
    """Keras' KL divergence: both arguments clipped to ``[1e-7, 1]``, summed over classes."""
    y_true = tf.clip_by_value(y_true, EPSILON, 1.0)
    y_pred = tf.clip_by_value(y_pred, EPSILON, 1.0)
    return tf.reduce_sum(y_true * tf.math.log(y_true / y_pred), axis=-1)


def per_sample_loss(y_true: tf.Tensor, y_pred: tf.Tensor, alpha: float) -> tf.Tensor:
    """The original loss of each sample; no stop-gradient anywhere."""
    y_pred = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
    y_pred = tf.clip_by_value(y_pred, EPSILON, 1.0 - EPSILON)
    q = credal_target(y_true, y_pred, alpha)
    divergence = keras_kl_divergence(q, y_pred)
    target_probability = tf.reduce_sum(y_pred * y_true, axis=-1)
    inside = target_probability >= 1.0 - alpha
    return tf.where(inside, tf.zeros_like(divergence), divergence)


def loss(y_true: tf.Tensor, y_pred: tf.Tensor, alpha: float) -> tf.Tensor:
    """Mean over the batch, as Keras' default reduction."""
    return tf.reduce_mean(per_sample_loss(y_true, y_pred, alpha))


def loss_and_logit_gradient(
    logits: tf.Tensor, y_true: tf.Tensor, alpha: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch loss of ``softmax(logits)`` and its gradient with respect to the logits."""
    logits = tf.convert_to_tensor(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        value = loss(y_true, tf.nn.softmax(logits, axis=-1), alpha)
    return value, tape.gradient(value, logits)
