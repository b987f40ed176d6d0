"""The promotion gate. Pure: scores in, decision out."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def prior_probabilities(train_labels: np.ndarray, n_classes: int, n_rows: int) -> np.ndarray:
    """The label-prior baseline: every row gets the training labels' class frequencies (add-one smoothed)."""
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64) + 1.0
    return np.tile(counts / counts.sum(), (n_rows, 1))


def decide(candidate: dict[str, float], champion: dict[str, float], prior: dict[str, float],
           min_relative_gain: float) -> Decision:
    """Promote only when, on the same holdout, the candidate's log-loss beats both the champion's and the
    label-prior baseline's by `min_relative_gain`.

    The prior test is what stops a candidate that learned nothing but the target's base rates (say, from
    shuffled labels) from replacing a champion that is badly calibrated for the target.
    """
    new = candidate.get("log_loss", math.nan)
    if not math.isfinite(new):
        return Decision(False, "candidate log-loss is not finite")
    for name, scores in (("label prior", prior), ("champion", champion)):
        old = scores.get("log_loss", math.nan)
        if not math.isfinite(old):
            continue
        bar = old * (1.0 - min_relative_gain)
        if not new < bar:
            return Decision(False, f"log-loss {new:.4f} does not beat the {name}'s {old:.4f} by {min_relative_gain:.1%}")
    return Decision(True, f"log-loss {new:.4f} beats champion {champion.get('log_loss', math.nan):.4f} and "
                          f"label prior {prior.get('log_loss', math.nan):.4f} by {min_relative_gain:.1%}")
