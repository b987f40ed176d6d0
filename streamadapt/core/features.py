"""Per-user state and the feature vector: one code path for pretraining and serving.

A user's state is a small, bounded summary of their past purchases. `encode([(state, event), ...], spec)`
gives the features of each event as seen *before* it is folded into its user's state; `advance(state,
event)` folds it in; `spec.recall(state, ts_s)` is the state an event at `ts_s` is seen with: a user idle
for longer than the model's memory counts as new. All are pure, and memory is counted in event time, so
that pretraining on a file of years, a fast replay and a worker in real time forget the same users.

The vector has two blocks:
- the *class block*: for each class of the vocabulary (the categories the model knows, and OTHER), the
  same PER_CLASS_FEATURES of this user and that class, class after class: how often the user bought it,
  this purchase included (their frequency smoothed toward everybody's: what a per-user frequency baseline
  would predict), whether this purchase is one, how much of their recent buying it is, and
  how long ago they last bought it. A model can score every class with one shared function of these
  (streamadapt.model.checkpoint does), which holds for a user with two purchases as for one with two hundred, and for a
  rare class as for a common one;
- the *context block*: this purchase's category (one-hot) and NUMERIC_FEATURES.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from math import nan
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from streamadapt.schemas import PurchaseEvent

SHARE_DECAY = 0.85  # weight kept by older purchases in the recent share, each time the user buys again
COUNT_DECAY = 0.98  # the same for the frequency counts: about the last fifty purchases
FREQUENCY_PRIOR = 5.0  # a user's frequencies are smoothed toward the class frequencies with this many purchases
EMA_ALPHA = 0.3  # weight of the newest purchase in the price and gap averages
MAX_TRACKED_CATEGORIES = 24  # a user's category memory is bounded whatever categories arrive
OTHER = "<other>"
NEVER_DAYS = 3650.0  # "days since the user last bought this class" of a class they never bought
_SECONDS_PER_HOUR = 3600.0
_SECONDS_PER_DAY = 86400.0
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)

# The user's frequency of a class is smoothed three ways, because how far a user's own history should be
# trusted over everybody's depends on the log and on how long the history is: the scorer weighs the three
# against log_history (streamadapt.model.checkpoint). One smoothing alone made a network whose argmax lost to the per-user
# frequency baseline it is built on.
SMOOTHING_PURCHASES = {"log_frequency": FREQUENCY_PRIOR, "log_frequency_tight": 0.5, "log_frequency_loose": 50.0}
PER_CLASS_FEATURES = ("log_frequency", "is_this_purchase", "recent_share", "log_days_since", "never_bought",
                      "log_frequency_tight", "log_frequency_loose", "log_history")
NUMERIC_FEATURES = (
    "log_price", "log_quantity", "log_price_vs_user_mean", "log_hours_since_last", "is_first_purchase",
    "log_purchases_before", "user_mean_log_gap_hours", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos",
    "log_days_observed", "repeat_within_7d", "repeat_within_30d", "repeat_within_90d", "repeat_within_365d",
)
# How often a user came back soon: of the gaps between their purchases, the share at most this many days long
# (smoothed with one gap's worth of a half). A repurchase label asks exactly this of the next gap, and a user's
# own rate is what the per-user frequency baseline knows and the class block does not.
REPEAT_WITHIN_DAYS = (7.0, 30.0, 90.0, 365.0)
OBSERVED_CAP_DAYS = 365.0  # history watched for longer than this counts as complete (at most: see FeatureSpec)
USER_MEMORY_DAYS = 400.0  # by default a user idle for longer is forgotten: a year and a month, so that one who
# buys about once a year is remembered (`pretrain --user-memory-days`)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """Which categories the model knows (anything else maps to OTHER), how often each is bought
    (`class_frequencies`, over the vocabulary, summing to 1: what a new user's frequencies are smoothed
    toward), and how long the model remembers an idle user (`user_memory_days`, None: never forgets)."""

    categories: tuple[str, ...]
    class_frequencies: tuple[float, ...] = ()  # empty: uniform
    user_memory_days: float | None = USER_MEMORY_DAYS
    # log_days_observed stops growing here: pretraining sets it to the span of the source file, so that a
    # worker that has run for longer than the source period never feeds the network a value it was not
    # trained on (a network extrapolates such a feature linearly, and it did, wrongly)
    observed_cap_days: float = OBSERVED_CAP_DAYS
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    memory_s: float = field(init=False, repr=False, compare=False)  # user_memory_days in seconds; inf: never forgets
    _prior: np.ndarray = field(init=False, repr=False, compare=False)  # class_frequencies as an array

    def __post_init__(self) -> None:
        size = len(self.categories) + 1
        frequencies = np.asarray(self.class_frequencies or [1.0 / size] * size, np.float64)
        if frequencies.shape != (size,) or not np.all(frequencies > 0):
            raise ValueError(f"class frequencies must be {size} positive numbers, one per class of the vocabulary")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.categories)})
        object.__setattr__(self, "memory_s", math.inf if self.user_memory_days is None
                           else self.user_memory_days * _SECONDS_PER_DAY)
        object.__setattr__(self, "_prior", frequencies / frequencies.sum())

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return (*self.categories, OTHER)

    @property
    def class_block_width(self) -> int:
        """Columns of the class block: len(vocabulary) classes of len(PER_CLASS_FEATURES) features."""
        return len(self.vocabulary) * len(PER_CLASS_FEATURES)

    @property
    def n_features(self) -> int:
        return self.class_block_width + len(self.vocabulary) + len(NUMERIC_FEATURES)

    def feature_names(self) -> list[str]:
        return ([f"{name}[{c}]" for c in self.vocabulary for name in PER_CLASS_FEATURES]
                + [f"category={c}" for c in self.vocabulary] + list(NUMERIC_FEATURES))

    def index_of(self, category: str) -> int:
        return self._index.get(category, len(self.categories))

    def recall(self, state: UserState | None, ts_s: float) -> UserState:
        """The state an event at `ts_s` is seen with: `state` (None: a user never seen), or a new user's
        if `state` is older than the memory."""
        if state is None or (state.last_ts_s is not None and ts_s - state.last_ts_s > self.memory_s):
            return _NEW_USER
        return state

    def to_json(self) -> dict:
        return {"categories": list(self.categories), "class_frequencies": list(self.class_frequencies),
                "per_class_features": list(PER_CLASS_FEATURES), "numeric_features": list(NUMERIC_FEATURES),
                "user_memory_days": self.user_memory_days, "observed_cap_days": self.observed_cap_days}

    @classmethod
    def from_json(cls, payload: dict) -> FeatureSpec:
        for key, ours in (("per_class_features", PER_CLASS_FEATURES), ("numeric_features", NUMERIC_FEATURES)):
            theirs = tuple(payload.get(key, ()))
            if theirs != ours:
                missing, unknown = set(ours) - set(theirs), set(theirs) - set(ours)
                raise ValueError("checkpoint was built with other feature code"
                                 + (f" (without {', '.join(sorted(missing))})" if missing else "")
                                 + (f" (with {', '.join(sorted(unknown))}, unknown here)" if unknown else "")
                                 + ": pretrain it again with this version")
        return cls(categories=tuple(payload["categories"]), class_frequencies=tuple(payload["class_frequencies"]),
                   user_memory_days=payload.get("user_memory_days"),
                   observed_cap_days=float(payload["observed_cap_days"]))


# What a user's state keeps of one category they bought: [count, share, last_ts_s, at], a plain list, as JSON
# gives it back (one is read from Redis per category per event; a NamedTuple each cost several times as much). `count` is the
# purchases of it, each older one counting COUNT_DECAY less per later purchase of anything, and `share` the
# same with SHARE_DECAY (their recent buying), both as of the user's `at`-th purchase: the decay of the
# purchases since is applied when they are read (`decayed`), so that a purchase rewrites only the category
# bought. `last_ts_s` is the event time of the last purchase of it.
Tracked = Sequence[float]
_COUNT, _SHARE, _LAST_TS, _AT = range(4)


def decayed(tracked: Tracked, purchases: int) -> tuple[float, float]:
    """(count, share) of a tracked category for a user who has made `purchases` purchases."""
    since = purchases - tracked[_AT]
    return tracked[_COUNT] * COUNT_DECAY ** since, tracked[_SHARE] * SHARE_DECAY ** since


class UserState(NamedTuple):
    """What the worker remembers of one user. Bounded: at most MAX_TRACKED_CATEGORIES categories.

    A NamedTuple: immutable and cheap to build, one per event on the serving path. `categories` (category ->
    Tracked) and its values are never mutated once the state is built (advance makes a new dict).
    """

    purchases: int = 0
    last_ts_s: float | None = None
    categories: Mapping[str, Tracked] = MappingProxyType({})
    total_count: float = 0.0  # the sum of every purchase's decayed count, tracked or not
    mean_log_price: float = 0.0
    mean_log_gap_hours: float = 0.0
    repeats: tuple[int, ...] = (0,) * len(REPEAT_WITHIN_DAYS)  # gaps between purchases within each of REPEAT_WITHIN_DAYS

    def to_json(self) -> list:
        return [self.purchases, self.last_ts_s, dict(self.categories), self.total_count, self.mean_log_price,
                self.mean_log_gap_hours, list(self.repeats)]

    @classmethod
    def from_json(cls, payload: list) -> UserState:
        """The state `to_json` wrote; ValueError for anything else (another version's state, say)."""
        try:
            purchases, last_ts_s, categories, total_count, mean_log_price, mean_log_gap_hours, repeats = payload
            if type(repeats) is not list or len(repeats) != len(REPEAT_WITHIN_DAYS):
                raise ValueError(f"repeats are not {len(REPEAT_WITHIN_DAYS)} counts")
            if type(categories) is not dict or not all(type(t) is list and len(t) == 4 for t in categories.values()):
                raise ValueError("categories are not a mapping to (count, share, last time, purchase)")
            if not math.isfinite(sum(chain.from_iterable(categories.values()))):  # sum: numbers only, in C
                raise ValueError("a category's figures are not finite numbers")
            return cls(int(purchases), None if last_ts_s is None else float(last_ts_s), categories,
                       float(total_count), float(mean_log_price), float(mean_log_gap_hours),
                       tuple(int(count) for count in repeats))
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"not a user state: {error}") from error


