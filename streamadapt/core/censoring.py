"""What a repurchase label still running its horizon says, and how much. Pure.

A purchase made less than a horizon before the watermark has a label that can still change from "not yet" to 1.
Taken as final, such labels teach that few come back (and taken only when positive, that all do); left out,
they leave a round nothing newer than a horizon ago, so a model whose base rate moved learns it a horizon late.
Counted for what is known of them, they are unbiased: a purchase watched for `e` days without a repurchase has
probability 1 - p * G(e) of that, where p is the model's P(repurchase within the horizon) and G(e) the share of
repurchases that come within `e` days of the purchase. G is read off the settled positives, whose repurchase
time is known. `exposure` is G(e): 1 for a settled label.
"""
from __future__ import annotations

import numpy as np

from streamadapt.core.labels import settled

MIN_POSITIVES = 30  # settled positives needed to read G from; fewer, and unsettled labels are not used


def repurchase_delays(ts_s: np.ndarray, resolved_ts_s: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Delays (seconds) from purchase to repurchase of the settled positives among these examples."""
    positive = labels == 1
    return np.sort(np.maximum(0.0, resolved_ts_s[positive] - ts_s[positive]))


def exposure(ts_s: np.ndarray, delays_s: np.ndarray, watermark_s: float, horizon_days: float) -> np.ndarray:
    """G(watermark - ts) for each purchase: the share of `delays_s` (sorted) at most that long; 1 where the
    horizon has passed. Never 0: a purchase made at the watermark still counts a little, as the first delay."""
    watched_s = watermark_s - np.asarray(ts_s, np.float64)
    share = np.searchsorted(delays_s, watched_s, side="right") / max(1, len(delays_s))
    return np.where(settled(np.asarray(ts_s, np.float64), horizon_days, watermark_s), 1.0,
                    np.clip(share, 1.0 / (len(delays_s) + 1), 1.0))
