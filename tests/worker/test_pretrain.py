"""Pretraining's examples: the training part is read again from later starts, as a worker started there sees it;
users idle for longer than the memory asked for are forgotten."""
import math
from datetime import datetime, timedelta, timezone

import numpy as np

from schemas import PurchaseEvent
from worker.features import USER_MEMORY_DAYS, FeatureSpec
from worker.pretrain import RESTARTS, build_examples, category_spec, restarted

SPEC = FeatureSpec(("books",))
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def purchase(user: str, day: float) -> PurchaseEvent:
    return PurchaseEvent(event_id=f"{user}-{day}", user_id=user, item_id="i", category="books", price=5.0, quantity=1,
                         ts=T0 + timedelta(days=day))


def test_a_returning_customer_is_also_shown_as_a_worker_started_later_sees_them():
    # "r" buys every 10 days from day 0 to day 100; "n" buys once, on day 99. Labelled (30-day horizon, the
    # file's end as the watermark): r's purchases of days 0 to 90; the training part is days 0 to 70.
    ordered = sorted([purchase("r", day) for day in range(0, 101, 10)] + [purchase("n", 99)], key=lambda e: e.ts)
    examples = build_examples(ordered, SPEC, "repurchase", 30.0)
    split = len(examples.labels) - 2
    features, labels = restarted(ordered, examples, split, SPEC, "repurchase", 30.0)
    names = SPEC.feature_names()
    first, observed = (features[:, names.index(name)] for name in ("is_first_purchase", "log_days_observed"))
    read_from_start = slice(0, split)
    assert first[read_from_start].tolist() == [1.0] + [0.0] * (split - 1)  # only day 0 is a first purchase
    assert len(labels) > split and len(labels) == len(features)
    # the later starts (days 17.5, 35 and 52.5) first meet "r" on days 20, 40 and 60, as new
    again = slice(split, None)
    assert int(first[again].sum()) == RESTARTS - 1
    assert np.allclose(observed[again][first[again] == 1.0], 0.0)
    # and read up to day 70 only: the longest watch is from day 20 to day 70
    assert observed[again].max() == np.float32(math.log1p(50))
    np.testing.assert_array_equal(labels[again], np.concatenate([examples.labels[k:split] for k in (2, 4, 6)]))


def test_the_memory_asked_for_is_the_checkpoints_and_forgets_in_its_examples():
    events = [purchase("a", 0), purchase("a", 45), purchase("a", 50)]
    assert category_spec(events).user_memory_days == USER_MEMORY_DAYS
    short = category_spec(events, user_memory_days=30.0)
    assert short.user_memory_days == 30.0 and short.categories == ("books",)
    first = short.feature_names().index("is_first_purchase")
    # the examples are the first two purchases (the third has no next one); the second comes after 45 idle days
    assert build_examples(events, short, "next_category", 7.0).features[:, first].tolist() == [1.0, 1.0]
    assert build_examples(events, SPEC, "next_category", 7.0).features[:, first].tolist() == [1.0, 0.0]
