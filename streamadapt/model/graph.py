"""A Keras functional model's forward pass in NumPy, read from its saved config: serving without TensorFlow.

`Graph.of(layers)` plans the pass from the layer configs Keras writes into `model.keras` (and returns from
`model.get_config()["layers"]`); `graph.forward(x, weights)` runs it with the weights in the order of
`model.get_weights()`. It covers the layers a feature network is made of: dense and 1x1-convolution layers,
the normalisations, residual and concatenating merges, reshapes and slices, activations, and dropout and
noise layers (identities at inference). A network with any other layer raises UnsupportedLayer naming it.

The pass computes in float64, so that a row's result does not depend on the batch it came in (BLAS blocks
float32 products differently by shape, which moves the sixth digit).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


class UnsupportedLayer(ValueError):
    """A layer the NumPy pass cannot compute; the message names it."""


def _relu(x): return np.maximum(x, 0.0)
def _sigmoid(x): return 0.5 * (1.0 + np.tanh(0.5 * x))  # noqa: E704 (overflow-free)
def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
def _linear(x): return x  # noqa: E704
def _elu(x, alpha=1.0): return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0)))  # noqa: E704
def _selu(x): return 1.0507009873554805 * _elu(x, 1.6732632423543772)  # noqa: E704
def _softplus(x): return np.logaddexp(0.0, x)  # noqa: E704
def _swish(x): return x * _sigmoid(x)  # noqa: E704
def _gelu(x):  # Keras' default (approximate=False): the exact form, by erf
    from math import erf, sqrt
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": _relu, "sigmoid": _sigmoid, "softmax": _softmax, "linear": _linear, "tanh": np.tanh, "elu": _elu,
    "selu": _selu, "softplus": _softplus, "softsign": lambda x: x / (1.0 + np.abs(x)), "swish": _swish,
    "silu": _swish, "gelu": _gelu, "relu6": lambda x: np.clip(x, 0.0, 6.0), "exponential": np.exp,
    "leaky_relu": lambda x: np.where(x > 0, x, 0.2 * x), "log_softmax": lambda x: np.log(_softmax(x)),
}
IDENTITIES = frozenset({"Dropout", "AlphaDropout", "GaussianDropout", "GaussianNoise", "SpatialDropout1D",
                        "ActivityRegularization", "InputLayer"})
MERGES: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "Add": lambda xs: sum(xs[1:], xs[0]), "Subtract": lambda xs: xs[0] - xs[1],
    "Multiply": lambda xs: np.prod(np.stack(xs), axis=0), "Average": lambda xs: np.mean(np.stack(xs), axis=0),
    "Maximum": lambda xs: np.max(np.stack(xs), axis=0), "Minimum": lambda xs: np.min(np.stack(xs), axis=0),
}


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    inputs: tuple[str, ...]  # names of the layers whose outputs it takes, in order
    weights: slice  # its variables among the model's weights
    run: Callable[[list[np.ndarray], list[np.ndarray]], np.ndarray]  # (inputs, its weights) -> output


@dataclass(frozen=True)
class Graph:
    nodes: tuple[Node, ...]
    output: str
    weight_count: int
    plan: tuple  # what `of` was given: pickling sends it, and the receiver plans the pass again

    def __reduce__(self):
        return Graph.of, self.plan

    @classmethod
    def of(cls, layers: Sequence[dict], variable_counts: dict[str, int], output: str) -> Graph:
        """Plan the pass of a functional model: its layer configs in model order, how many variables each
        layer holds (by name), and the name of the output layer. Raises UnsupportedLayer."""
        nodes, offset = [], 0
        for layer in layers:
            kind, config, name = layer["class_name"], layer.get("config", {}), layer.get("name") or layer["config"]["name"]
            count = variable_counts.get(name, 0)
            calls = layer.get("inbound_nodes", [])
            if len(calls) > 1:
                raise UnsupportedLayer(f"layer {name} ({kind}) is called more than once (a shared layer)")
            args = calls[0]["args"] if calls else []
            nodes.append(Node(name, kind, input_names(args), slice(offset, offset + count),
                              _operation(kind, config, args, count, name)))
            offset += count
        return cls(tuple(nodes), output, offset, (list(layers), dict(variable_counts), output))

    def forward(self, x: np.ndarray, weights: Sequence[np.ndarray]) -> np.ndarray:
        values: dict[str, np.ndarray] = {}
        for node in self.nodes:
            inputs = [values[name] for name in node.inputs] if node.inputs else [x]
            values[node.name] = node.run(inputs, list(weights[node.weights]))
        return values[self.output]


def input_names(args: list) -> tuple[str, ...]:
    """The layer names of the Keras tensors among a call's arguments (a tensor, or a list of them first)."""
    if not args:
        return ()
    first = args[0] if isinstance(args[0], list) else [args[0]]
    return tuple(t["config"]["keras_history"][0] for t in first if isinstance(t, dict) and t.get("class_name") == "__keras_tensor__")


def _activation(config: dict, name: str, kind: str) -> Callable:
    activation = config.get("activation", "linear")
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name") or activation.get("class_name")
    if activation not in ACTIVATIONS:
        raise UnsupportedLayer(f"layer {name} ({kind}) has activation {activation!r}")
    return ACTIVATIONS[activation]