_NEW_USER = UserState()


def encode(pairs: Sequence[tuple[UserState, PurchaseEvent]], spec: FeatureSpec, observed_since_s: float) -> np.ndarray:
    """Features of each event given its user's state before it: float32 (len(pairs), n_features).

    `observed_since_s` is the event time from which the states were kept (the stream's first event):
    a user first seen a week after it may well have bought before, one first seen a year after it
    probably has not.

    Vectorised over the batch; the per-event Python is limited to reading attributes.
    """
    n, size, per_class = len(pairs), len(spec.vocabulary), len(PER_CLASS_FEATURES)
    out = np.zeros((n, spec.n_features), dtype=np.float32)
    if n == 0:
        return out
    index, other = spec._index, len(spec.categories)  # inlined index_of: hot loop
    rows = np.arange(n)
    current = np.fromiter((index.get(event.category, other) for _, event in pairs), np.int64, n)
    # np.fromiter over a flat sequence: np.array of a list of tuples spends most of its time discovering
    # the shape, cell by cell
    width = 9 + len(REPEAT_WITHIN_DAYS)
    columns_of = np.fromiter(chain.from_iterable(
        (event.ts_s, _utc_offset_s(event.ts), event.price, event.quantity, state.purchases,
         nan if (last := state.last_ts_s) is None else last, state.mean_log_price, state.mean_log_gap_hours,
         state.total_count, *state.repeats) for state, event in pairs), np.float64, width * n).reshape(n, width)
    ts_s, utc_offset_s, price, quantity, purchases, last_ts_s, mean_log_price, mean_log_gap_hours, total = columns_of[:, :9].T
    gaps = np.maximum(purchases - 1.0, 0.0)
    repeat_shares = (columns_of[:, 9:] + 0.5) / (gaps + 1.0)[:, None]

    # the class block, class by class: what a user who never bought a class has, then the classes they did
    counts, shares, last_bought = np.zeros((n, size)), np.zeros((n, size)), np.full((n, size), -np.inf)
    entry_rows, entry_columns, entries = [], [], []
    for row, (state, _) in enumerate(pairs):
        for category, tracked in state.categories.items():
            entry_rows.append(row)
            entry_columns.append(index.get(category, other))
            entries.append(tracked)
    if entries:
        rows_of = np.asarray(entry_rows)
        cells = (rows_of, np.asarray(entry_columns))
        tracked = np.fromiter(chain.from_iterable(entries), np.float64, 4 * len(entries)).reshape(-1, 4)
        since = purchases[rows_of] - tracked[:, _AT]  # the decay not yet applied (see Tracked)
        np.add.at(counts, cells, tracked[:, _COUNT] * COUNT_DECAY ** since)  # categories that share OTHER add up
        np.add.at(shares, cells, tracked[:, _SHARE] * SHARE_DECAY ** since)
        np.maximum.at(last_bought, cells, tracked[:, _LAST_TS])
    share_totals = shares.sum(axis=1, keepdims=True)
    bought = np.isfinite(last_bought)
    block = out[:, :spec.class_block_width].reshape(n, size, per_class)
    counts[rows, current] += 1.0  # the frequency with this purchase: it is known when the prediction is made
    with_this = total + 1.0
    for name, strength in SMOOTHING_PURCHASES.items():
        column = PER_CLASS_FEATURES.index(name)
        block[:, :, column] = np.log(counts + strength * spec._prior) - np.log(with_this + strength)[:, None]
    block[rows, current, 1] = 1.0
    block[:, :, 2] = np.divide(shares, share_totals, out=np.zeros_like(shares), where=share_totals > 0)
    days_since = np.where(bought, np.maximum(0.0, ts_s[:, None] - np.where(bought, last_bought, 0.0)) / _SECONDS_PER_DAY,
                          NEVER_DAYS)
    block[:, :, 3] = np.log1p(days_since)
    block[:, :, 4] = ~bought
    block[:, :, PER_CLASS_FEATURES.index("log_history")] = np.log1p(with_this)[:, None]

    context = spec.class_block_width
    out[rows, context + current] = 1.0
    local_s = ts_s + utc_offset_s
    first = purchases == 0
    gap_hours = np.where(np.isnan(last_ts_s), 0.0, np.maximum(0.0, ts_s - np.nan_to_num(last_ts_s)) / _SECONDS_PER_HOUR)
    hour = (ts_s % _SECONDS_PER_DAY) / _SECONDS_PER_DAY * 2 * math.pi
    weekday = ((local_s / _SECONDS_PER_DAY + _EPOCH_WEEKDAY) % 7.0) / 7.0 * 2 * math.pi
    out[:, context + size:] = np.stack([
        np.log1p(price),
        np.log1p(quantity),
        np.where(first, 0.0, np.log(price) - mean_log_price),
        np.log1p(gap_hours),
        first.astype(np.float64),
        np.log1p(purchases),
        mean_log_gap_hours,
        np.sin(hour), np.cos(hour), np.sin(weekday), np.cos(weekday),
        np.log1p(np.clip((ts_s - observed_since_s) / _SECONDS_PER_DAY, 0.0, spec.observed_cap_days)),
        *repeat_shares.T,
    ], axis=1)
    return out


