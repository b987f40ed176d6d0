"""A version's calibration: one scale of its logits and an offset per class, fitted by Newton's method."""
import numpy as np
import pytest

from streamadapt.core import calibration

RNG = np.random.default_rng(0)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def draw(p: np.ndarray, rng=RNG) -> np.ndarray:
    cumulative = p.cumsum(axis=1)
    return (rng.random((len(p), 1)) > cumulative).sum(axis=1).clip(0, p.shape[1] - 1)


def test_the_identity_serves_the_network_unchanged():
    p = softmax(RNG.normal(size=(50, 4))).astype(np.float32)
    assert calibration.apply(p, calibration.identity(4)) is p
    assert calibration.is_identity(calibration.identity(2)) and not calibration.is_identity(np.array([1.0, 0.0, 0.1]))


def test_a_calibration_fitted_to_the_models_own_labels_stays_near_the_identity():
    p = softmax(RNG.normal(size=(20_000, 5)) * 1.5)
    fitted = calibration.fit(p, draw(p))
    assert abs(fitted[0] - 1.0) < 0.05 and np.max(np.abs(fitted[1:] - fitted[1:].mean())) < 0.05


def test_it_finds_a_sharper_shifted_truth_and_keeps_the_ranking_within_each_class():
    z = RNG.normal(size=(20_000, 4))
    offsets = np.array([0.8, -0.3, 0.0, -0.5])
    truth = softmax(1.6 * z + offsets)
    source = softmax(z)
    fitted = calibration.fit(source, draw(truth))
    refit = calibration.apply(source.astype(np.float32), fitted)
    assert fitted[0] == pytest.approx(1.6, abs=0.08)
    assert np.mean(np.abs(refit - truth)) < 0.2 * np.mean(np.abs(source - truth))
    for k in range(1, 4):  # log-odds against class 0 stay affine in the source's
        x, y = np.log(source[:, k] / source[:, 0]), np.log(refit[:, k] / refit[:, 0])
        a, b = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, a * x + b, atol=1e-3)


def test_a_binary_output_is_its_logit_scaled_and_shifted():
    logit = RNG.normal(size=10_000) * 1.5
    p1 = 1 / (1 + np.exp(-logit))
    wanted = 1 / (1 + np.exp(-(0.7 * logit - 0.8)))  # flatter and rarer than the model says
    labels = (RNG.random(10_000) < wanted).astype(np.int64)
    fitted = calibration.fit(np.stack([1 - p1, p1], axis=1), labels)
    refit = calibration.apply(np.stack([1 - p1, p1], axis=1).astype(np.float32), fitted)[:, 1]
    assert fitted[0] == pytest.approx(0.7, abs=0.06) and fitted[2] - fitted[1] == pytest.approx(-0.8, abs=0.1)
    order = np.argsort(p1)
    assert np.all(np.diff(refit[order]) >= -1e-6)  # the ranking, so the AUC, is the model's


def test_sample_weights_decide_which_examples_it_follows():
    p = np.tile([[0.5, 0.5]], (2000, 1))
    labels = np.repeat([0, 1], 1000)  # old examples say 0, new ones say 1
    weights = np.repeat([0.01, 1.0], 1000)
    fitted = calibration.apply(p.astype(np.float32), calibration.fit(p, labels, weights))
    assert fitted[0, 1] > 0.9
