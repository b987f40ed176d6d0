"""The promotion gate. Pure: per-example losses in, decision out."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worker.quality import EPS


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def example_losses(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example log-loss of class probabilities (n, C) at class indices (n,)."""
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPS, 1.0))


def prior_probabilities(train_labels: np.ndarray, n_classes: int, n_rows: int) -> np.ndarray:
    """The label-prior baseline: every row gets the training labels' class frequencies (add-one smoothed)."""
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64) + 1.0
    return np.tile(counts / counts.sum(), (n_rows, 1))


def decide(candidate: np.ndarray, champion: np.ndarray, prior: np.ndarray, min_relative_gain: float,
           z: float, ranking: tuple[float, float] | None = None) -> Decision:
    """Promote only when, on the same holdout, the candidate beats both the champion and the label-prior
    baseline: its mean log-loss must be lower by `min_relative_gain` of theirs, and the paired gain must
    exceed `z` standard errors, so a holdout's noise cannot promote a candidate. A trainer runs a round
    every few thousand examples, each a new test: at two standard errors about one round in 40 of a
    candidate no better than its champion passes, at three about one in 700 (`--training-promotion-z`).

    The prior test keeps a candidate that learned only base rates (say, from shuffled labels) from
    replacing a champion that is badly calibrated for the target.

    `ranking`, for a binary task, is (candidate AUC, champion AUC) on the holdout: a candidate that ranks
    worse than the champion is not promoted, whatever it gains in log-loss by calibration alone.
    """
    if len(candidate) == 0 or not np.all(np.isfinite(candidate)):
        return Decision(False, "candidate log-loss is not finite")
    reasons = []
    for name, other in (("label prior", prior), ("champion", champion)):
        gain = other - candidate
        needed = min_relative_gain * float(np.mean(other))
        standard_error = float(np.std(gain, ddof=1) / math.sqrt(len(gain))) if len(gain) > 1 else math.inf
        mean_gain = float(np.mean(gain))
        if not (mean_gain > needed and mean_gain > z * standard_error):
            return Decision(False, f"log-loss gain over the {name} {mean_gain:+.4f} (needs > {needed:.4f} and "
                                   f"> {z:g} x SE {standard_error:.4f}; candidate {np.mean(candidate):.4f})")
        reasons.append(f"{name} by {mean_gain:.4f} (SE {standard_error:.4f})")
    if ranking is not None and ranking[0] < ranking[1]:
        return Decision(False, f"log-loss {np.mean(candidate):.4f} beats the " + " and the ".join(reasons)
                        + f", but it ranks worse than the champion: AUC {ranking[0]:.4f} against {ranking[1]:.4f}")
    return Decision(True, f"log-loss {np.mean(candidate):.4f} beats the " + " and the ".join(reasons))
