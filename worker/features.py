"""Per-user state and the feature vector: one code path for pretraining and serving.

A user's state is a small, bounded summary of their past purchases. `encode([(state, event), ...], spec)`
gives the features of each event as seen *before* it is folded into its user's state; `advance(state,
event)` folds it in; `spec.recall(state, ts_s)` is the state an event at `ts_s` is seen with: a user idle
for longer than the model's memory counts as new. All are pure, and memory is counted in event time, so
that pretraining on a file of years, a fast replay and a worker in real time forget the same users.
"""
from __future__ import annotations

import math
from math import nan
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from types import MappingProxyType
from typing import NamedTuple
from datetime import datetime

import numpy as np

from schemas import PurchaseEvent

CATEGORY_DECAY = 0.85  # weight kept by older purchases each time the user buys again
EMA_ALPHA = 0.3  # weight of the newest purchase in the price and gap averages
MAX_TRACKED_CATEGORIES = 24  # a user's category memory is bounded whatever categories arrive
OTHER = "<other>"
_SECONDS_PER_HOUR = 3600.0
_SECONDS_PER_DAY = 86400.0
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)

NUMERIC_FEATURES = (
    "log_price", "log_quantity", "log_price_vs_user_mean", "log_hours_since_last", "is_first_purchase",
    "log_purchases_before", "user_mean_log_gap_hours", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos",
    "log_days_observed",
)
OBSERVED_CAP_DAYS = 365.0  # history watched for longer than this counts as complete
USER_MEMORY_DAYS = 400.0  # by default a user idle for longer is forgotten: a year and a month, so that one who
# buys about once a year is remembered (`pretrain --user-memory-days`)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Which categories the model knows (anything else maps to OTHER), and how long it remembers an idle
    user: `user_memory_days`, None for checkpoints pretrained before forgetting existed (they never forget)."""

    categories: tuple[str, ...]
    user_memory_days: float | None = USER_MEMORY_DAYS
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    memory_s: float = field(init=False, repr=False, compare=False)  # user_memory_days in seconds; inf: never forgets

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.categories)})
        object.__setattr__(self, "memory_s", math.inf if self.user_memory_days is None
                           else self.user_memory_days * _SECONDS_PER_DAY)

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return (*self.categories, OTHER)

    @property
    def n_features(self) -> int:
        return 2 * len(self.vocabulary) + len(NUMERIC_FEATURES)

    def feature_names(self) -> list[str]:
        return ([f"category={c}" for c in self.vocabulary] + [f"user_share={c}" for c in self.vocabulary]
                + list(NUMERIC_FEATURES))

    def index_of(self, category: str) -> int:
        return self._index.get(category, len(self.categories))

    def recall(self, state: UserState | None, ts_s: float) -> UserState:
        """The state an event at `ts_s` is seen with: `state` (None: a user never seen), or a new user's
        if `state` is older than the memory."""
        if state is None or (state.last_ts_s is not None and ts_s - state.last_ts_s > self.memory_s):
            return _NEW_USER
        return state

    def to_json(self) -> dict:
        return {"categories": list(self.categories), "numeric_features": list(NUMERIC_FEATURES),
                "user_memory_days": self.user_memory_days}

    @classmethod
    def from_json(cls, payload: dict) -> FeatureSpec:
        theirs = tuple(payload.get("numeric_features", ()))
        if theirs != NUMERIC_FEATURES:
            missing, unknown = set(NUMERIC_FEATURES) - set(theirs), set(theirs) - set(NUMERIC_FEATURES)
            raise ValueError("checkpoint was built with other feature code"
                             + (f" (without {', '.join(sorted(missing))})" if missing else "")
                             + (f" (with {', '.join(sorted(unknown))}, unknown here)" if unknown else "")
                             + ": pretrain it again with this version")
        return cls(categories=tuple(payload["categories"]), user_memory_days=payload.get("user_memory_days"))


class UserState(NamedTuple):
    """What the worker remembers of one user. Bounded: at most MAX_TRACKED_CATEGORIES categories.

    A NamedTuple: immutable and cheap to build, one per event on the serving path. `category_weights`
    is never mutated once the state is built (advance makes a new dict).
    """

    purchases: int = 0
    last_ts_s: float | None = None
    last_category: str | None = None
    category_weights: Mapping[str, float] = MappingProxyType({})
    mean_log_price: float = 0.0
    mean_log_gap_hours: float = 0.0

    def to_json(self) -> list:
        return [self.purchases, self.last_ts_s, self.last_category, dict(self.category_weights),
                self.mean_log_price, self.mean_log_gap_hours]

    @classmethod
    def from_json(cls, payload: list) -> UserState:
        purchases, last_ts_s, last_category, weights, mean_log_price, mean_log_gap_hours = payload
        return cls(purchases, last_ts_s, last_category, weights, mean_log_price, mean_log_gap_hours)


_NEW_USER = UserState()


def encode(pairs: Sequence[tuple[UserState, PurchaseEvent]], spec: FeatureSpec, observed_since_s: float) -> np.ndarray:
    """Features of each event given its user's state before it: float32 (len(pairs), n_features).

    `observed_since_s` is the event time from which the states were kept (the stream's first event):
    a user first seen a week after it may well have bought before, one first seen a year after it
    probably has not.

    Vectorised over the batch; the per-event Python is limited to reading attributes.
    """
    n, size = len(pairs), len(spec.vocabulary)
    out = np.zeros((n, spec.n_features), dtype=np.float32)
    if n == 0:
        return out
    columns, other, width = spec._index, len(spec.categories), spec.n_features  # inlined index_of: hot loop
    out[np.arange(n), [columns.get(event.category, other) for _, event in pairs]] = 1.0
    # user shares: every (row, category column, weight) of the states flattened with C-level iteration,
    # then each row's weights divided by its total; bincount sums categories that share a column (OTHER)
    counts, share_columns, weights = [], [], []
    for state, _ in pairs:
        category_weights = state.category_weights
        counts.append(len(category_weights))
        share_columns.extend(map(columns.get, category_weights, repeat(other, len(category_weights))))
        weights.extend(category_weights.values())
    if weights:
        rows = np.repeat(np.arange(n), counts)
        weights = np.asarray(weights, dtype=np.float64)
        totals = np.bincount(rows, weights=weights, minlength=n)
        cells = rows * width + size + np.asarray(share_columns, dtype=np.int64)
        out += np.bincount(cells, weights=weights / totals[rows], minlength=out.size).reshape(out.shape).astype(np.float32)

    # every per-event number in one pass and one array: a list comprehension per column cost a tenth of the batch
    columns_of = np.array([(event.ts_s, _utc_offset_s(event.ts), event.price, event.quantity, state.purchases,
                            nan if (last := state.last_ts_s) is None else last, state.mean_log_price,
                            state.mean_log_gap_hours) for state, event in pairs], dtype=np.float64)
    ts_s, utc_offset_s, price, quantity, purchases, last_ts_s, mean_log_price, mean_log_gap_hours = columns_of.T
    local_s = ts_s + utc_offset_s
    first = purchases == 0
    gap_hours = np.where(np.isnan(last_ts_s), 0.0, np.maximum(0.0, ts_s - np.nan_to_num(last_ts_s)) / _SECONDS_PER_HOUR)
    hour = (ts_s % _SECONDS_PER_DAY) / _SECONDS_PER_DAY * 2 * math.pi
    weekday = ((local_s / _SECONDS_PER_DAY + _EPOCH_WEEKDAY) % 7.0) / 7.0 * 2 * math.pi
    out[:, 2 * size:] = np.stack([
        np.log1p(price),
        np.log1p(quantity),
        np.where(first, 0.0, np.log(price) - mean_log_price),
        np.log1p(gap_hours),
        first.astype(np.float64),
        np.log1p(purchases),
        mean_log_gap_hours,
        np.sin(hour), np.cos(hour), np.sin(weekday), np.cos(weekday),
        np.log1p(np.clip((ts_s - observed_since_s) / _SECONDS_PER_DAY, 0.0, OBSERVED_CAP_DAYS)),
    ], axis=1)
    return out


def encode_stream(ordered: Sequence[PurchaseEvent], spec: FeatureSpec) -> np.ndarray:
    """Features of every event of a stream in event-time order, each from its user's state before it,
    as the worker computes them event by event."""
    states: dict[str, UserState] = {}
    pairs = []
    for event in ordered:
        state = spec.recall(states.get(event.user_id), event.ts_s)
        pairs.append((state, event))
        states[event.user_id] = advance(state, event)
    return encode(pairs, spec, ordered[0].ts_s if ordered else 0.0)


def advance(state: UserState, event: PurchaseEvent) -> UserState:
    """The user's state after `event`."""
    ts_s = event.ts_s
    weights = {c: w * CATEGORY_DECAY for c, w in state.category_weights.items()}
    weights[event.category] = weights.get(event.category, 0.0) + 1.0
    if len(weights) > MAX_TRACKED_CATEGORIES:
        weights = dict(sorted(weights.items(), key=lambda kv: kv[1], reverse=True)[:MAX_TRACKED_CATEGORIES])
    log_price = math.log(event.price)
    if state.purchases == 0:
        mean_log_price, mean_log_gap_hours = log_price, state.mean_log_gap_hours
    else:
        mean_log_price = (1 - EMA_ALPHA) * state.mean_log_price + EMA_ALPHA * log_price
        gap_hours = max(0.0, ts_s - (state.last_ts_s or ts_s)) / _SECONDS_PER_HOUR
        mean_log_gap_hours = (1 - EMA_ALPHA) * state.mean_log_gap_hours + EMA_ALPHA * math.log1p(gap_hours)
    return UserState(
        purchases=state.purchases + 1,
        last_ts_s=ts_s if state.last_ts_s is None else max(ts_s, state.last_ts_s),
        last_category=event.category,
        category_weights=weights,
        mean_log_price=mean_log_price,
        mean_log_gap_hours=mean_log_gap_hours,
    )


def _utc_offset_s(ts: datetime) -> float:
    offset = ts.utcoffset()
    return offset.total_seconds() if offset else 0.0
