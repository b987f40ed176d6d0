"""The promotion gate. Pure: per-example losses (and, for a binary task, scores) in, decision out.

A candidate is promoted when, on the same holdout:
- its log-loss, a proper scoring rule, beats the champion's by more than `z` standard errors of the paired
  per-example gain (and by at least `min_gain`, 0 by default): a small gain counts once the holdout shows it
  is real, a large one on a small holdout does not unless it is;
- it beats the label-prior baseline (the training labels' class rates) by PRIOR_Z standard errors, so that a
  candidate that learnt only base rates (from shuffled labels, say) cannot replace a champion that is badly
  calibrated;
- for a binary task, it does not rank the holdout significantly worse than the champion: its AUC may be lower
  only by less than `ranking_z` standard errors of the paired AUC difference (DeLong). A ranking rule
  without that tolerance vetoes large, significant log-loss gains over differences in the fourth decimal.

A trainer runs a round every few thousand examples, each a new test on a holdout that overlaps the last one:
at two standard errors (the default) a candidate no better than its champion passes about one round in 40, at
three about one in 700. A candidate that passes by chance is about as good as the champion, and the next
round judges it again, with the source checkpoint as a contender; on every log `python -m benchmarks adaptation`
replays (BENCHMARKS.md), two served better than three.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamadapt.core.quality import EPS, auc_difference

PRIOR_Z = 2.0  # a candidate beats the label prior by this many standard errors: enough to refuse one that learnt
# nothing but base rates (its gain over the prior is then about zero), without asking of a small holdout the
# certainty the champion test asks


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class Ranking:
    """A binary holdout's scores (P(positive)) of the candidate and of the champion, and its labels."""

    candidate: np.ndarray
    champion: np.ndarray
    labels: np.ndarray


def example_losses(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example log-loss of class probabilities (n, C) at class indices (n,)."""
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPS, 1.0))


def prior_probabilities(train_labels: np.ndarray, n_classes: int, n_rows: int) -> np.ndarray:
    """The label-prior baseline: every row gets the training labels' class frequencies (add-one smoothed)."""
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64) + 1.0
    return np.tile(counts / counts.sum(), (n_rows, 1))


SE_BLOCKS = 10  # contiguous stretches of the holdout whose mean gains also give the standard error


def paired_gain(candidate: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean per-example log-loss gain of the candidate over another contender (per-example losses on the
    holdout, in event-time order), and its standard error.

    Examples close in time are not independent: a day's promotions move every basket of that day, and a
    candidate that learnt the last days' class rates gains on all of them at once. The per-example standard
    error then understates the noise, and a gate at two of them promotes what the next days undo. So the
    standard error is also taken from the mean gains of SE_BLOCKS contiguous stretches (batch means), and
    the larger of the two counts."""
    gain = other - candidate
    n = len(gain)
    if n < 2:
        return float(np.mean(gain)) if n else 0.0, math.inf
    standard_error = float(np.std(gain, ddof=1) / math.sqrt(n))
    if n >= 2 * SE_BLOCKS:
        block_means = np.array([block.mean() for block in np.array_split(gain, SE_BLOCKS)])
        standard_error = max(standard_error, float(np.std(block_means, ddof=1) / math.sqrt(SE_BLOCKS)))
    return float(np.mean(gain)), standard_error


def decide(candidate: np.ndarray, champion: np.ndarray, prior: np.ndarray | None, z: float, min_gain: float = 0.0,
           ranking: Ranking | None = None, ranking_z: float = 2.0, prior_z: float = PRIOR_Z) -> Decision:
    """Whether the candidate (per-example losses on the holdout) replaces the champion; the reason names
    every figure the decision used. `prior` None: no label-prior test (a candidate whose network is one already
    trusted, recalibrated)."""
    if len(candidate) == 0 or not np.all(np.isfinite(candidate)):
        return Decision(False, "candidate log-loss is not finite")
    passed, failed = [], []
    tests = [("champion", champion, z)] if prior is None else [("label prior", prior, prior_z), ("champion", champion, z)]
    for name, other, needed_z in tests:
        gain, standard_error = paired_gain(candidate, other)
        figures = f"{gain:+.4f} (SE {standard_error:.4f})"
        if gain > needed_z * standard_error and gain > min_gain:
            passed.append(f"the {name} by {figures}")
        else:
            needs = f"> {needed_z:g} x SE" + (f" and > {min_gain:g}" if min_gain > 0 else "")
            failed.append(f"gain over the {name} {figures} needs {needs}")
    if failed:
        return Decision(False, f"log-loss {np.mean(candidate):.4f}: " + "; ".join(failed)
                        + ("; beats " + " and ".join(passed) if passed else ""))
    reason = f"log-loss {np.mean(candidate):.4f} beats " + " and ".join(passed)
    if ranking is not None:
        difference, standard_error = auc_difference(ranking.candidate, ranking.champion, ranking.labels)
        if np.isfinite(difference):
            figures = f"AUC difference {difference:+.4f} (SE {standard_error:.4f})"
            if difference < -ranking_z * standard_error:
                return Decision(False, f"{reason}, but it ranks worse than the champion beyond the noise: {figures}, "
                                       f"more than {ranking_z:g} x SE below")
            reason += f"; ranks no worse: {figures}"
    return Decision(True, reason)
