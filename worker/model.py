"""The model behind a small contract: build, train, save/load a checkpoint, predict in batches.

A checkpoint is a directory with `model.keras` (Keras v3 format, loaded in safe mode) and
`metadata.json` (task, classes, feature spec, training summary, and the sha256 of model.keras,
verified at load). Training loads it with Keras; serving reads the same file without TensorFlow (its
layer configs and weights), so a serving process starts in about 1.5 s instead of the 4 to 13 s it took
while it imported TensorFlow, and holds none of TensorFlow's memory (BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence TensorFlow's C++ start-up banner

import numpy as np  # noqa: E402

from worker.features import FeatureSpec  # noqa: E402
from worker.labels import Task  # noqa: E402

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: missing, tampered with, or built for other code."""


@dataclass(frozen=True)
class ModelMeta:
    task: Task
    classes: tuple[str, ...]
    feature_spec: FeatureSpec
    horizon_days: float | None
    sha256: str
    extra: dict[str, Any]

    @property
    def version(self) -> str:
        """The version name under which this checkpoint serves."""
        return f"src-{self.sha256[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "task": self.task, "classes": list(self.classes),
                "feature_spec": self.feature_spec.to_json(), "horizon_days": self.horizon_days,
                "model_sha256": self.sha256, **self.extra}


def limit_cpu_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools (0 keeps its default of every core). Call before any TensorFlow op."""
    if threads > 0:
        tf = _tf()
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _tf():
    try:
        import tensorflow as tf
    except ImportError as error:  # the one place that needs TensorFlow installed
        raise RuntimeError(
            "TensorFlow is not installed: pip install 'streamadapt[cpu]' (or [gpu])"
        ) from error
    return tf


def build_model(feature_mean: np.ndarray, feature_variance: np.ndarray, task: Task, n_classes: int,
                hidden_units: tuple[int, ...] = (128, 64), seed: int = 0):
    """A feature MLP: `base_*` layers (normalisation and hidden layers) and a `head` layer.

    The split matters for transfer: fine-tuning can freeze the base and train the head. The source's
    feature statistics are constants of the normalisation layer's config, not weights: every clone and
    every fine-tuned version normalises exactly as the source did (adapt() state would not survive
    clone_model/set_weights).
    """
    tf = _tf()
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    n_features = len(feature_mean)
    inputs = keras.Input(shape=(n_features,), name="features", dtype="float32")
    x = keras.layers.Normalization(mean=np.asarray(feature_mean, np.float32).tolist(),
                                   variance=np.maximum(np.asarray(feature_variance, np.float32), 1e-6).tolist(),
                                   name="base_norm")(inputs)
    for i, units in enumerate(hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"base_dense_{i}")(x)
    if task == "repurchase":
        outputs = keras.layers.Dense(1, activation="sigmoid", name="head")(x)
    else:
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs, name=f"streamadapt_{task}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model, directory: Path, *, task: Task, classes: tuple[str, ...], feature_spec: FeatureSpec,
                    horizon_days: float | None, extra: dict[str, Any]) -> ModelMeta:
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    model.save(model_path)
    meta = ModelMeta(task=task, classes=classes, feature_spec=feature_spec, horizon_days=horizon_days,
                     sha256=file_sha256(model_path), extra=extra)
    (directory / METADATA_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    return meta


def read_metadata(directory: Path) -> ModelMeta:
    """A checkpoint's metadata, after checking that its model file is the one the metadata was written for.
    Raises CheckpointError with a readable reason."""
    model_path, meta_path = directory / MODEL_FILE, directory / METADATA_FILE
    if not model_path.is_file() or not meta_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it needs {MODEL_FILE} and {METADATA_FILE}")
    try:
        payload = json.loads(meta_path.read_text())
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{meta_path}: unknown checkpoint format {payload.get('format')!r}")
        extra = {k: v for k, v in payload.items()
                 if k not in {"format", "task", "classes", "feature_spec", "horizon_days", "model_sha256"}}
        meta = ModelMeta(task=payload["task"], classes=tuple(payload["classes"]),
                         feature_spec=FeatureSpec.from_json(payload["feature_spec"]),
                         horizon_days=payload.get("horizon_days"), sha256=payload["model_sha256"], extra=extra)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{meta_path}: unreadable metadata ({error})") from error
    actual = file_sha256(model_path)
    if actual != meta.sha256:
        raise CheckpointError(f"{model_path}: sha256 {actual[:12]}… does not match the metadata's {meta.sha256[:12]}…")
    return meta


def load_checkpoint(directory: Path) -> tuple[Any, ModelMeta]:
    """The checkpoint as a Keras model (for training) and its metadata. Raises CheckpointError."""
    meta = read_metadata(directory)
    keras = _tf().keras
    model = keras.models.load_model(directory / MODEL_FILE, compile=False, safe_mode=True)
    _check_shape(directory, meta, model.input_shape[-1], model.output_shape[-1])
    return model, meta


def _check_shape(directory: Path, meta: ModelMeta, n_inputs: int, n_outputs: int) -> None:
    expected_outputs = 1 if meta.task == "repurchase" else len(meta.classes)
    if n_inputs != meta.feature_spec.n_features or n_outputs != expected_outputs:
        raise CheckpointError(f"{directory}: model of {n_inputs} inputs and {n_outputs} outputs does not fit its "
                              f"metadata ({meta.feature_spec.n_features} features, {expected_outputs} outputs)")


def class_probabilities(raw: np.ndarray, task: Task) -> np.ndarray:
    """A model's output as class probabilities (n, n_classes): binary tasks get columns (P(0), P(1))."""
    if task == "repurchase":
        p = raw[:, 0]
        return np.stack([1.0 - p, p], axis=1)
    return raw


