"""Synthetic purchase streams, deterministic by seed (`streamadapt generate`).

The generative story, so that a benchmark on it can be judged:
- One *world* is shared by every market: 20 categories with base prices, and a sparse transition
  structure (after buying in category c, people tend to buy in one of c's few "follow-up" categories).
- A *market* (source or target) has its own category popularity, price multipliers and purchase rhythm.
  Source and target share the world's transitions but differ in those three.
- A *user* has a preference over categories (drawn around the market's popularity), a price level and
  a purchase rhythm (mean gap between purchases) with occasional dormant spells.
- Each purchase: with probability FOLLOW_PROB the category follows the transition structure from the
  user's last category (tilted by their taste), otherwise it comes from their taste alone. The gap to
  their next purchase is gamma-distributed around their rhythm.
- `--drift-at K`: from the K-th event on the market changes regime: popularity rotates, the follow-up
  structure of half the categories is rewired, some prices rise, and fans of the newly popular
  categories come back sooner while the others come back later. A model of the old regime becomes
  wrong about which category comes next and about who comes back how soon.
"""
from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import numpy as np

Market = Literal["source", "target"]

CATEGORIES = (
    "groceries", "beverages", "bakery", "dairy", "produce", "frozen", "household", "personal_care",
    "baby", "pets", "books", "music", "electronics", "phones", "computers", "toys", "sports", "garden",
    "fashion", "shoes",
)
WORLD_SEED = 20_240_601  # the world is the same for every market and every --seed
FOLLOW_PROB = 0.65
FOLLOW_UPS_PER_CATEGORY = 3
DORMANT_PROB = 0.08  # chance that a purchase is followed by a long pause
DORMANT_FACTOR = 8.0

_MARKETS = {  # market name -> (seed of its own draws, start of its timeline, mean gap in days, currency, country)
    "source": (11, datetime(2025, 1, 1, tzinfo=timezone.utc), 7.0, "EUR", "DE"),
    "target": (23, datetime(2025, 6, 1, tzinfo=timezone.utc), 5.0, "EUR", "FR"),
}


@dataclass(frozen=True)
class Regime:
    popularity: np.ndarray  # (C,) sums to 1
    transitions: np.ndarray  # (C, C) rows sum to 1
    price_multiplier: np.ndarray  # (C,)
    booming: np.ndarray  # (C,) bool: categories whose fans come back sooner (after a drift)


def _world() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(WORLD_SEED)
    n = len(CATEGORIES)
    base_price = np.exp(rng.normal(2.5, 1.0, n))
    transitions = np.full((n, n), 0.02)
    for c in range(n):
        follow = rng.choice([k for k in range(n) if k != c], FOLLOW_UPS_PER_CATEGORY, replace=False)
        transitions[c, follow] += rng.dirichlet(np.ones(FOLLOW_UPS_PER_CATEGORY)) * 3.0
    return base_price, transitions / transitions.sum(axis=1, keepdims=True)


def _market_regime(market: Market, transitions: np.ndarray) -> Regime:
    rng = np.random.default_rng(_MARKETS[market][0])
    n = len(CATEGORIES)
    return Regime(
        popularity=rng.dirichlet(np.full(n, 0.7)),
        transitions=transitions,
        price_multiplier=np.exp(rng.normal(0.0, 0.25, n)),
        booming=np.zeros(n, dtype=bool),
    )


def _drifted(regime: Regime, market: Market) -> Regime:
    rng = np.random.default_rng(_MARKETS[market][0] + 1000)
    n = len(CATEGORIES)
    rewired = regime.transitions.copy()
    for c in rng.choice(n, n // 2, replace=False):
        rewired[c] = regime.transitions[c][rng.permutation(n)]
    prices = regime.price_multiplier.copy()
    prices[rng.choice(n, n // 4, replace=False)] *= 1.4
    popularity = np.roll(regime.popularity, n // 3)
    return Regime(
        popularity=popularity,
        transitions=rewired,
        price_multiplier=prices,
        booming=popularity >= np.sort(popularity)[-n // 4],
    )


def generate_events(
    events: int, users: int | None = None, market: Market = "source", drift_at: int | None = None, seed: int = 0
) -> Iterator[dict]:
    """Yield `events` purchase events (contract field names) in event-time order."""
    if events < 1:
        raise ValueError("events must be >= 1")
    users = users or max(50, events // 30)
    if users < 1:
        raise ValueError("users must be >= 1")
    base_price, transitions = _world()
    regime = _market_regime(market, transitions)
    _, start, mean_gap_days, currency, country = _MARKETS[market]
    rng = np.random.default_rng([seed, _MARKETS[market][0]])
    n = len(CATEGORIES)

    taste = rng.dirichlet(regime.popularity * 8.0 + 0.05, size=users)
    price_level = np.exp(rng.normal(0.0, 0.3, users))
    rhythm_days = mean_gap_days * np.exp(rng.normal(0.0, 0.8, users))
    last_category = rng.choice(n, size=users, p=regime.popularity)
    # Every user's first purchase falls somewhere in their first gap.
    queue = [(float(rng.uniform(0, rhythm_days[u] * 86400)), u) for u in range(users)]
    heapq.heapify(queue)

    for index in range(events):
        if drift_at is not None and index == drift_at:
            regime = _drifted(regime, market)
            shift = (regime.popularity + 0.02) / (_market_regime(market, transitions).popularity + 0.02)
            taste = taste * shift
            taste /= taste.sum(axis=1, keepdims=True)
        offset_s, u = heapq.heappop(queue)
        if rng.random() < FOLLOW_PROB:
            weights = regime.transitions[last_category[u]] * np.sqrt(taste[u] + 1e-3)
        else:
            weights = taste[u]
        category = _draw(weights, rng)
        last_category[u] = category
        price = base_price[category] * regime.price_multiplier[category] * price_level[u] * np.exp(rng.normal(0, 0.15))
        ts = start + timedelta(seconds=offset_s)
        yield {
            "event_id": f"{market}-{seed}-{index:09d}",
            "user_id": f"{market[0]}{seed}-u{u:06d}",
            "item_id": f"{CATEGORIES[category]}-{int(rng.zipf(1.6)) % 500:03d}",
            "category": CATEGORIES[category],
            "price": round(float(price), 2) or 0.01,
            "quantity": int(rng.geometric(0.7)),
            "currency": currency,
            "ts": ts.isoformat().replace("+00:00", "Z"),
            "country": country,
            "channel": "app" if rng.random() < 0.55 else "web",
        }
        # After a drift, a fan of a booming category (by their last purchase) comes back twice as fast.
        speed = (0.5 if regime.booming[category] else 1.5) if regime.booming.any() else 1.0
        gap_days = rng.gamma(3.0, rhythm_days[u] * speed / 3.0)
        if rng.random() < DORMANT_PROB:
            gap_days *= DORMANT_FACTOR
        heapq.heappush(queue, (offset_s + gap_days * 86400, u))


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to `weights` (faster than rng.choice per call)."""
    cumulative = np.cumsum(weights)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(weights) - 1)


def write_events(path: Path, **kwargs) -> int:
    """Write generated events as JSON lines; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as out:
        for event in generate_events(**kwargs):
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
            count += 1
    return count
