"""The model contract: checkpoint round trip and verification, batched serving."""
import json
import shutil

import numpy as np
import pytest

from worker.model import CheckpointError, ServingModel, load_checkpoint


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
