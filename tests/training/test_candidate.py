"""Which examples a round trains on, and when the next round is due."""
import math

import numpy as np

from streamadapt.core.examples import Example, labels_known_until
from streamadapt.settings import TrainingSettings
from streamadapt.training.candidate import (
    by_label_time,
    examples_before_next_round,
    known_at,
    newest_trainable_ts,
    regime_examples,
    resolved_period,
    round_examples,
)


def example(ts_s, resolved_ts_s):
    return Example(f"e{ts_s}", ts_s, "v1", np.zeros(2, np.float32), np.array([0.5, 0.5], np.float32), 1, resolved_ts_s)


def test_a_round_trains_on_the_examples_labelled_since_the_estimated_change():
    examples = [example(10.0, 15.0), example(20.0, 28.0), example(30.0, 31.0), example(40.0, 45.0)]
    assert regime_examples(examples, None, "next_category") == examples
    # served at 20, before the change at 25, but labelled at 28 under the new regime: it counts
    assert [e.ts_s for e in regime_examples(examples, 25.0, "next_category")] == [20.0, 30.0, 40.0]
    assert [e.ts_s for e in regime_examples(examples, 31.0, "next_category")] == [30.0, 40.0]
    assert regime_examples(examples, 99.0, "next_category") == []


def test_a_repurchase_round_takes_the_purchases_made_since_the_change_whatever_their_labels_time():
    """A negative's label is known at its deadline, a positive's at the next purchase: choosing by the label's
    time would choose the negatives of purchases made before the change, and the positives after it."""
    negative_before = example(10.0, 40.0)._replace(label=0)
    positive_before = example(12.0, 20.0)
    after = [example(30.0, 35.0), example(31.0, 61.0)._replace(label=0)]
    assert regime_examples([negative_before, positive_before, *after], 25.0, "repurchase") == after


def test_after_a_round_short_of_examples_the_next_waits_only_for_the_shortfall():
    training = TrainingSettings(min_examples=1000, every_examples=2000)
    assert examples_before_next_round(300, training) == 700
    assert examples_before_next_round(1000, training) == 2000
    assert examples_before_next_round(15000, training) == 2000


def test_repurchase_rounds_keep_only_event_time_the_watermark_has_fully_resolved():
    day = 86400.0
    examples = [example(0.0, 1.0), example(2 * day, 2 * day + 5), example(6 * day, 6 * day + 5)]
    # horizon 3 days, watermark at day 6: purchases up to day 3 have had their whole horizon
    assert [e.ts_s for e in resolved_period(examples, "repurchase", 3.0, 6 * day)] == [0.0, 2 * day]
    # as streamadapt.core.labels.settled: a deadline exactly at the watermark is not past yet
    assert [e.ts_s for e in resolved_period(examples, "repurchase", 4.0, 6 * day)] == [0.0]
    assert resolved_period(examples, "repurchase", 3.0, None) == []  # no event time seen yet: nothing is resolved
    assert resolved_period(examples, "next_category", None, 0.0) == examples  # its labels carry no such bias


def test_labels_are_known_up_to_the_watermark_and_for_repurchase_up_to_a_horizon_before_it():
    day = 86400.0
    assert labels_known_until("repurchase", 30.0, 40 * day) == 10 * day
    assert labels_known_until("next_category", None, 40 * day) == 40 * day
    assert labels_known_until("repurchase", 30.0, None) is None
    # what a round may train on: repurchase up to that time (nothing before any event time); other tasks, all
    assert newest_trainable_ts("repurchase", 30.0, 40 * day) == 10 * day
    assert newest_trainable_ts("repurchase", 30.0, None) == -math.inf
    assert newest_trainable_ts("next_category", None, 40 * day) == math.inf


def test_a_round_takes_the_newest_max_examples_of_the_resolved_period_not_of_all_it_is_given():
    day = 86400.0
    examples = [example(k * day, k * day + 5) for k in range(10)]
    # horizon 3 days, watermark day 9: days 0 to 5 are resolved (day 6's deadline is the watermark itself), and
    # the newest 2 of those are 4 and 5
    taken = round_examples(examples, None, "repurchase", 3.0, 9 * day, max_examples=2)
    assert [e.ts_s / day for e in taken] == [4.0, 5.0]
    assert [e.ts_s / day for e in round_examples(examples, 7.5 * day, "next_category", None, 9 * day, 5)] == [8.0, 9.0]


def test_a_repurchase_regime_too_young_to_have_settled_labels_leaves_the_round_the_window_before_it():
    day = 86400.0
    examples = [example(k * day, k * day + 5) for k in range(10)]
    # horizon 3 days, watermark day 9: days 0 to 5 are settled; a change estimated at day 4 has two of them
    assert [e.ts_s / day for e in round_examples(examples, 4 * day, "repurchase", 3.0, 9 * day, 20, 2)] == [4.0, 5.0]
    assert [e.ts_s / day for e in round_examples(examples, 4 * day, "repurchase", 3.0, 9 * day, 20, 3)] == [
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    # next_category's regime fills within days: it is never widened
    assert [e.ts_s / day for e in round_examples(examples, 7.5 * day, "next_category", None, 9 * day, 20, 5)] == [8.0, 9.0]


def test_a_next_category_round_holds_out_the_labels_known_last_not_the_newest_purchases():
    # Customers who come back within a day buy class 0 next; those who come back after a month buy class 1.
    # Among the newest purchases only the quick returners' labels are known yet: held out by purchase time,
    # the holdout would be all class 0. Held out by when the labels became known, it has both.
    day = 86400.0
    rng = np.random.default_rng(0)
    examples = []
    for n in range(2000):
        quick = n % 2 == 0
        ts = rng.uniform(0, 90) * day
        examples.append(Example(f"e{n}", ts, "v", np.zeros(2, np.float32), np.array([0.5, 0.5], np.float32),
                                0 if quick else 1, ts + (0.5 * day if quick else 30 * day)))
    watermark = 90 * day
    known = sorted((e for e in examples if e.resolved_ts_s <= watermark), key=lambda e: e.ts_s)
    holdout = len(known) // 5
    assert np.mean([e.label for e in known[-holdout:]]) < 0.1  # by purchase time: nearly all quick returners
    in_order = by_label_time(known)
    assert sorted(e.event_id for e in in_order) == sorted(e.event_id for e in known)
    assert 0.35 < np.mean([e.label for e in in_order[-holdout:]]) < 0.65  # by label time: the stream's mix
    assert all(a.resolved_ts_s <= b.resolved_ts_s for a, b in zip(in_order, in_order[1:]))


def test_unsettled_purchases_are_taken_as_the_stream_stood_at_the_watermark():
    """Serving may have run past the round's watermark: what it saw later is not evidence at the watermark."""
    def purchase(event_id, ts_s, label=-1, resolved_ts_s=None):
        return Example(event_id, ts_s, "v1", np.zeros(2, np.float32), np.array([0.5, 0.5], np.float32), label,
                       resolved_ts_s)

    recent = [purchase("pending", 10.0), purchase("back before", 20.0, 1, 50.0),
              purchase("back after", 30.0, 1, 150.0), purchase("made after", 120.0, 1, 130.0)]
    known = {e.event_id: (e.label, e.resolved_ts_s) for e in known_at(recent, watermark_s=100.0)}
    assert known == {"pending": (-1, None), "back before": (1, 50.0), "back after": (-1, None)}
    assert known_at(recent, None) == []