class ServingModel:
    """A checkpoint served by a NumPy forward pass over its weights, without TensorFlow.

    The network build_model makes (normalisation, dense layers) is a few matrix products. Calling Keras
    for them cost about 1.5 ms a batch whatever its size, which at moderate load was a tenth of the
    serving loop; the NumPy pass costs microseconds, and swapping versions is replacing a list.
    tests/worker/test_model.py checks it agrees with Keras, also after a swap.
    """

    def __init__(self, meta: ModelMeta, shift: np.ndarray, scale: np.ndarray, activations: list,
                 weights: list[np.ndarray]):
        self.meta = meta
        self.version = meta.version
        self._shift, self._scale, self._activations = shift, scale, activations
        self._weights = [np.asarray(w, np.float64) for w in weights]
        self._shapes = [w.shape for w in self._weights]

    @classmethod
    def from_checkpoint(cls, directory: Path) -> ServingModel:
        """Read a checkpoint without TensorFlow (what a serving process does)."""
        meta = read_metadata(directory)
        layers, variables = _read_keras_file(directory / MODEL_FILE)
        model = cls(meta, *_serving_plan(layers, variables, directory / MODEL_FILE))
        _check_shape(directory, meta, model._shapes[0][0], model._shapes[-1][-1])
        return model

    @classmethod
    def of_keras(cls, model, meta: ModelMeta) -> ServingModel:
        """Serve a Keras model already loaded (the trainer's gate scores candidates by this forward pass)."""
        variables = {layer.name: layer.get_weights() for layer in model.layers}
        return cls(meta, *_serving_plan(model.get_config()["layers"], variables, model.name))

    @property
    def weights(self) -> list[np.ndarray]:
        """The weights served now, in the order and dtype (float32) of the Keras model's get_weights(), as a
        version's artifact holds them (the forward pass computes in float64)."""
        return [w.astype(np.float32) for w in self._weights]

    def swap(self, weights: list[np.ndarray], version: str) -> None:
        """Serve `weights` (in the order of the Keras model's get_weights()) from now on."""
        weights = [np.asarray(w, np.float64) for w in weights]
        if [w.shape for w in weights] != self._shapes:
            raise ValueError(f"weights of {version} do not fit the serving model's architecture")
        self._weights, self.version = weights, version

    def predict_many(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for a batch: shape (n, n_classes); binary tasks get columns (P(0), P(1))."""
        # float64 inside: the result then does not depend on how rows are split into batches (BLAS blocks
        # float32 products differently by shape, which moved the sixth digit)
        x = (np.asarray(features, np.float64) - self._shift) / self._scale
        weights = self._weights
        for i, activation in enumerate(self._activations):
            x = activation(x @ weights[2 * i] + weights[2 * i + 1])
        return class_probabilities(x.astype(np.float32), self.meta.task)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _linear(x: np.ndarray) -> np.ndarray:
    return x


_ACTIVATIONS = {"relu": _relu, "sigmoid": _sigmoid, "softmax": _softmax, "linear": _linear}


def _read_keras_file(model_path: Path) -> tuple[list[dict], dict[str, list[np.ndarray]]]:
    """A Keras v3 model file's layer configs and each layer's variables by layer name, read without
    TensorFlow: the file is a zip of the model's config (JSON) and its weights (HDF5, a group of variables
    per layer, which names the layer in an attribute)."""
    import h5py  # installed with Keras; imported here so that only serving pays for it

    try:
        with zipfile.ZipFile(model_path) as archive:
            layers = json.loads(archive.read("config.json"))["config"]["layers"]
            weights_file = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(weights_file, "r") as h5:
            variables = {group["vars"].attrs["name"]: [group["vars"][str(i)][()] for i in range(len(group["vars"]))]
                         for group in h5["layers"].values()}
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{model_path}: not a Keras model file of the expected layout ({error!r})") from error
    return layers, variables


def _serving_plan(layers: list[dict], variables: dict[str, list[np.ndarray]],
                  origin) -> tuple[np.ndarray, np.ndarray, list, list[np.ndarray]]:
    """(shift, scale, activations, weights) of build_model's network, from its layer configs (as Keras
    serialises them) and each layer's variables; any other network is refused, naming `origin`."""
    shift, scale, activations, weights = None, None, [], []
    for layer in layers:
        kind, config = layer["class_name"], layer["config"]
        if kind == "InputLayer":
            continue
        if kind == "Normalization" and shift is None and not activations and config.get("mean") is not None:
            shift = np.asarray(config["mean"], np.float64)
            # Keras divides by max(sqrt(variance), epsilon) with epsilon = 1e-7
            scale = np.maximum(np.sqrt(np.asarray(config["variance"], np.float64)), 1e-7)
        elif (kind == "Dense" and config.get("activation") in _ACTIVATIONS and config.get("use_bias", True)
              and len(variables.get(config["name"], ())) == 2):
            activations.append(_ACTIVATIONS[config["activation"]])
            weights.extend(variables[config["name"]])  # kernel, then bias
        else:
            raise CheckpointError(f"{origin}: layer {config.get('name')} ({kind}) cannot be served")
    if shift is None or not activations:
        raise CheckpointError(f"{origin}: expected a normalisation layer and dense layers")
    return shift, scale, activations, weights
