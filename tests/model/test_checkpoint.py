"""The model contract: checkpoint round trip and verification, batched serving."""
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from streamadapt.core.features import USER_MEMORY_DAYS
from streamadapt.model.checkpoint import (
    CheckpointError,
    Parameters,
    ServingModel,
    load_checkpoint,
    save_checkpoint,
)


def test_checkpoint_round_trip_and_batch_invariance(checkpoint):
    model = ServingModel.from_checkpoint(checkpoint)
    meta = json.loads((checkpoint / "metadata.json").read_text())
    assert model.meta.task == meta["task"] == "next_category"
    assert model.version == "src-" + meta["model_sha256"][:12]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, model.meta.feature_spec.n_features)).astype(np.float32)
    before = x.copy()
    whole = model.predict_many(x)
    assert whole.shape == (64, len(model.meta.classes))
    np.testing.assert_allclose(whole.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(x, before)  # inputs are not mutated
    parts = np.vstack([model.predict_many(x[:1]), model.predict_many(x[1:40]), model.predict_many(x[40:])])
    np.testing.assert_allclose(parts, whole, atol=1e-6)
    assert model.predict_many(x[:0]).shape == (0, len(model.meta.classes))


def test_tampered_model_file_is_refused(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    with (copy / "model.keras").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(copy)


def test_missing_checkpoint_is_a_readable_error(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        load_checkpoint(tmp_path)


def test_pretraining_recorded_what_it_trained_on(checkpoint):
    meta = json.loads((checkpoint / "metadata.json").read_text())
    assert meta["trained_on"]["examples"] > 1000
    assert 0.0 < meta["validation"]["accuracy"] <= 1.0
    assert meta["feature_spec"]["categories"]
    assert meta["feature_spec"]["user_memory_days"] == USER_MEMORY_DAYS


def test_a_clone_with_the_same_weights_serves_the_same_predictions(checkpoint):
    """Fine-tuning and scoring work on clones and swap weights in: normalisation must travel with the config."""
    import tensorflow as tf

    model, meta = load_checkpoint(checkpoint)
    x = np.random.default_rng(1).normal(size=(32, meta.feature_spec.n_features)).astype(np.float32) * 3 + 1
    clone = tf.keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_swap_changes_predictions_and_refuses_other_shapes(checkpoint):
    serving = ServingModel.from_checkpoint(checkpoint)
    x = np.ones((4, serving.meta.feature_spec.n_features), dtype=np.float32)
    before = serving.predict_many(x)
    original = serving.weights
    serving.swap(Parameters([w * 0.5 for w in original]), "v-test")
    assert serving.version == "v-test" and not np.allclose(serving.predict_many(x), before)
    with pytest.raises(ValueError, match="do not fit"):
        serving.swap(Parameters(original[:-1]), "v-bad")
    with pytest.raises(ValueError, match="calibration of v-bad does not fit"):
        serving.swap(Parameters(original, np.ones(2)), "v-bad")
    assert serving.version == "v-test"


def test_a_versions_calibration_is_applied_to_what_the_network_says(checkpoint):
    from streamadapt.core import calibration

    serving = ServingModel.from_checkpoint(checkpoint)
    x = np.random.default_rng(5).normal(size=(20, serving.meta.feature_spec.n_features)).astype(np.float32)
    network = serving.predict_many(x)
    fitted = np.concatenate([[1.3], np.linspace(-0.5, 0.5, len(serving.meta.classes))])
    serving.swap(Parameters(serving.weights, fitted), "v-calibrated")
    np.testing.assert_allclose(serving.predict_many(x), calibration.apply(network, fitted), atol=1e-6)
    np.testing.assert_allclose(serving.predict_uncalibrated(x), network, atol=1e-6)
    assert serving.parameters.calibration.tolist() == fitted.tolist()


def test_numpy_serving_agrees_with_keras_also_after_a_swap(checkpoint):
    serving = ServingModel.from_checkpoint(checkpoint)
    keras_model, _ = load_checkpoint(checkpoint)
    for served, loaded in zip(serving.weights, keras_model.get_weights(), strict=True):
        np.testing.assert_array_equal(served, loaded)  # read from the file without Keras, bit for bit
        assert served.dtype == loaded.dtype == np.float32
    x = np.random.default_rng(2).normal(size=(257, serving.meta.feature_spec.n_features)).astype(np.float32) * 4
    # Keras computes in float32 and NumPy serving in float64: on these wide inputs they differ below 2e-4
    np.testing.assert_allclose(serving.predict_many(x), keras_model.predict(x, verbose=0), atol=2e-4)
    # the trainer's gate serves the Keras model it holds by the same forward pass, to the same bits
    np.testing.assert_array_equal(ServingModel.of_keras(keras_model, serving.meta).predict_many(x),
                                  serving.predict_many(x))
    rng = np.random.default_rng(3)
    moved = [w + rng.normal(scale=0.05, size=w.shape).astype(np.float32) for w in keras_model.get_weights()]
    serving.swap(Parameters(moved), "v-moved")
    keras_model.set_weights(moved)
    np.testing.assert_allclose(serving.predict_many(x), keras_model.predict(x, verbose=0), atol=2e-4)


def test_a_binary_model_is_served_as_two_class_probabilities(repurchase_checkpoint):
    serving = ServingModel.from_checkpoint(repurchase_checkpoint)
    x = np.random.default_rng(4).normal(size=(50, serving.meta.feature_spec.n_features)).astype(np.float32)
    p = serving.predict_many(x)
    keras_model, _ = load_checkpoint(repurchase_checkpoint)
    np.testing.assert_allclose(p[:, 1], keras_model.predict(x, verbose=0)[:, 0], atol=1e-4)  # float32 against float64
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_serving_a_checkpoint_does_not_import_tensorflow(checkpoint):
    """The serving process reads the model file itself: importing TensorFlow took about ten seconds of its
    start-up."""
    code = (f"import sys; from pathlib import Path; from streamadapt.model.checkpoint import ServingModel; "
            f"m = ServingModel.from_checkpoint(Path({str(checkpoint)!r})); "
            f"print(m.version, 'tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [ServingModel.from_checkpoint(checkpoint).version, "False", "False"]


def test_a_network_the_numpy_pass_cannot_compute_is_served_through_tensorflow_naming_the_layer(checkpoint, tmp_path,
                                                                                                 caplog):
    import tensorflow as tf

    model, meta = load_checkpoint(checkpoint)
    n = meta.feature_spec.n_features
    inputs = tf.keras.Input(shape=(n,))
    x = tf.keras.layers.Reshape((n, 1))(inputs)
    x = tf.keras.layers.Conv1D(2, 3, name="conv_here")(x)  # a convolution wider than one position
    x = tf.keras.layers.Flatten()(x)
    other = tf.keras.Model(inputs, tf.keras.layers.Dense(len(meta.classes), activation="softmax")(x))
    save_checkpoint(other, tmp_path / "other", task=meta.task, classes=meta.classes, feature_spec=meta.feature_spec,
                    horizon_days=meta.horizon_days, extra={})
    served = ServingModel.from_checkpoint(tmp_path / "other")
    assert served.path == "tensorflow" and "conv_here (Conv1D) is not a 1x1 convolution" in caplog.text
    x = np.random.default_rng(2).normal(size=(5, n)).astype(np.float32)
    np.testing.assert_allclose(served.predict_many(x), other.predict(x, verbose=0), atol=1e-5)


def test_common_keras_layers_are_served_exactly_as_keras_computes_them(tmp_path):
    """Batch and layer normalisation, dropout, a residual add, a concatenation, slices and reshapes: the NumPy
    pass computes what Keras does, read back from the saved file."""
    import tensorflow as tf

    from streamadapt.core.features import FeatureSpec

    keras, n = tf.keras, 14
    spec = FeatureSpec(("a",))  # 2 classes of 5, 2 categories, 12 numeric: 24 features
    n = spec.n_features
    inputs = keras.Input(shape=(n,))
    h = keras.layers.Dense(8, activation="gelu")(keras.layers.Normalization(mean=[0.5] * n, variance=[2.0] * n)(inputs))
    h = keras.layers.Dropout(0.3)(keras.layers.BatchNormalization()(h))
    h = keras.layers.Add()([h, keras.layers.LayerNormalization()(keras.layers.Dense(8, activation="tanh")(h))])
    block = keras.layers.Reshape((2, 5))(inputs[:, :10])
    scored = keras.layers.Reshape((2,))(keras.layers.Conv1D(1, 1)(block))
    logits = keras.layers.Add()([keras.layers.Dense(2)(keras.layers.Concatenate()([h, inputs[:, 10:]])), scored])
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    rng = np.random.default_rng(6)
    weights = [rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()]
    for layer in model.layers:  # moving variances must be positive
        if isinstance(layer, keras.layers.BatchNormalization):
            index = [id(w) for w in model.weights].index(id(layer.moving_variance))
            weights[index] = np.abs(weights[index]) + 0.5
    model.set_weights(weights)
    meta = save_checkpoint(model, tmp_path / "ckpt", task="next_category", classes=("a", "<other>"), feature_spec=spec,
                           horizon_days=None, extra={})
    serving = ServingModel.from_checkpoint(tmp_path / "ckpt")
    x = rng.normal(size=(33, n)).astype(np.float32)
    np.testing.assert_allclose(serving.predict_many(x), model.predict(x, verbose=0), atol=2e-5)
    assert serving.meta == meta


def test_a_model_file_that_is_not_a_keras_archive_is_a_readable_error(checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    (copy / "model.keras").write_bytes(b"not a zip")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["model_sha256"] = hashlib.sha256(b"not a zip").hexdigest()
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a Keras model file"):
        ServingModel.from_checkpoint(copy)


def test_a_layer_the_numpy_pass_does_not_know_is_served_through_tensorflow_and_swaps_alike(checkpoint, tmp_path):
    """Rescaling is a Keras layer the NumPy pass does not compute: the checkpoint still serves, through
    TensorFlow, agrees with Keras, and takes a new version's weights."""
    from streamadapt.model.checkpoint import import_tensorflow, read_metadata

    keras = import_tensorflow().keras
    meta = read_metadata(checkpoint)
    n_features, n_classes = meta.n_features, len(meta.classes)
    inputs = keras.Input(shape=(n_features,))
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Rescaling(0.5)(inputs))
    network = keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(hidden))
    save_checkpoint(network, tmp_path / "rescaled", task="next_category", classes=meta.classes,
                    feature_spec=meta.feature_spec, horizon_days=None, extra={}, features=meta.features)
    served = ServingModel.from_checkpoint(tmp_path / "rescaled")
    assert served.path == "tensorflow" and ServingModel.from_checkpoint(checkpoint).path == "numpy"
    x = np.random.default_rng(1).normal(size=(33, n_features)).astype(np.float32)
    np.testing.assert_allclose(served.predict_many(x), network.predict(x, verbose=0), atol=1e-5)
    moved = [w + 0.1 for w in served.weights]
    served.swap(Parameters(moved), "v2")
    network.set_weights(moved)
    np.testing.assert_allclose(served.predict_many(x), network.predict(x, verbose=0), atol=1e-5)
    assert served.version == "v2"
