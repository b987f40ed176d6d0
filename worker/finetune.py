"""Fine-tuning from the source checkpoint, with four strategies.

- `head`: the base (normalisation and hidden layers) stays frozen; only the output layer learns.
- `full`: every layer learns, with a small learning rate.
- `l2sp`: every layer learns, and a penalty `l2sp_weight * ||w - w_source||^2` on the base pulls it
  toward the source weights (L2-SP, Li et al. 2018), so little target data cannot drag it far.
- `calibrate`: nothing is learnt but one scale of the source's output logits and one offset per class
  (temperature and class-rate recalibration), fitted by Newton's method: the source's ranking is kept.
Every run starts from the source weights, never from the current champion, so errors do not compound.

A gradient run stops early: a random `validation_share` of its examples is kept aside, and training ends once
the loss on it has not improved for `patience` epochs, with the weights of its best epoch. The right
number of steps differs by an order of magnitude between a thousand examples just after a drift and a
full window, and a fixed epoch count undertrains the one or overfits the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Strategy = Literal["head", "full", "l2sp", "calibrate"]
STRATEGIES: tuple[Strategy, ...] = ("head", "full", "l2sp", "calibrate")
MIN_VALIDATION_ROWS = 50  # fewer held-out rows judge an epoch by noise: train all epochs on everything


class FineTuneError(RuntimeError):
    """The run produced no usable model (non-finite loss, divergence)."""


@dataclass(frozen=True)
class FineTuneConfig:
    strategy: Strategy = "l2sp"
    epochs: int = 30  # at most; early stopping usually ends a run sooner
    patience: int = 3  # epochs without a better validation loss before the run stops
    validation_share: float = 0.15  # random share of the examples kept aside for early stopping
    batch_size: int = 256
    learning_rate: float = 1e-3  # head and l2sp; `full` uses a tenth of it
    l2sp_weight: float = 1e-3
    seed: int = 0
    from_scratch: bool = False  # start from fresh random weights (same architecture): the no-transfer baseline


def fine_tune(source_model, features: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray,
              task: str, config: FineTuneConfig) -> list[np.ndarray]:
    """Weights of a copy of `source_model` fine-tuned on the examples. `source_model` is not changed."""
    import tensorflow as tf

    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown fine-tune strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(labels) == 0:
        raise FineTuneError("no training examples")
    if config.strategy == "calibrate":
        if config.from_scratch:
            raise ValueError("calibrate refits the source's output layer: it has no from-scratch form")
        return calibrate(source_model, features, labels, sample_weights, task)
    tf.keras.utils.set_random_seed(config.seed)
    model = tf.keras.models.clone_model(source_model)  # a clone has freshly initialised weights
    if not config.from_scratch:
        model.set_weights(source_model.get_weights())
    for layer in model.layers:
        layer.trainable = config.strategy != "head" or layer.name == "head"
    base_pairs = [(w, tf.constant(w.numpy())) for layer in model.layers if layer.name.startswith("base_dense")
                  for w in layer.trainable_weights] if config.strategy == "l2sp" and not config.from_scratch else []
    learning_rate = config.learning_rate / 10 if config.strategy == "full" and not config.from_scratch else config.learning_rate
    optimizer = tf.keras.optimizers.Adam(learning_rate)
    binary = task == "repurchase"
    loss_fn = (tf.keras.losses.BinaryCrossentropy(reduction="none") if binary
               else tf.keras.losses.SparseCategoricalCrossentropy(reduction="none"))
    variables = model.trainable_variables
    penalty_weight = tf.constant(config.l2sp_weight, tf.float32)

    @tf.function(reduce_retracing=True)
    def step(x, y, w):
        with tf.GradientTape() as tape:
            predicted = model(x, training=True)
            data_loss = tf.reduce_sum(loss_fn(y, predicted) * w) / tf.reduce_sum(w)
            penalty = tf.add_n([tf.reduce_sum(tf.square(v - v0)) for v, v0 in base_pairs]) if base_pairs else 0.0
            loss = data_loss + penalty_weight * penalty
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return data_loss

    @tf.function(reduce_retracing=True)
    def validation_loss(x, y, w):
        return tf.reduce_sum(loss_fn(y, model(x, training=False)) * w) / tf.reduce_sum(w)

    y = labels.astype(np.float32).reshape(-1, 1) if binary else labels.astype(np.int64)
    x, w = features.astype(np.float32), sample_weights.astype(np.float32)
    train, held = _validation_split(len(labels), config.validation_share, config.seed)
    dataset = tf.data.Dataset.from_tensor_slices((x[train], y[train], w[train]))
    dataset = dataset.shuffle(len(train), seed=config.seed).batch(config.batch_size)
    held_x, held_y, held_w = (tf.constant(a[held]) for a in (x, y, w))
    first_epoch_loss, best_loss, best_weights, stale = None, np.inf, None, 0
    for _ in range(config.epochs):
        epoch_loss = float(np.mean([float(step(xb, yb, wb)) for xb, yb, wb in dataset]))
        if not np.isfinite(epoch_loss):
            raise FineTuneError("training loss became non-finite")
        first_epoch_loss = epoch_loss if first_epoch_loss is None else first_epoch_loss
        if epoch_loss > 3.0 * first_epoch_loss:
            raise FineTuneError(f"training diverged (loss {first_epoch_loss:.3f} -> {epoch_loss:.3f})")
        if len(held) == 0:
            continue  # nothing to judge epochs by: the last one's weights
        loss = float(validation_loss(held_x, held_y, held_w))
        if loss < best_loss:
            best_loss, best_weights, stale = loss, model.get_weights(), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    weights = best_weights if best_weights is not None else model.get_weights()
    if not all(np.all(np.isfinite(w)) for w in weights):
        raise FineTuneError("fine-tuned weights are not finite")
    return weights


def _validation_split(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): a random `share` of n rows, none when too few to judge by.

    Random rather than the newest rows: the gate already judges on the newest examples, and just after a
    drift the newest examples are the ones a candidate most needs to learn from.
    """
    held = int(n * share)
    if held < MIN_VALIDATION_ROWS:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


