import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamadapt.core.quality import (
    PageHinkley,
    QualityMonitor,
    auc,
    auc_difference,
    brier,
    log_loss,
    scores,
)


def brute_force_auc(p, y):
    pairs = [(a, b) for a, b in itertools.product(range(len(y)), repeat=2) if y[a] == 1 and y[b] == 0]
    return sum(1.0 if p[a] > p[b] else 0.5 if p[a] == p[b] else 0.0 for a, b in pairs) / len(pairs)


@given(st.lists(st.tuples(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), st.integers(0, 1)), min_size=2, max_size=40))
def test_auc_matches_pairwise_definition_with_ties(rows):
    p, y = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    if y.min() == y.max():
        assert np.isnan(auc(p, y))
    else:
        assert auc(p, y) == pytest.approx(brute_force_auc(p, y))


def test_known_values():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    labels = np.array([0, 1])
    assert log_loss(probabilities, labels) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)
    assert brier(probabilities[:, 1], labels) == pytest.approx((0.01 + 0.04) / 2)
    assert scores("repurchase", probabilities, labels)["auc"] == 1.0
    assert set(scores("next_category", probabilities, labels)) == {"log_loss", "accuracy"}


def test_page_hinkley_is_quiet_on_a_stationary_stream_and_alarms_on_a_shift():
    rng = np.random.default_rng(7)
    detector = PageHinkley()
    assert all(detector.update(v) is None for v in rng.exponential(1.0, 20_000))
    alarms = [i for i, v in enumerate(rng.exponential(2.0, 3000)) if detector.update(v) is not None]
    assert alarms and alarms[0] < 1500
    assert detector.update(float("nan")) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_page_hinkley_estimates_where_the_shift_began(seed):
    """Marks are event times; the alarm comes hundreds of values after the shift, and names its start."""
    rng = np.random.default_rng(seed)
    detector = PageHinkley()
    values = np.concatenate([rng.exponential(1.0, 5000), rng.exponential(1.8, 3000)])
    changes = [(i, change) for i, v in enumerate(values) if (change := detector.update(v, mark=1000.0 + i)) is not None]
    alarm_at, change = changes[0]
    assert alarm_at > 5100  # the detector needed evidence
    assert abs(change - (1000.0 + 5000)) < 150  # but it dates the shift close to where it began


def test_the_change_is_dated_by_the_earliest_shifted_value_when_values_arrive_out_of_time_order():
    """Two partitions read in turns of 500 values, one running an hour of event time ahead of the other.
    The shift at event time 5,000 s shows first in the partition ahead; dating it by that partition's
    times would cut away the shifted values the other partition has yet to deliver. The estimate may
    be early (the examples it keeps then include some of the old regime), never late."""
    rng = np.random.default_rng(4)
    detector = PageHinkley()
    changes = []
    for turn in range(30):
        for lead_s in (0.0, 3600.0):
            for t in range(turn * 500, turn * 500 + 500):
                value = rng.exponential(1.8 if t + lead_s >= 5000 else 1.0)
                if (change := detector.update(value, mark=t + lead_s)) is not None:
                    changes.append(change)
    assert changes and all(change <= 5000 for change in changes)


def test_quality_monitor_tracks_a_bounded_number_of_versions():
    monitor = QualityMonitor("repurchase", window=3, max_versions=2)
    for version in ("a", "b", "c"):
        for label in (0, 1, 1, 1):
            monitor.observe(version, np.array([0.3, 0.7]), label, resolved_ts_s=0.0)
    snapshot = monitor.snapshot()
    assert set(snapshot) == {"b", "c"}
    assert snapshot["c"]["accuracy"] == 1.0  # only the last 3 of 4 are kept


@given(st.lists(st.tuples(st.sampled_from([0.1, 0.3, 0.5]), st.sampled_from([0.2, 0.4, 0.6]), st.integers(0, 1)),
                min_size=2, max_size=40))
def test_auc_difference_is_the_difference_of_the_aucs(rows):
    a, b, y = (np.array([r[k] for r in rows]) for k in range(3))
    difference, standard_error = auc_difference(a, b, y)
    if y.min() == y.max():
        assert np.isnan(difference) and np.isnan(standard_error)
    else:
        assert difference == pytest.approx(brute_force_auc(a, y) - brute_force_auc(b, y))
        assert standard_error >= 0.0


def test_the_standard_error_of_an_auc_difference_matches_the_bootstrap():
    rng = np.random.default_rng(5)
    y = rng.random(2000) < 0.3
    first, second = y + rng.normal(0, 1.2, 2000), y + rng.normal(0, 1.3, 2000)
    _, standard_error = auc_difference(first, second, y)
    draws = [auc(first[i], y[i].astype(int)) - auc(second[i], y[i].astype(int))
             for i in (rng.integers(0, 2000, 2000) for _ in range(300))]
    assert standard_error == pytest.approx(np.std(draws), rel=0.2)
    assert auc_difference(first, first, y) == (0.0, 0.0)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
def test_page_hinkley_judges_in_the_streams_own_standard_deviations(scale):
    """A binary log-loss varies about a tenth of what a multiclass one does: the same shift in standard
    deviations alarms alike, and neither scale alarms on noise."""
    rng = np.random.default_rng(11)
    detector = PageHinkley()
    quiet = rng.normal(1.0, 1.0, 20_000) * scale
    assert all(detector.update(v) is None for v in quiet)
    alarms = [i for i, v in enumerate(rng.normal(1.5, 1.0, 3000) * scale) if detector.update(v) is not None]
    assert alarms and alarms[0] < 1500


def test_after_an_alarm_the_detector_stays_quiet_for_its_cooldown():
    rng = np.random.default_rng(12)
    detector = PageHinkley(min_samples=100, cooldown=3000)
    values = np.concatenate([rng.normal(0, 1, 1000), rng.normal(2, 1, 200), rng.normal(4, 1, 200), rng.normal(6, 1, 4000)])
    alarms = [i for i, v in enumerate(values) if detector.update(v) is not None]
    assert alarms and all(b - a >= 3000 for a, b in zip(alarms, alarms[1:]))
