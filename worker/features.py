"""Per-user state and the feature vector: one code path for pretraining and serving.

A user's state is a small, bounded summary of their past purchases. `encode(state, event, spec)`
gives the features of `event` as seen *before* it is folded into the state; `advance(state, event)`
folds it in. Both are pure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from schemas import PurchaseEvent

CATEGORY_DECAY = 0.85  # weight kept by older purchases each time the user buys again
EMA_ALPHA = 0.3  # weight of the newest purchase in the price and gap averages
MAX_TRACKED_CATEGORIES = 24  # a user's category memory is bounded whatever categories arrive
OTHER = "<other>"
_SECONDS_PER_HOUR = 3600.0
_SECONDS_PER_DAY = 86400.0

NUMERIC_FEATURES = (
    "log_price", "log_quantity", "log_price_vs_user_mean", "log_hours_since_last", "is_first_purchase",
    "log_purchases_before", "user_mean_log_gap_hours", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos",
)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Which categories the model knows; anything else maps to OTHER."""

    categories: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.categories)})

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

    def to_json(self) -> dict:
        return {"categories": list(self.categories), "numeric_features": list(NUMERIC_FEATURES)}

    @classmethod
    def from_json(cls, payload: dict) -> FeatureSpec:
        if tuple(payload.get("numeric_features", ())) != NUMERIC_FEATURES:
            raise ValueError("checkpoint was built with other feature code (numeric features differ)")
        return cls(categories=tuple(payload["categories"]))


@dataclass(frozen=True, slots=True)
class UserState:
    """What the worker remembers of one user. Bounded: at most MAX_TRACKED_CATEGORIES categories."""

    purchases: int = 0
    last_ts_s: float | None = None
    last_category: str | None = None
    category_weights: dict[str, float] = field(default_factory=dict)
    mean_log_price: float = 0.0
    mean_log_gap_hours: float = 0.0

    def to_json(self) -> list:
        return [self.purchases, self.last_ts_s, self.last_category, self.category_weights,
                self.mean_log_price, self.mean_log_gap_hours]

    @classmethod
    def from_json(cls, payload: list) -> UserState:
        purchases, last_ts_s, last_category, weights, mean_log_price, mean_log_gap_hours = payload
        return cls(purchases, last_ts_s, last_category, dict(weights), mean_log_price, mean_log_gap_hours)


def encode(state: UserState, event: PurchaseEvent, spec: FeatureSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Features of `event` given the user's state before it. Writes into `out` (float32, n_features) if given."""
    size = len(spec.vocabulary)
    row = np.zeros(spec.n_features, dtype=np.float32) if out is None else out
    if out is not None:
        row[:] = 0.0
    row[spec.index_of(event.category)] = 1.0
    total = sum(state.category_weights.values())
    if total > 0:
        for category, weight in state.category_weights.items():
            row[size + spec.index_of(category)] += weight / total
    ts_s = event.ts.timestamp()
    log_price = math.log(event.price)
    gap_hours = 0.0 if state.last_ts_s is None else max(0.0, ts_s - state.last_ts_s) / _SECONDS_PER_HOUR
    hour = (ts_s % _SECONDS_PER_DAY) / _SECONDS_PER_DAY * 2 * math.pi
    weekday = _weekday_fraction(event.ts) * 2 * math.pi
    numeric = (
        math.log1p(event.price),
        math.log1p(event.quantity),
        log_price - state.mean_log_price if state.purchases else 0.0,
        math.log1p(gap_hours),
        1.0 if state.purchases == 0 else 0.0,
        math.log1p(state.purchases),
        state.mean_log_gap_hours,
        math.sin(hour), math.cos(hour), math.sin(weekday), math.cos(weekday),
    )
    row[2 * size:] = numeric
    return row


def advance(state: UserState, event: PurchaseEvent) -> UserState:
    """The user's state after `event`."""
    ts_s = event.ts.timestamp()
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


def _weekday_fraction(ts: datetime) -> float:
    return (ts.weekday() + (ts.hour * 3600 + ts.minute * 60 + ts.second) / _SECONDS_PER_DAY) / 7.0
