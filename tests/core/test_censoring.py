"""What an unsettled repurchase label is worth: the share of repurchases that come within the time watched."""
import numpy as np
import pytest

from streamadapt.core import calibration
from streamadapt.core.censoring import exposure, repurchase_delays

DAY = 86400.0


def test_delays_are_those_of_the_settled_positives():
    ts = np.array([0.0, 10.0, 20.0, 30.0]) * DAY
    resolved = np.array([3.0, 40.0, 21.0, 35.0]) * DAY
    labels = np.array([1, 0, 1, 1])
    assert (repurchase_delays(ts, resolved, labels) / DAY).tolist() == [1.0, 3.0, 5.0]


@pytest.mark.parametrize("watched_days, expected", [
    (0.5, 0.2),       # shorter than any delay seen: the floor, 1 / (n + 1)
    (2.0, 0.25),      # delays of 1, 3, 5 and 20 days: a quarter come within 2 days
    (3.0, 0.5),       # at most the time watched
    (19.0, 0.75),
    (29.0, 1.0),      # every delay seen so far fits
    (31.0, 1.0),      # past the horizon (30 days): settled
])
def test_exposure_is_the_share_of_repurchases_that_come_within_the_time_watched(watched_days, expected):
    delays = np.array([1.0, 3.0, 5.0, 20.0]) * DAY
    assert exposure(np.array([100.0 * DAY - watched_days * DAY]), delays, 100.0 * DAY, 30.0)[0] == pytest.approx(expected)


def test_a_purchase_at_the_watermark_still_counts_a_little():
    delays = np.array([1.0, 3.0, 5.0, 20.0]) * DAY
    assert exposure(np.array([100.0 * DAY]), delays, 100.0 * DAY, 30.0)[0] == pytest.approx(1 / 5)


def test_unsettled_labels_counted_for_what_is_known_of_them_give_the_true_rate():
    """Purchases with a 40 % repurchase rate, half of them watched for only part of the horizon: taken as final,
    their "not yet" labels say about 35 %; counted by exposure they say 40 %, as the settled ones alone do."""
    rng = np.random.default_rng(0)
    n = 40_000
    positive = rng.random(n) < 0.4
    delay = rng.exponential(8.0, n).clip(0, 30.0)  # days from purchase to repurchase, within a 30-day horizon
    watched = np.where(rng.random(n) < 0.5, 60.0, rng.uniform(0, 30.0, n))
    seen = positive & (delay <= watched)
    delays = np.sort(delay[positive & (watched >= 30.0)]) * DAY
    exposed = exposure((100.0 - watched) * DAY, delays, 100.0 * DAY, 30.0)
    constant = np.tile([0.5, 0.5], (n, 1))
    naive = calibration.apply(constant[:1].astype(np.float32), calibration.fit(constant, seen.astype(int)))[0, 1]
    fitted = calibration.fit(constant, seen.astype(int), exposure=exposed)
    counted = calibration.apply(constant[:1].astype(np.float32), fitted)[0, 1]
    assert naive < 0.36 and counted == pytest.approx(0.4, abs=0.01)