def advance(state: UserState, event: PurchaseEvent) -> UserState:
    """The user's state after `event`."""
    ts_s, purchases = event.ts_s, state.purchases + 1
    categories = dict(state.categories)
    before = categories.get(event.category)
    if before is None:
        categories[event.category] = [1.0, 1.0, ts_s, purchases]
    else:
        count, share = decayed(before, purchases)
        categories[event.category] = [count + 1.0, share + 1.0, max(ts_s, before[_LAST_TS]), purchases]
    if len(categories) > MAX_TRACKED_CATEGORIES:  # the least bought go
        categories = dict(sorted(categories.items(), key=lambda kv: decayed(kv[1], purchases)[0],
                                 reverse=True)[:MAX_TRACKED_CATEGORIES])
    log_price = math.log(event.price)
    repeats = state.repeats
    if state.last_ts_s is not None:
        gap_days = abs(ts_s - state.last_ts_s) / _SECONDS_PER_DAY
        repeats = tuple(count + (gap_days <= days) for count, days in zip(repeats, REPEAT_WITHIN_DAYS))
    if state.purchases == 0:
        mean_log_price, mean_log_gap_hours = log_price, state.mean_log_gap_hours
    else:
        mean_log_price = (1 - EMA_ALPHA) * state.mean_log_price + EMA_ALPHA * log_price
        gap_hours = max(0.0, ts_s - (state.last_ts_s or ts_s)) / _SECONDS_PER_HOUR
        mean_log_gap_hours = (1 - EMA_ALPHA) * state.mean_log_gap_hours + EMA_ALPHA * math.log1p(gap_hours)
    return UserState(
        purchases=purchases,
        last_ts_s=ts_s if state.last_ts_s is None else max(ts_s, state.last_ts_s),
        categories=categories,
        total_count=state.total_count * COUNT_DECAY + 1.0,
        mean_log_price=mean_log_price,
        mean_log_gap_hours=mean_log_gap_hours,
        repeats=repeats,
    )


