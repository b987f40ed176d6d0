"""Your own network: `streamadapt pretrain --model-builder MODULE:FUNCTION`.

FUNCTION(n_features: int, n_outputs: int, task: str) returns an uncompiled Keras 3 model built from Keras' own
layers, sequential or functional, that maps the feature vector to class probabilities: one sigmoid unit for
`repurchase`, a softmax over the classes for `next_category`. MODULE is imported from the working directory
or PYTHONPATH. The model is checked before any training, so that a network the worker could not serve stops
`pretrain` with one line instead of a checkpoint that fails later. A layer the worker's NumPy pass does not
compute is served through TensorFlow instead, and `pretrain` says so.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from streamadapt.core.labels import Task
from streamadapt.core.named import import_named
from streamadapt.model.checkpoint import (
    CheckpointError,
    import_tensorflow,
    plan_of_keras,
)

log = logging.getLogger(__name__)

BuilderFunction = Callable[..., Any]  # (n_features, n_outputs, task) -> an uncompiled keras.Model


class ModelBuilderError(ValueError):
    """A --model-builder that cannot be used, worded for the user in one line."""


def load_builder(reference: str) -> BuilderFunction:
    """The function named by "MODULE:FUNCTION", imported with the working directory on the path."""
    import_tensorflow()  # first, so that the builder's own `import keras` loads it with its banners silenced
    function = import_named(reference, "--model-builder", "MODULE:FUNCTION", ModelBuilderError)
    if not callable(function):
        module_name, _, function_name = reference.partition(":")
        raise ModelBuilderError(f"--model-builder {reference}: {module_name} has no function {function_name}")
    return function


def build(function: BuilderFunction, reference: str, *, n_features: int, n_outputs: int, task: Task):
    """Call the builder and check what it returns: a Keras model of `n_features` inputs and `n_outputs`
    probabilities, as a functional model (a Sequential one is rebuilt as one, sharing its layers)."""
    keras = _keras()
    model = function(n_features=n_features, n_outputs=n_outputs, task=task)
    if not isinstance(model, keras.Model):
        raise ModelBuilderError(f"--model-builder {reference} returned {type(model).__name__}, not a keras.Model")
    if isinstance(model, keras.Sequential):
        model = functional(model, n_features)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ModelBuilderError(f"--model-builder {reference}: the model must have one input and one output, not "
                                f"{len(model.inputs)} and {len(model.outputs)}")
    if tuple(model.input_shape[1:]) != (n_features,) or tuple(model.output_shape[1:]) != (n_outputs,):
        raise ModelBuilderError(f"--model-builder {reference}: the model maps {model.input_shape[1:]} to "
                                f"{model.output_shape[1:]}; it must map ({n_features},) features to ({n_outputs},) "
                                f"{'probability' if n_outputs == 1 else 'class probabilities'}")
    _check_probabilities(model, reference, n_features, n_outputs)
    try:
        plan_of_keras(model)
    except CheckpointError as error:
        log.warning("--model-builder %s: the worker will serve this model through TensorFlow, slower than its "
                    "NumPy pass (%s)", reference, error)
    return model


def functional(model, n_features: int):
    """A Sequential model as a functional one over the same layers (the same weights)."""
    keras = _keras()
    inputs = keras.Input(shape=(n_features,), name="features", dtype="float32")
    tensor = inputs
    for layer in model.layers:
        tensor = layer(tensor)
    return keras.Model(inputs, tensor, name=model.name)


def _check_probabilities(model, reference: str, n_features: int, n_outputs: int) -> None:
    """A sigmoid unit, or a softmax: outputs in [0, 1] that (for several classes) sum to 1, on varied inputs."""
    probe = np.random.default_rng(0).normal(0.0, 3.0, size=(64, n_features)).astype(np.float32)
    out = np.asarray(model(probe, training=False))
    in_range = np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
    sums_to_one = n_outputs == 1 or np.allclose(out.sum(axis=1), 1.0, atol=1e-4)
    if not (in_range and sums_to_one):
        raise ModelBuilderError(f"--model-builder {reference}: the model's outputs are not probabilities (end it "
                                f"with {'a sigmoid unit' if n_outputs == 1 else 'a softmax over the classes'})")


def _keras():
    return import_tensorflow().keras
