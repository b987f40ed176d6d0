"""Recalibration of a model's class probabilities: one scale and one offset per class. Pure.

A served version is a network's weights *and* a calibration `[scale, offset_1, ..., offset_C]` applied to the
network's output: the class logits z (log-probabilities for a softmax output; (0, logit p) for a sigmoid
unit) become `scale * z + offsets`. The identity, `[1, 0, ..., 0]`, serves the network unchanged. Fitting
moves only the model's confidence and its class rates, never how it ranks examples within a class, so a few
hundred examples can follow a moved base rate (label shift) without overfitting anything else; it needs
no knowledge of the network's layers, so it works for any model a user brings.
"""
from __future__ import annotations

import numpy as np

RIDGE = 1.0  # pull of the scale toward 1 and of the offsets toward 0, worth about one example
MAX_STEPS = 25  # Newton steps; a handful usually converge
_EPS = 1e-7


class CalibrationError(RuntimeError):
    """The fit did not converge to finite parameters."""


def identity(n_classes: int) -> np.ndarray:
    return np.concatenate([[1.0], np.zeros(n_classes)]).astype(np.float64)


def is_identity(calibration: np.ndarray) -> bool:
    return bool(calibration[0] == 1.0 and not np.any(calibration[1:]))


def logits(probabilities: np.ndarray) -> np.ndarray:
    """Class logits of class probabilities (n, C): log-probabilities; for two classes (0, logit P(1)), so that
    a sigmoid unit's calibration is a scale and one offset of its logit."""
    p = np.clip(np.asarray(probabilities, np.float64), _EPS, 1.0 - _EPS)
    if p.shape[1] == 2:
        return np.stack([np.zeros(len(p)), np.log(p[:, 1]) - np.log(p[:, 0])], axis=1)
    return np.log(p)


def apply(probabilities: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """The calibrated probabilities (n, C), float32; the input itself under the identity."""
    if is_identity(calibration):
        return probabilities
    z = calibration[0] * logits(probabilities) + calibration[1:]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit(probabilities: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray | None = None,
        exposure: np.ndarray | None = None) -> np.ndarray:
    """The calibration that minimises the weighted log-loss of `labels` (class indices) under
    `apply(probabilities, calibration)`, with a ridge toward the identity; by Newton's method on the
    (1 + C) parameters. Raises CalibrationError if it does not converge.

    `exposure` (binary tasks): for each example, the chance that a positive would already show by now
    (streamadapt.core.censoring): 1 for a settled label, less for a purchase whose horizon is still running and whose
    label 0 means "not yet". Each example then counts for what is known of it: P(seen positive) = exposure x p."""
    if exposure is not None:
        return _fit_exposed(probabilities, labels, sample_weights, exposure)
    z = logits(probabilities)
    n_classes = z.shape[1]
    y = np.eye(n_classes)[np.asarray(labels, np.int64)]
    w = (np.ones(len(z)) if sample_weights is None else np.asarray(sample_weights, np.float64))[:, None]
    theta = identity(n_classes)
    target = theta.copy()
    for _ in range(MAX_STEPS):
        scaled = theta[0] * z + theta[1:]
        p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        gradient = np.concatenate([[np.sum(w * (p - y) * z)], np.sum(w * (p - y), axis=0)])
        pz = np.sum(p * z, axis=1, keepdims=True)  # each row's expected logit
        hessian = np.empty((n_classes + 1, n_classes + 1))
        hessian[0, 0] = np.sum(w * (p * z * z)) - np.sum(w * pz * pz)
        hessian[0, 1:] = hessian[1:, 0] = np.sum(w * p * (z - pz), axis=0)
        hessian[1:, 1:] = np.diag(np.sum(w * p, axis=0)) - (w * p).T @ p
        step = np.linalg.solve(hessian + RIDGE * np.eye(n_classes + 1), gradient + RIDGE * (theta - target))
        theta = theta - step
        if not np.all(np.isfinite(theta)):
            raise CalibrationError("calibration did not converge")
        if np.max(np.abs(step)) < 1e-7:
            break
    return theta


def _fit_exposed(probabilities: np.ndarray, labels: np.ndarray, sample_weights: np.ndarray | None,
                 exposure: np.ndarray) -> np.ndarray:
    """Binary calibration (a scale and a bias of the logit) under partial exposure, by Fisher scoring: the
    likelihood of a label seen positive by now is exposure x p, and its curvature is not everywhere of one sign,
    where the expected information is."""
    z = logits(probabilities)[:, 1]
    y = np.asarray(labels, np.float64)
    g = np.clip(np.asarray(exposure, np.float64), _EPS, 1.0)
    w = np.ones(len(z)) if sample_weights is None else np.asarray(sample_weights, np.float64)
    theta = np.array([1.0, 0.0])  # scale, bias; the ridge pulls toward this
    design = np.stack([z, np.ones(len(z))], axis=1)
    for _ in range(MAX_STEPS * 2):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        q = np.clip(g * p, _EPS, 1.0 - _EPS)  # P(seen positive by now)
        dq = g * p * (1.0 - p)  # its derivative in the logit
        score = w * dq * (y / q - (1.0 - y) / (1.0 - q))
        information = (design * (w * dq * dq / (q * (1.0 - q)))[:, None]).T @ design
        gradient = design.T @ score - RIDGE * (theta - np.array([1.0, 0.0]))
        step = np.linalg.solve(information + RIDGE * np.eye(2), gradient)
        theta = theta + step
        if not np.all(np.isfinite(theta)):
            raise CalibrationError("calibration did not converge")
        if np.max(np.abs(step)) < 1e-7:
            break
    return np.array([theta[0], 0.0, theta[1]])


def exposed_losses(probabilities: np.ndarray, labels: np.ndarray, exposure: np.ndarray) -> np.ndarray:
    """Per-example log-loss of a binary model's probabilities (n, 2) for what is known of each label: seen
    positive, with probability exposure x P(1), or not seen yet. A proper scoring rule for P(1) whatever the
    exposure; under exposure 1 the ordinary log-loss."""
    q = np.clip(np.asarray(exposure, np.float64) * probabilities[:, 1], _EPS, 1.0 - _EPS)
    y = np.asarray(labels, np.float64)
    return -(y * np.log(q) + (1.0 - y) * np.log(1.0 - q))