def _utc_offset_s(ts: datetime) -> float:
    offset = ts.utcoffset()
    return offset.total_seconds() if offset else 0.0


class CategoryFeatures:
    """The built-in feature plug-in (streamadapt.core.plugin.Features): the class block and the context block of
    this module, from a UserState per user. Subclass it to add features: extend `encode` (append columns after
    the built-in ones, so that the built-in network still finds its class block) and `n_features`, and keep
    what you need of an event in a state of your own around the UserState."""

    name = "streamadapt.category"
    version = "2"
    # 24 tracked categories of 128-character names, their four figures each, and the scalars, with room to spare
    max_state_bytes = 16 * 1024

    def __init__(self, spec: FeatureSpec):
        self.spec = spec

    @property
    def n_features(self) -> int:
        return self.spec.n_features

    @property
    def class_block_width(self) -> int:
        return self.spec.class_block_width

    def recall(self, state: UserState | None, ts_s: float) -> UserState:
        return self.spec.recall(state, ts_s)

    def encode(self, rows: Sequence[tuple[UserState, PurchaseEvent]], observed_since_s: float) -> np.ndarray:
        return encode(rows, self.spec, observed_since_s)

    def advance(self, state: UserState, event: PurchaseEvent) -> UserState:
        return advance(state, event)

    def state_to_json(self, state: UserState) -> list:
        return state.to_json()

    def state_from_json(self, payload: list) -> UserState:
        return UserState.from_json(payload)
