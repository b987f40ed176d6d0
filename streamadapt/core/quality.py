"""Prequential (test-then-train) quality of served predictions, and a drift detector. Pure.

Each served prediction is scored when its label resolves, with the probabilities it was served with.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-7


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood (natural log) of class probabilities (n, C) at class indices (n,)."""
    if len(labels) == 0:
        return float("nan")
    picked = np.clip(probabilities[np.arange(len(labels)), labels], EPS, 1.0)
    return float(-np.mean(np.log(picked)))


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == labels)) if len(labels) else float("nan")


def brier(p_positive: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((p_positive - labels) ** 2)) if len(labels) else float("nan")


def auc(p_positive: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged); nan when only one class is present."""
    labels = np.asarray(labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(p_positive, kind="mergesort")
    ranks = np.empty(len(labels), dtype=np.float64)
    sorted_scores = np.asarray(p_positive)[order]
    i = 0
    while i < len(labels):  # average ranks over ties
        j = i
        while j + 1 < len(labels) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    ends = np.concatenate([starts[1:], [len(values)]])
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc_difference(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """AUC of `first` minus AUC of `second` (scores of the same examples, higher meaning positive), and the
    standard error of that difference by DeLong's method for paired ROC curves (DeLong, DeLong and
    Clarke-Pearson 1988, in the O(n log n) form of Sun and Xu 2014). (nan, nan) when a class is missing."""
    labels = np.asarray(labels).astype(bool)
    m, n = int(labels.sum()), int((~labels).sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    components = []
    for scores_ in (np.asarray(first, np.float64), np.asarray(second, np.float64)):
        positives, negatives = scores_[labels], scores_[~labels]
        overall = _midranks(np.concatenate([positives, negatives]))
        v10 = (overall[:m] - _midranks(positives)) / n  # per positive: the share of negatives it outranks
        v01 = 1.0 - (overall[m:] - _midranks(negatives)) / m  # per negative: the share of positives above it
        components.append((v10, v01))
    (a10, a01), (b10, b01) = components
    difference = float(a10.mean() - b10.mean())
    variance = (np.var(a10 - b10, ddof=1) / m if m > 1 else 0.0) + (np.var(a01 - b01, ddof=1) / n if n > 1 else 0.0)
    return difference, float(np.sqrt(variance))


def scores(task: str, probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The quality measures of a task: accuracy and log-loss; binary adds Brier and AUC."""
    labels = np.asarray(labels, dtype=np.int64)
    result = {"log_loss": log_loss(probabilities, labels), "accuracy": accuracy(probabilities, labels)}
    if task == "repurchase":
        result["brier"] = brier(probabilities[:, 1], labels)
        result["auc"] = auc(probabilities[:, 1], labels)
    return result


@dataclass
class RollingQuality:
    """The last `size` scored predictions of one serving version."""

    task: str
    size: int = 2000
    _probabilities: deque = field(default_factory=deque)
    _labels: deque = field(default_factory=deque)

    def add(self, probabilities: np.ndarray, label: int) -> None:
        self._probabilities.append(probabilities)
        self._labels.append(label)
        if len(self._labels) > self.size:
            self._probabilities.popleft()
            self._labels.popleft()

    def __len__(self) -> int:
        return len(self._labels)

    def current(self) -> dict[str, float]:
        if not self._labels:
            return {}
        return scores(self.task, np.stack(self._probabilities), np.array(self._labels))


@dataclass
class PageHinkley:
    """Page-Hinkley test for an upward shift in the mean of a stream (here: per-prediction log-loss), in units
    of the stream's own standard deviation, so that one setting suits a binary log-loss (a mean near 0.5) and
    a multiclass one (a mean of 2 or 3) alike.

    Alarms when the cumulative deviation above the running mean, less `delta_sd` standard deviations per
    value, exceeds `threshold_sd` standard deviations above its minimum. After an alarm it starts afresh and
    stays quiet for `cooldown` values: the rounds an alarm asks for need the new regime's labels, and a
    detector that alarms again before they exist only asks for rounds that cannot pass the gate. It needs
    `min_samples` values before its first alarm.

    Each value may come with a mark (here: the event time at which the prediction's label became known).
    The value at which the cumulative deviation was lowest is the last one before the shift began, so the
    values after it are the shifted ones, and the earliest of their marks dates the change: `update`
    returns it on an alarm. The earliest rather than the first, because values need not arrive in mark
    order (partitions of a backlog are read in turns).
    """

    delta_sd: float = 0.1
    threshold_sd: float = 150.0  # a shift of half a standard deviation alarms after about 400 values
    min_samples: int = 1000
    cooldown: int = 5000
    _count: int = 0
    _mean: float = 0.0
    _m2: float = 0.0  # Welford's sum of squared deviations
    _cumulative: float = 0.0
    _minimum: float = 0.0
    _quiet: int = 0  # values left before an alarm may fire again
    _earliest_since_minimum: float = math.inf

    def update(self, value: float, mark: float = -math.inf) -> float | None:
        """Add one value; on detected drift the estimated start of the change, as a mark (the detector
        then starts afresh), else None."""
        if not math.isfinite(value):
            return None
        self._count += 1
        self._quiet = max(0, self._quiet - 1)
        previous_mean = self._mean
        self._mean += (value - previous_mean) / self._count
        self._m2 += (value - previous_mean) * (value - self._mean)
        sd = math.sqrt(self._m2 / (self._count - 1)) if self._count > 1 else 0.0
        self._cumulative += value - self._mean - self.delta_sd * sd
        if self._cumulative <= self._minimum:
            self._minimum, self._earliest_since_minimum = self._cumulative, math.inf
        else:
            self._earliest_since_minimum = min(self._earliest_since_minimum, mark)
        if (self._count >= self.min_samples and not self._quiet and sd > 0
                and self._cumulative - self._minimum > self.threshold_sd * sd):
            change = self._earliest_since_minimum
            self._count, self._mean, self._m2, self._cumulative, self._minimum = 0, 0.0, 0.0, 0.0, 0.0
            self._earliest_since_minimum, self._quiet = math.inf, self.cooldown
            return change
        return None


class QualityMonitor:
    """Rolling prequential quality per serving version, and drift detection on the log-loss stream."""

    def __init__(self, task: str, window: int, max_versions: int = 4, detector: PageHinkley | None = None):
        self._task = task
        self._window = window
        self._max_versions = max_versions
        self._by_version: dict[str, RollingQuality] = {}
        self._detector = detector or PageHinkley()

    def observe(self, model_version: str, probabilities: np.ndarray, label: int, resolved_ts_s: float) -> float | None:
        """Score one prediction whose label became known at event time `resolved_ts_s`. When the drift
        detector alarms, returns the event time from which the new regime is estimated to hold; else None."""
        rolling = self._by_version.pop(model_version, None) or RollingQuality(self._task, self._window)
        self._by_version[model_version] = rolling  # most recently scored version last
        while len(self._by_version) > self._max_versions:
            self._by_version.pop(next(iter(self._by_version)))
        rolling.add(probabilities, label)
        return self._detector.update(-math.log(max(float(probabilities[label]), EPS)), resolved_ts_s)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """version -> {measure: value} for the versions still tracked."""
        return {version: rolling.current() for version, rolling in self._by_version.items()}
