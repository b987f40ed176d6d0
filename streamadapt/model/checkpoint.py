"""The model behind a small contract: build, train, save/load a checkpoint, predict in batches.

A checkpoint is a directory with `model.keras` (Keras v3 format, loaded in safe mode) and
`metadata.json` (task, classes, feature spec, training summary, and the sha256 of model.keras,
verified at load). Training loads it with Keras; serving reads the same file without TensorFlow (its
layer configs and weights), so a serving process neither waits for TensorFlow to import nor holds its
memory.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence TensorFlow's C++ start-up banner

import numpy as np  # noqa: E402

from streamadapt.core import calibration  # noqa: E402
from streamadapt.core.features import PER_CLASS_FEATURES, CategoryFeatures, FeatureSpec  # noqa: E402
from streamadapt.core.labels import Task  # noqa: E402
from streamadapt.core.plugin import BUILT_IN, Features, FeaturesError, load_features  # noqa: E402
from streamadapt.model.graph import Graph, UnsupportedLayer  # noqa: E402

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CHECKPOINT_FORMAT = 1


class Parameters(NamedTuple):
    """What a model version is: the network's weights (in the order of the Keras model's get_weights()) and
    the calibration of its output (streamadapt.core.calibration; None: the identity)."""

    weights: list[np.ndarray]
    calibration: np.ndarray | None = None


class CheckpointError(ValueError):
    """A checkpoint that cannot be served: missing, tampered with, or built for other code."""


@dataclass(frozen=True)
class FeaturesUsed:
    """The feature plug-in a checkpoint was trained with (streamadapt.core.plugin), and its input width."""

    plugin: str  # MODULE:NAME, as given to pretrain
    name: str
    version: str
    n_features: int

    @classmethod
    def of(cls, plugin: str, features: Features) -> FeaturesUsed:
        """What a checkpoint records of `features`, the plug-in `plugin` (MODULE:NAME) names."""
        return cls(plugin, features.name, str(features.version), features.n_features)

    @classmethod
    def built_in(cls, spec: FeatureSpec) -> FeaturesUsed:
        return cls.of(BUILT_IN, CategoryFeatures(spec))

    def to_json(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "name": self.name, "version": self.version, "n_features": self.n_features}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> FeaturesUsed:
        return cls(str(payload["plugin"]), str(payload["name"]), str(payload["version"]), int(payload["n_features"]))


@dataclass(frozen=True)
class ModelMeta:
    task: Task
    classes: tuple[str, ...]
    feature_spec: FeatureSpec
    horizon_days: float | None
    sha256: str
    extra: dict[str, Any]
    features: FeaturesUsed

    @property
    def n_features(self) -> int:
        return self.features.n_features

    @property
    def version(self) -> str:
        """The version name under which this checkpoint serves."""
        return f"src-{self.sha256[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "task": self.task, "classes": list(self.classes),
                "feature_spec": self.feature_spec.to_json(), "features": self.features.to_json(),
                "horizon_days": self.horizon_days, "model_sha256": self.sha256, **self.extra}


def limit_cpu_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools (0 keeps its default of every core). Call before any TensorFlow op."""
    if threads > 0:
        tf = import_tensorflow()
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def import_tensorflow():
    """TensorFlow, imported with what its C++ side writes to stderr while it loads silenced: TensorFlow 2.21
    logs its oneDNN and CPU-feature banners through absl before absl reads TF_CPP_MIN_LOG_LEVEL, and they
    buried a command's one-line error among four lines of noise."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow as tf
            except ImportError as error:  # the one place that needs TensorFlow installed
                raise RuntimeError("TensorFlow is not installed: pip install 'streamadapt[cpu]' (or [gpu]); of the "
                                   "container images, the trainer image has it") from error
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    return tf


CLASS_HIDDEN_UNITS = 16  # the shared per-class scorer's hidden width
CONTEXT_HIDDEN_UNITS = (32,)  # next_category's context network: a wider one learnt the source period's quirks
CONTEXT_DROPOUT = 0.3  # ... and so did this one without dropout: its class logits outweighed what a user's
# history says about them, and its argmax lost to the per-user frequency baseline on a real log
DENSE_HIDDEN_UNITS = (128, 64)  # repurchase's network


def build_model(spec: FeatureSpec, train_features: np.ndarray, task: Task, n_classes: int, seed: int = 0,
                class_block_width: int | None = None):
    """The built-in network, uncompiled. Feature statistics of `train_features` become constants of its
    normalisation layers (not weights: adapt() state would not survive clone_model/set_weights, so every
    clone and fine-tuned version normalises exactly as the source did).

    - next_category: each class's logit is a shared function of its own columns of the class block (the
      user's frequency, recency and share of that class: streamadapt.core.features), a 1x1 convolution over the
      classes, plus a logit from a dense network over the context block (this purchase: its category,
      price, time). The shared scorer learns from every class at once what a user's history says, and so
      holds for rare classes and long histories as for the common ones the source file is full of.
    - repurchase: a dense network over every feature, and one sigmoid unit.

    The class block is the first `class_block_width` columns (default: the built-in features'); the rest,
    whatever a feature plug-in appends, is context. With no class block (0: a plug-in of other features),
    next_category gets a dense network over every feature and a softmax.
    """
    tf = import_tensorflow()
    keras = tf.keras
    keras.utils.set_random_seed(seed)
    x = np.asarray(train_features, np.float64)
    inputs = keras.Input(shape=(x.shape[1],), name="features", dtype="float32")
    width = spec.class_block_width if class_block_width is None else class_block_width

    def normalised(tensor, columns: np.ndarray, name: str):
        return keras.layers.Normalization(mean=columns.mean(axis=0).tolist(),
                                          variance=np.maximum(columns.var(axis=0), 1e-6).tolist(), name=name)(tensor)

    def dense_stack(tensor, hidden_units: tuple[int, ...]):
        for i, units in enumerate(hidden_units):
            tensor = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(tensor)
        return tensor

    if task == "repurchase" or width == 0:
        hidden = dense_stack(normalised(inputs, x, "normalise"), DENSE_HIDDEN_UNITS)
        if task == "repurchase":
            return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="head")(hidden),
                               name="streamadapt_repurchase")
        return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax", name="head")(hidden),
                           name="streamadapt_next_category_dense")
    size, per_class = len(spec.vocabulary), len(PER_CLASS_FEATURES)
    context = keras.layers.Dropout(CONTEXT_DROPOUT, name="context_dropout")(
        normalised(inputs[:, width:], x[:, width:], "normalise_context"))
    context = keras.layers.Dropout(CONTEXT_DROPOUT, name="context_hidden_dropout")(
        dense_stack(context, CONTEXT_HIDDEN_UNITS))
    context_logits = keras.layers.Dense(n_classes, name="context_logits")(context)
    block = keras.layers.Reshape((size, per_class), name="classes")(inputs[:, :width])
    block = normalised(block, x[:, :width].reshape(-1, per_class), "normalise_classes")  # per feature, over classes
    scored = keras.layers.Conv1D(CLASS_HIDDEN_UNITS, 1, activation="relu", name="class_hidden")(block)
    scored = keras.layers.Conv1D(1, 1, name="class_score")(keras.layers.Concatenate(name="class_inputs")([block, scored]))
    class_logits = keras.layers.Reshape((size,), name="class_logits")(scored)
    logits = keras.layers.Add(name="logits")([context_logits, class_logits])
    outputs = keras.layers.Activation("softmax", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name="streamadapt_next_category")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(model, directory: Path, *, task: Task, classes: tuple[str, ...], feature_spec: FeatureSpec,
                    horizon_days: float | None, extra: dict[str, Any], features: FeaturesUsed | None = None) -> ModelMeta:
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    model.save(model_path)
    meta = ModelMeta(task=task, classes=classes, feature_spec=feature_spec, horizon_days=horizon_days,
                     sha256=file_sha256(model_path), extra=extra,
                     features=features or FeaturesUsed.built_in(feature_spec))
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
        if "features" not in payload:
            raise CheckpointError(f"{meta_path}: written by an older streamadapt (it does not name its feature "
                                  "plug-in): pretrain it again")
        extra = {k: v for k, v in payload.items()
                 if k not in {"format", "task", "classes", "feature_spec", "features", "horizon_days", "model_sha256"}}
        spec = FeatureSpec.from_json(payload["feature_spec"])
        meta = ModelMeta(task=payload["task"], classes=tuple(payload["classes"]), feature_spec=spec,
                         horizon_days=payload.get("horizon_days"), sha256=payload["model_sha256"], extra=extra,
                         features=FeaturesUsed.from_json(payload["features"]))
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
    return _keras_model(directory, meta), meta


def _keras_model(directory: Path, meta: ModelMeta):
    """The Keras model of a checkpoint whose metadata `meta` was read (and its model file checked) already."""
    keras = import_tensorflow().keras
    model = keras.models.load_model(directory / MODEL_FILE, compile=False, safe_mode=True)
    _check_shape(directory, meta, model.input_shape[-1], model.output_shape[-1])
    return model


def features_for(meta: ModelMeta, reference: str) -> Features:
    """The feature plug-in named by `reference` (MODULE:NAME), built for this checkpoint; CheckpointError when
    it is not the plug-in, or not the version, the checkpoint was trained with."""
    try:
        plugin = load_features(reference)
    except FeaturesError as error:
        raise CheckpointError(str(error)) from error
    used = meta.features
    if (plugin.name, str(plugin.version)) != (used.name, used.version):
        raise CheckpointError(f"checkpoint {meta.version} was pretrained with feature plug-in {used.name} version "
                              f"{used.version} ({used.plugin}), not {plugin.name} version {plugin.version} "
                              f"({reference}): run with --features {used.plugin}, or pretrain again")
    features = plugin(meta.feature_spec)
    if features.n_features != used.n_features:
        raise CheckpointError(f"feature plug-in {reference} gives {features.n_features} features, not the "
                              f"{used.n_features} checkpoint {meta.version} was pretrained on")
    return features


def _check_shape(directory: Path, meta: ModelMeta, n_inputs: int, n_outputs: int) -> None:
    expected_outputs = 1 if meta.task == "repurchase" else len(meta.classes)
    if n_inputs != meta.n_features or n_outputs != expected_outputs:
        raise CheckpointError(f"{directory}: model of {n_inputs} inputs and {n_outputs} outputs does not fit its "
                              f"metadata ({meta.n_features} features, {expected_outputs} outputs)")


def class_probabilities(raw: np.ndarray, task: Task) -> np.ndarray:
    """A model's output as class probabilities (n, n_classes): binary tasks get columns (P(0), P(1))."""
    if task == "repurchase":
        p = raw[:, 0]
        return np.stack([1.0 - p, p], axis=1)
    return raw


class KerasForward:
    """The general serving path: a Keras model's forward pass through TensorFlow, compiled once for batches of
    any size, for a network with a layer the NumPy pass does not compute. `forward` has the NumPy pass's
    signature; a new weight list (a swap) is loaded into the model before the first batch that uses it."""

    def __init__(self, model):
        tf = import_tensorflow()
        self._model = model
        self._served: list[np.ndarray] | None = None
        signature = [tf.TensorSpec([None, model.input_shape[-1]], tf.float32)]
        self._call = tf.function(lambda x: model(x, training=False), input_signature=signature)

    def forward(self, x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
        if weights is not self._served:
            self._model.set_weights([np.asarray(w, np.float32) for w in weights])
            self._served = weights
        return self._call(np.asarray(x, np.float32)).numpy().astype(np.float64)


class ServingModel:
    """A checkpoint served by a NumPy forward pass over its weights (streamadapt.model.graph), without TensorFlow,
    followed by the version's calibration (streamadapt.core.calibration). A network with a layer the NumPy
    pass does not compute is served through TensorFlow instead (KerasForward), at a higher cost per batch
    (BENCHMARKS.md, "Serving paths").

    A call into Keras has a fixed cost per batch that small batches cannot spread; the NumPy pass has
    next to none, and swapping versions is replacing a list. tests/model/test_checkpoint.py checks both
    paths agree with Keras, also after a swap.
    """

    def __init__(self, meta: ModelMeta, graph: Graph | KerasForward, weights: list[np.ndarray]):
        self.meta = meta
        self.version = meta.version
        self._graph = graph
        self._weights = [np.asarray(w, np.float64) for w in weights]
        self._shapes = [w.shape for w in self._weights]
        self.calibration = calibration.identity(len(meta.classes))

    @classmethod
    def from_checkpoint(cls, directory: Path) -> ServingModel:
        """Read a checkpoint without TensorFlow (what a serving process does), or with it when the NumPy pass
        cannot compute one of the network's layers."""
        meta = read_metadata(directory)
        config, variables = _read_keras_file(directory / MODEL_FILE)
        try:
            graph = _plan(config, {name: len(v) for name, v in variables.items()}, directory / MODEL_FILE)
        except CheckpointError as error:
            log.warning("serving %s through TensorFlow, slower than the NumPy pass: %s", meta.version, error)
            return cls.of_keras(_keras_model(directory, meta), meta, force_keras=True)
        model = cls(meta, graph, [w for layer in config["layers"] for w in variables.get(_layer_name(layer), ())])
        model._check_fits(directory)
        return model

    @classmethod
    def of_keras(cls, model, meta: ModelMeta, force_keras: bool = False) -> ServingModel:
        """Serve a Keras model already loaded (the trainer's gate scores candidates by this forward pass): by
        the NumPy pass where it computes every layer (unless `force_keras`), else through TensorFlow."""
        forward: Graph | KerasForward
        try:
            forward = KerasForward(model) if force_keras else plan_of_keras(model)
        except CheckpointError:
            forward = KerasForward(model)
        return cls(meta, forward, model.get_weights())

    @property
    def path(self) -> str:
        """Which forward pass serves: "numpy" or "tensorflow"."""
        return "tensorflow" if isinstance(self._graph, KerasForward) else "numpy"

    def _check_fits(self, origin) -> None:
        x = np.zeros((1, self.meta.n_features))
        try:
            out = self._graph.forward(x, self._weights)
        except (ValueError, IndexError) as error:
            raise CheckpointError(f"{origin}: the model does not take the {x.shape[1]} features of its metadata "
                                  f"({error})") from error
        expected = 1 if self.meta.task == "repurchase" else len(self.meta.classes)
        if out.shape != (1, expected):
            raise CheckpointError(f"{origin}: model of {out.shape[-1]} outputs does not fit its metadata "
                                  f"({expected} outputs)")

    @property
    def weights(self) -> list[np.ndarray]:
        """The weights served now, in the order and dtype (float32) of the Keras model's get_weights(), as a
        version's artifact holds them (the forward pass computes in float64)."""
        return [w.astype(np.float32) for w in self._weights]

    @property
    def parameters(self) -> Parameters:
        """The version served now, as its artifact holds it (weights in float32)."""
        return Parameters(self.weights, self.calibration.copy())

    def swap(self, parameters: Parameters, version: str) -> None:
        """Serve `parameters` from now on. ValueError when they do not fit this model."""
        weights = [np.asarray(w, np.float64) for w in parameters.weights]
        calibrated = parameters.calibration
        if [w.shape for w in weights] != self._shapes:
            raise ValueError(f"weights of {version} do not fit the serving model's architecture")
        n_classes = len(self.meta.classes)
        fitted = calibration.identity(n_classes) if calibrated is None else np.asarray(calibrated, np.float64)
        if fitted.shape != (n_classes + 1,) or not np.all(np.isfinite(fitted)):
            raise ValueError(f"calibration of {version} does not fit the model's {n_classes} classes")
        self._weights, self.calibration, self.version = weights, fitted, version

    def predict_many(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for a batch: shape (n, n_classes); binary tasks get columns (P(0), P(1))."""
        raw = self._graph.forward(np.asarray(features, np.float64), self._weights)
        return calibration.apply(class_probabilities(raw.astype(np.float32), self.meta.task), self.calibration)

    def predict_uncalibrated(self, features: np.ndarray) -> np.ndarray:
        """The network's own probabilities, before the version's calibration (what a calibration is fitted on)."""
        raw = self._graph.forward(np.asarray(features, np.float64), self._weights)
        return class_probabilities(raw.astype(np.float32), self.meta.task)


def plan_of_keras(model) -> Graph:
    """The NumPy pass of a Keras model already built; CheckpointError naming a layer it cannot compute."""
    return _plan(model.get_config(), {layer.name: len(layer.weights) for layer in model.layers}, model.name)


def _layer_name(layer: dict) -> str:
    return layer.get("name") or layer["config"]["name"]


def _plan(config: dict, variable_counts: dict[str, int], origin) -> Graph:
    """The NumPy pass of a functional model's config (single input, single output); CheckpointError naming
    the layer it cannot compute."""
    outputs = config.get("output_layers")
    output = outputs[0] if outputs and isinstance(outputs[0], str) else (outputs or [[None]])[0][0]
    if output is None or "layers" not in config:
        raise CheckpointError(f"{origin}: not a functional Keras model with one output")
    try:
        return Graph.of(config["layers"], variable_counts, output)
    except UnsupportedLayer as error:
        raise CheckpointError(f"{origin}: {error}") from error


def _read_keras_file(model_path: Path) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """A Keras v3 model file's config and each layer's variables by layer name, read without TensorFlow:
    the file is a zip of the model's config (JSON) and its weights (HDF5, a group of variables per layer,
    which names the layer in an attribute)."""
    import h5py  # installed with Keras; imported here so that only serving pays for it

    try:
        with zipfile.ZipFile(model_path) as archive:
            config = json.loads(archive.read("config.json"))["config"]
            weights_file = io.BytesIO(archive.read("model.weights.h5"))
        with h5py.File(weights_file, "r") as h5:
            variables = {group["vars"].attrs["name"]: [group["vars"][str(i)][()] for i in range(len(group["vars"]))]
                         for group in h5["layers"].values()}
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{model_path}: not a Keras model file of the expected layout ({error!r})") from error
    return config, variables
