import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamadapt.core.examples import (
    Example,
    expired_windows,
    recency_weights,
    window_start,
)


def test_example_round_trips_through_bytes():
    pending = Example("e-1", 1.7e9, "v3", np.arange(5, dtype=np.float32), np.array([0.2, 0.8], np.float32))
    example = pending.with_label(1, 1.7e9 + 3600)
    back = Example.decode(example.encode())
    assert (back.event_id, back.ts_s, back.model_version, back.label, back.resolved_ts_s) == ("e-1", 1.7e9, "v3", 1,
                                                                                             1.7e9 + 3600)
    np.testing.assert_array_equal(back.features, example.features)
    np.testing.assert_array_equal(back.probabilities, example.probabilities)
    assert (pending.label, pending.resolved_ts_s) == (-1, None)
    assert Example.decode(pending.encode()).resolved_ts_s is None


def test_corrupt_example_is_refused():
    raw = Example("e", 1.0, "v", np.ones(3, np.float32), np.ones(2, np.float32)).encode()
    with pytest.raises(ValueError):
        Example.decode(raw[:-4])


@pytest.mark.parametrize("ts_s, window_s, start", [
    (0, 3600, 0), (3599.9, 3600, 0), (3600, 3600, 3600), (86400 * 3 + 5, 86400, 86400 * 3), (-1, 60, -60),
])
def test_window_start(ts_s, window_s, start):
    assert window_start(ts_s, window_s) == start


@given(st.floats(-1e9, 1e10, allow_subnormal=False), st.integers(1, 10**6))
def test_every_time_falls_in_its_window(ts_s, window_s):
    start = window_start(ts_s, window_s)
    assert start <= ts_s < start + window_s


@pytest.mark.parametrize("watermark, expected", [(100, []), (250, [0]), (350, [0, 100]), (10_000, [0, 100, 200])])
def test_expired_windows_by_watermark(watermark, expected):
    assert expired_windows([0, 100, 200], known_until_s=watermark, window_s=100, max_age_s=150) == expected


def test_recency_weights_halve_per_half_life_and_average_one():
    weights = recency_weights(np.array([0.0, 10.0, 20.0]), half_life_s=10.0)
    assert weights[2] / weights[1] == pytest.approx(2.0) and weights[1] / weights[0] == pytest.approx(2.0)
    assert weights.mean() == pytest.approx(1.0)
    assert len(recency_weights(np.array([]), 10.0)) == 0
