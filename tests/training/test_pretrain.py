"""Pretraining's examples: the training part is read again from later starts, as a worker started there sees it;
users idle for longer than the memory asked for are forgotten."""
import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from streamadapt.core.features import USER_MEMORY_DAYS, FeatureSpec
from streamadapt.schemas import PurchaseEvent
from streamadapt.training.pretrain import (
    RESTART_WEIGHT,
    RESTARTS,
    build_examples,
    category_spec,
    implausible_validation,
    restarted,
    validation_problem,
)

SPEC = FeatureSpec(("books",))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def purchase(user: str, day: float) -> PurchaseEvent:
    return PurchaseEvent(event_id=f"{user}-{day}", user_id=user, item_id="i", category="books", price=5.0, quantity=1,
                         ts=T0 + timedelta(days=day))


def test_a_returning_customer_is_also_shown_as_a_worker_started_later_sees_them():
    # "r" buys every 10 days from day 0 to day 100; "n" buys once, on day 99. Settled (30-day horizon, the
    # file's end as the watermark): r's purchases of days 0 to 60; the training part is days 0 to 40.
    ordered = sorted([purchase("r", day) for day in range(0, 101, 10)] + [purchase("n", 99)], key=lambda e: e.ts)
    examples = build_examples(ordered, SPEC, "repurchase", 30.0)
    assert (examples.ts_s - ordered[0].ts_s).tolist() == [day * 86400.0 for day in range(0, 61, 10)]
    split = len(examples.labels) - 2
    features, labels, weights = restarted(ordered, examples, split, SPEC, "repurchase", 30.0)
    names = SPEC.feature_names()
    first, observed = (features[:, names.index(name)] for name in ("is_first_purchase", "log_days_observed"))
    read_from_start = slice(0, split)
    assert first[read_from_start].tolist() == [1.0] + [0.0] * (split - 1)  # only day 0 is a first purchase
    assert len(labels) > split and len(labels) == len(features)
    # the later starts (days 10, 20 and 30) first meet "r" on those days, as new
    again = slice(split, None)
    assert int(first[again].sum()) == RESTARTS - 1
    assert np.allclose(observed[again][first[again] == 1.0], 0.0)
    # and read up to day 40 only: the longest watch is from day 10 to day 40
    assert observed[again].max() == np.float32(math.log1p(30))
    np.testing.assert_array_equal(labels[again], np.concatenate([examples.labels[k:split] for k in (1, 2, 3)]))
    assert weights[read_from_start].tolist() == [1.0] * split and set(weights[again].tolist()) == {RESTART_WEIGHT}


def test_the_memory_asked_for_is_the_checkpoints_and_forgets_in_its_examples():
    events = [purchase("a", 0), purchase("a", 45), purchase("a", 50)]
    assert category_spec(events).user_memory_days == USER_MEMORY_DAYS
    assert category_spec(events).observed_cap_days == 50.0  # the file's span: no longer watch was trained on
    short = category_spec(events, user_memory_days=30.0)
    assert short.user_memory_days == 30.0 and short.categories == ("books",)
    first = short.feature_names().index("is_first_purchase")
    # the examples are the first two purchases (the third has no next one); the second comes after 45 idle days
    assert build_examples(events, short, "next_category", 7.0).features[:, first].tolist() == [1.0, 1.0]
    assert build_examples(events, SPEC, "next_category", 7.0).features[:, first].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("file_days, horizon_days, settled_days", [
    (100, 30, 69),   # days 0 to 99: every purchase more than a horizon before day 99
    (45, 30, 14),    # a file shorter than two horizons: its first part only
    (32, 30, 1),
    (20, 30, 0),     # shorter than one horizon: nothing (pretrain then refuses with one line)
])
def test_repurchase_examples_are_the_settled_purchases_only(file_days, horizon_days, settled_days):
    """A buyer every day (every label positive) and one every 40 days: in the file's last horizon only
    positives are known, and keeping them would teach that everybody comes back."""
    events = sorted([purchase("daily", day) for day in range(file_days)] +
                    [purchase("rare", day) for day in range(0, file_days, 40)], key=lambda e: e.ts)
    examples = build_examples(events, SPEC, "repurchase", float(horizon_days))
    last = events[-1].ts_s
    assert np.all(examples.ts_s + horizon_days * 86400.0 < last)
    daily = sum(1 for e in events if e.user_id == "daily" and e.ts_s + horizon_days * 86400.0 < last)
    assert daily == settled_days
    assert len(examples.labels) == daily + sum(1 for e in events if e.user_id == "rare"
                                               and e.ts_s + horizon_days * 86400.0 < last)


def test_next_category_examples_need_only_a_next_purchase():
    events = [purchase("a", 0), purchase("a", 1), purchase("b", 2)]
    assert len(build_examples(events, SPEC, "next_category", 7.0).labels) == 1


@pytest.mark.parametrize("labels, n_classes, problem", [
    (np.zeros(150, np.int64), 2, "has 150 examples, under 200"),
    (np.ones(500, np.int64), 2, "has one label"),
    (np.r_[np.zeros(490), np.ones(10)].astype(np.int64), 2, "has 490 negatives and 10 positives; it needs 20 of each"),
    (np.r_[np.zeros(480), np.ones(20)].astype(np.int64), 2, None),
    (np.arange(300) % 5, 6, None),  # classes of the vocabulary that never come up are no problem
])
def test_a_validation_part_that_cannot_measure_a_model_is_named(labels, n_classes, problem):
    found = validation_problem(labels, n_classes)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize("training_loss, validation_losses, warned", [
    (0.6, np.full(1000, 0.001), "near perfect"),           # the censored pretraining of before: accuracy 1.0
    (0.6, np.random.default_rng(0).exponential(0.3, 3000), "far better than on the training part"),
    (0.6, np.random.default_rng(1).exponential(0.58, 3000), None),  # a little better: chance, or an easier month
    (0.6, np.random.default_rng(2).exponential(0.8, 3000), None),   # worse than training, as usual
])
def test_validation_better_than_training_makes_plausible_is_warned_about(training_loss, validation_losses, warned):
    warnings = implausible_validation(training_loss, validation_losses)
    assert (warnings == []) if warned is None else (len(warnings) == 1 and warned in warnings[0])
