"""Pending predictions and labelled examples: their binary form and event-time windows. Pure.

A *pending* prediction is what the worker remembers of the last prediction served for a user: the
features it was made from, the class probabilities served, the serving version and the event time.
When a label resolves it becomes an *example*. Examples live in event-time tumbling windows of
`window_s` seconds, so the trainer can take "the most recent N examples" in event-time order.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from pydantic_core import from_json, to_json


class Example(NamedTuple):
    """A served prediction and (once resolved) its label. `label` is a class index, -1 while pending.

    `ts_s` is the event time of the purchase the prediction was served for; `resolved_ts_s` the event time
    at which its label became known (the user's next purchase, or the watermark passing a repurchase
    deadline), None while pending. A label belongs to the regime of the time it became known: a purchase
    made just before a drift is followed by one made after it, under the new regime.

    A NamedTuple: immutable, and cheap to build once per event on the hot path.
    """

    event_id: str
    ts_s: float
    model_version: str
    features: np.ndarray  # float32 (n_features,)
    probabilities: np.ndarray  # float32 (n_classes,) as served
    label: int = -1
    resolved_ts_s: float | None = None

    def with_label(self, label: int, resolved_ts_s: float) -> Example:
        return Example(self.event_id, self.ts_s, self.model_version, self.features, self.probabilities, label,
                       resolved_ts_s)

    def encode(self) -> bytes:
        """A JSON header line (ids, times, label, sizes) then the float32 features and probabilities."""
        header = to_json([self.event_id, self.ts_s, self.model_version, self.label, len(self.features),
                          len(self.probabilities), self.resolved_ts_s])
        return b"".join((header, b"\n", np.asarray(self.features, np.float32).tobytes(),
                         np.asarray(self.probabilities, np.float32).tobytes()))

    @classmethod
    def decode(cls, raw: bytes) -> Example:
        """An encoded example; ValueError when `raw` is not one."""
        header, _, body = raw.partition(b"\n")
        event_id, ts_s, version, label, n_features, n_classes, resolved_ts_s = from_json(header)
        values = np.frombuffer(body, dtype=np.float32)
        if len(values) != n_features + n_classes:
            raise ValueError("example body does not match its header")
        return cls(event_id, ts_s, version, values[:n_features].copy(), values[n_features:].copy(), label,
                   resolved_ts_s)


def window_start(ts_s: float, window_s: int) -> int:
    """Start (epoch seconds) of the tumbling event-time window holding `ts_s`.

    >>> window_start(3 * 3600 + 5, 3600)
    10800
    """
    return int(math.floor(ts_s / window_s) * window_s)


def labels_known_until(task: str, horizon_days: float | None, watermark_s: float | None) -> float | None:
    """The event time up to which every purchase's label is as known as it will be: the watermark, and for
    repurchase the watermark less the horizon (a negative resolves only at its deadline). None before any
    event time was seen. Windows age from it."""
    if watermark_s is None:
        return None
    return watermark_s - (horizon_days or 0.0) * 86400.0 if task == "repurchase" else watermark_s


def expired_windows(starts: list[int], known_until_s: float, window_s: int, max_age_s: int) -> list[int]:
    """Windows that ended more than `max_age_s` before `known_until_s`, the event time up to which labels
    are known (labels_known_until)."""
    return [s for s in starts if s + window_s + max_age_s <= known_until_s]


def recency_weights(ts_s: np.ndarray, half_life_s: float) -> np.ndarray:
    """Sample weights halving every `half_life_s` of event time before the newest example; mean 1."""
    if len(ts_s) == 0:
        return np.zeros(0, dtype=np.float32)
    weights = np.power(0.5, (ts_s.max() - ts_s) / half_life_s)
    return (weights / weights.mean()).astype(np.float32)