CALIBRATION_RIDGE = 1.0  # pull of the scale toward 1 and of the offsets toward 0, worth about one example
CALIBRATION_MAX_STEPS = 25  # Newton steps; a handful usually converge


def calibrate(source_model, features: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray,
              task: str) -> list[np.ndarray]:
    """The source's weights with only its output recalibrated: its logits z become scale * z + offsets (one
    scale, one offset per class), fitted by Newton's method to the weighted log-loss. The ranking the source
    learnt within each class is kept; only its confidence and its class rates move, so a few hundred
    examples cannot overfit it. A sigmoid head is the two-class case with logits (0, z)."""
    import tensorflow as tf

    head = source_model.get_layer("head")
    hidden = tf.keras.Model(source_model.inputs, head.input).predict(features.astype(np.float32), verbose=0,
                                                                       batch_size=4096).astype(np.float64)
    kernel, bias = (w.astype(np.float64) for w in head.get_weights())
    z = hidden @ kernel + bias
    binary = task == "repurchase"
    if binary:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    n_classes = z.shape[1]
    y = np.eye(n_classes)[labels]
    w = sample_weights.astype(np.float64)[:, None]
    theta = np.concatenate([[1.0], np.zeros(n_classes)])  # scale, then the offsets; the ridge pulls toward this
    identity = theta.copy()
    for _ in range(CALIBRATION_MAX_STEPS):
        logits = theta[0] * z + theta[1:]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        gradient = np.concatenate([[np.sum(w * (p - y) * z)], np.sum(w * (p - y), axis=0)])
        pz = np.sum(p * z, axis=1, keepdims=True)  # each row's expected logit
        hessian = np.empty((n_classes + 1, n_classes + 1))
        hessian[0, 0] = np.sum(w * (p * z * z)) - np.sum(w * pz * pz)
        hessian[0, 1:] = hessian[1:, 0] = np.sum(w * p * (z - pz), axis=0)
        hessian[1:, 1:] = np.diag(np.sum(w * p, axis=0)) - (w * p).T @ p
        step = np.linalg.solve(hessian + CALIBRATION_RIDGE * np.eye(n_classes + 1),
                               gradient + CALIBRATION_RIDGE * (theta - identity))
        theta -= step
        if not np.all(np.isfinite(theta)):
            raise FineTuneError("calibration did not converge")
        if np.max(np.abs(step)) < 1e-7:
            break
    scale, offsets = theta[0], theta[1:]
    weights = source_model.get_weights()
    new_bias = scale * bias + (offsets[1] - offsets[0] if binary else offsets)
    weights[-2:] = [(scale * kernel).astype(np.float32), np.asarray(new_bias, np.float32).reshape(bias.shape)]
    return weights
