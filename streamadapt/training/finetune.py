"""Fine-tuning from the source checkpoint, with four strategies.

- `head`: only the head learns: the layers with weights nearest the output (`head_layers`); the rest stays
  frozen.
- `full`: every layer learns, with a small learning rate.
- `l2sp`: every layer learns, and a penalty `l2sp_weight * ||w - w_source||^2` on everything but the head
  pulls it toward the source weights (L2-SP, Li et al. 2018), so little target data cannot drag it far.
- `calibrate`: no weight changes; the round only fits a calibration (streamadapt.core.calibration) to the source.
Every run starts from the source weights, never from the current champion, so errors do not compound.
Any Keras functional model works: the strategies need nothing of its layers but which are nearest the output.

A gradient run stops early: a random `validation_share` of its examples is kept aside, and training ends once
the loss on it has not improved for `patience` epochs, with the weights of its best epoch. The right
number of steps differs by an order of magnitude between a thousand examples just after a drift and a
full window, and a fixed epoch count undertrains the one or overfits the other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamadapt.model.checkpoint import import_tensorflow
from streamadapt.model.graph import input_names
from streamadapt.settings import STRATEGIES, Strategy

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
    """Weights of a copy of `source_model` fine-tuned on the examples. `source_model` is not changed.
    `calibrate` returns the source's weights (its calibration is fitted by the caller)."""
    tf = import_tensorflow()

    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown fine-tune strategy {config.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if len(labels) == 0:
        raise FineTuneError("no training examples")
    if config.strategy == "calibrate":
        if config.from_scratch:
            raise ValueError("calibrate keeps the source's weights: it has no from-scratch form")
        return source_model.get_weights()
    tf.keras.utils.set_random_seed(config.seed)
    model = tf.keras.models.clone_model(source_model)  # a clone has freshly initialised weights
    if not config.from_scratch:
        model.set_weights(source_model.get_weights())
    head = set(head_layers(model))
    for layer in model.layers:
        layer.trainable = config.strategy != "head" or layer.name in head
    base_pairs = [(w, tf.constant(w.numpy())) for layer in model.layers if layer.name not in head
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


def head_layers(model) -> list[str]:
    """The names of the layers with weights nearest the model's output: walking back from the output through
    layers without weights (activations, merges, reshapes), the first layers with weights met on every path.
    For a dense network, its last dense layer; for one whose logits add two branches, the last layer of each."""
    config = model.get_config()
    inbound = {layer["name"]: _inbound_names(layer) for layer in config["layers"]}
    with_weights = {layer.name for layer in model.layers if layer.weights}
    outputs = config["output_layers"]
    frontier = [outputs[0]] if isinstance(outputs[0], str) else [o[0] for o in outputs]
    heads, seen = [], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in with_weights:
            heads.append(name)
        else:
            frontier.extend(inbound.get(name, ()))
    if not heads:
        raise ValueError(f"model {model.name} has no layer with weights")
    return heads


def _inbound_names(layer: dict) -> list[str]:
    return [name for call in layer.get("inbound_nodes", []) for name in input_names(call.get("args", []))]


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