def _ints(value) -> list:
    """A Keras size argument, an int or a list or tuple of them, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _last_axis_only(config: dict, name: str, kind: str) -> None:
    axis = config.get("axis", -1)
    if _ints(axis) != [-1]:
        raise UnsupportedLayer(f"layer {name} ({kind}) normalises over axis {axis}, not the last")


def _operation(kind: str, config: dict, args: list, count: int, name: str) -> Callable:
    if kind in IDENTITIES:
        return lambda xs, w: xs[0]
    if kind in ("Dense", "Conv1D"):
        if kind == "Conv1D" and (_ints(config.get("kernel_size")) != [1] or _ints(config.get("strides", 1)) != [1]
                                 or config.get("groups", 1) != 1 or config.get("data_format") != "channels_last"):
            raise UnsupportedLayer(f"layer {name} (Conv1D) is not a 1x1 convolution over channels_last")
        activation = _activation(config, name, kind)

        def dense(xs, w):
            kernel = w[0][0] if kind == "Conv1D" else w[0]
            y = xs[0] @ kernel
            return activation(y + w[1] if len(w) > 1 else y)
        return dense
    if kind == "Activation":
        activation = _activation(config, name, kind)
        return lambda xs, w: activation(xs[0])
    if kind == "ReLU" and not config.get("threshold") and config.get("max_value") is None:
        slope = config.get("negative_slope", 0.0)
        return lambda xs, w: np.where(xs[0] > 0, xs[0], slope * xs[0])
    if kind == "LeakyReLU":
        slope = config.get("negative_slope", config.get("alpha", 0.3))
        return lambda xs, w: np.where(xs[0] > 0, xs[0], slope * xs[0])
    if kind == "Softmax":
        _last_axis_only(config, name, kind)
        return lambda xs, w: _softmax(xs[0])
    if kind == "Normalization":
        _last_axis_only(config, name, kind)
        if config.get("invert"):
            raise UnsupportedLayer(f"layer {name} (Normalization) inverts")
        if config.get("mean") is not None:
            mean, variance = np.asarray(config["mean"], np.float64), np.asarray(config["variance"], np.float64)
            scale = np.maximum(np.sqrt(variance), 1e-7)  # Keras divides by max(sqrt(variance), epsilon)
            return lambda xs, w: (xs[0] - mean) / scale
        return lambda xs, w: (xs[0] - w[0]) / np.maximum(np.sqrt(w[1]), 1e-7)  # adapt()ed: mean, variance, count
    if kind == "BatchNormalization":
        _last_axis_only(config, name, kind)
        epsilon, center, scale = config.get("epsilon", 1e-3), config.get("center", True), config.get("scale", True)

        def batch_norm(xs, w):
            w = list(w)
            gamma = w.pop(0) if scale else 1.0
            beta = w.pop(0) if center else 0.0
            moving_mean, moving_variance = w
            return (xs[0] - moving_mean) / np.sqrt(moving_variance + epsilon) * gamma + beta
        return batch_norm
    if kind == "LayerNormalization":
        _last_axis_only(config, name, kind)
        if config.get("rms_scaling"):
            raise UnsupportedLayer(f"layer {name} (LayerNormalization) uses RMS scaling")
        epsilon, center, scale = config.get("epsilon", 1e-3), config.get("center", True), config.get("scale", True)

        def layer_norm(xs, w):
            w = list(w)
            x = xs[0]
            y = (x - x.mean(axis=-1, keepdims=True)) / np.sqrt(x.var(axis=-1, keepdims=True) + epsilon)
            y = y * w.pop(0) if scale else y
            return y + w.pop(0) if center else y
        return layer_norm
    if kind in MERGES:
        merge = MERGES[kind]
        return lambda xs, w: merge(xs)
    if kind == "Concatenate":
        axis = config.get("axis", -1)
        return lambda xs, w: np.concatenate(xs, axis=axis)
    if kind == "Reshape":
        target = tuple(config["target_shape"])
        return lambda xs, w: xs[0].reshape((len(xs[0]), *target))
    if kind == "Flatten":
        return lambda xs, w: xs[0].reshape(len(xs[0]), -1)
    if kind == "GetItem":
        key = _index(args[1] if len(args) > 1 else None, name)
        return lambda xs, w: xs[0][key]
    raise UnsupportedLayer(f"layer {name} ({kind}) cannot be computed without TensorFlow")


def _index(spec: Any, name: str) -> tuple:
    """A GetItem's index as Keras serialises it: a slice, an int, or a list of them."""
    parts = spec if isinstance(spec, list) else [spec]
    key = []
    for part in parts:
        if isinstance(part, dict) and part.get("class_name") == "__slice__":
            c = part["config"]
            key.append(slice(c.get("start"), c.get("stop"), c.get("step")))
        elif isinstance(part, int):
            key.append(part)
        else:
            raise UnsupportedLayer(f"layer {name} (GetItem) takes an index the NumPy pass does not read: {part!r}")
    return tuple(key)
