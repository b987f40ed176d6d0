import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamadapt.core.examples import expired_windows, window_start
from streamadapt.core.labels import (
    active_partitions,
    next_of_same_user,
    repurchase_label,
    resolve_on_purchase,
    settled,
    watermark,
)

DAY = 86400.0


@pytest.mark.parametrize("next_ts, watermark, expected", [
    (3 * DAY, 3 * DAY, "1"),          # next purchase inside the horizon resolves positive at once
    (7 * DAY, 7 * DAY, "1"),          # exactly at the deadline still counts
    (None, 6 * DAY, None),            # no purchase yet and the deadline is ahead: unresolved
    (None, 7 * DAY, None),            # watermark at the deadline: not yet past it
    (None, 7 * DAY + 1, "0"),         # watermark past the deadline: negative
    (9 * DAY, 9 * DAY, "0"),          # next purchase came, but too late
    (9 * DAY, 6 * DAY, None),         # ...and the watermark has not passed the deadline: still open
])
def test_repurchase_label(next_ts, watermark, expected):
    assert repurchase_label(0.0, next_ts, watermark, horizon_days=7) == expected


@pytest.mark.parametrize("ts_days, horizon_days, watermark_days, expected", [
    (0.0, 7.0, 8.0, True),        # the deadline (day 7) is behind the watermark: whatever happens, the label stands
    (0.0, 7.0, 7.0, False),       # a watermark at the deadline has not passed it (as repurchase_label)
    (0.0, 7.0, 3.0, False),       # a positive may be known already, a negative cannot: not usable either way
    (16.0, 30.0, 45.0, False),    # a file of 45 days with a 30-day horizon settles only its first 15 days
    (14.0, 30.0, 45.0, True),
    (0.0, 90.0, 60.0, False),     # a file shorter than the horizon settles nothing
    (50.0, None, 50.0, True),     # without a horizon every resolved label is settled
])
def test_settled(ts_days, horizon_days, watermark_days, expected):
    assert settled(ts_days * DAY, horizon_days, watermark_days * DAY) is expected


def test_settled_takes_arrays():
    mask = settled(np.array([0.0, 10.0, 20.0]) * DAY, 15.0, 30.0 * DAY)
    assert mask.tolist() == [True, True, False]
    assert settled(np.array([0.0, 99.0]), None, 0.0).tolist() == [True, True]


@pytest.mark.parametrize("task, gap_days, purchase_class, expected", [
    ("next_category", 30.0, 4, 4),
    ("repurchase", 2.0, 4, 1),
    ("repurchase", 7.0, 4, 1),
    ("repurchase", 7.5, 4, 0),   # the next purchase came after the deadline: a negative
])
def test_resolve_on_purchase(task, gap_days, purchase_class, expected):
    assert resolve_on_purchase(task, 0.0, gap_days * DAY, purchase_class, 7.0) == expected


@pytest.mark.parametrize("newest, expected", [
    ({}, None),
    ({"t/0": 1000.0}, 940.0),
    ({"t/0": 1000.0, "t/1": 400.0, "t/2": 5000.0}, 340.0),  # the slowest partition holds it back
])
def test_watermark_is_the_slowest_partition_less_the_lateness(newest, expected):
    assert watermark(newest, 60.0) == expected


def test_next_of_same_user_points_at_each_users_following_event():
    assert next_of_same_user(["a", "b", "a", "c", "b", "a"]) == [2, 4, 5, -1, -1, -1]
    assert next_of_same_user([]) == []


# Properties of the label and window rules over generated inputs (Hypothesis).
times = st.floats(0, 1e10, allow_nan=False, allow_infinity=False)


@given(st.lists(st.sampled_from("abcde"), max_size=60))
def test_next_of_same_user_points_at_the_users_very_next_event(users):
    following = next_of_same_user(users)
    for i, j in enumerate(following):
        later = [k for k in range(i + 1, len(users)) if users[k] == users[i]]
        assert j == (later[0] if later else -1)


@given(times, st.none() | times, times, st.floats(0.01, 365))
def test_repurchase_label_is_decided_only_when_the_stream_can_tell(ts_s, next_ts_s, watermark_s, horizon_days):
    deadline_s = ts_s + horizon_days * 86400.0
    label = repurchase_label(ts_s, next_ts_s, watermark_s, horizon_days)
    if next_ts_s is not None and next_ts_s <= deadline_s:
        assert label == "1"
    elif watermark_s > deadline_s:
        assert label == "0"  # the horizon has passed with no purchase in it
    else:
        assert label is None  # a purchase may still come before the deadline
    # a later watermark never changes a decided label, and decides an undecided one eventually
    assert repurchase_label(ts_s, next_ts_s, max(watermark_s, deadline_s + 1.0), horizon_days) in (label, "0")


@given(st.dictionaries(st.text(min_size=1, max_size=5), times, max_size=8), st.floats(0, 1e6))
def test_the_watermark_never_passes_the_slowest_partition(newest, lateness_s):
    mark = watermark(newest, lateness_s)
    if not newest:
        assert mark is None
    else:
        assert mark == min(newest.values()) - lateness_s and all(mark <= ts for ts in newest.values())


@given(st.lists(st.integers(0, 10**6), max_size=30, unique=True), st.integers(0, 2 * 10**6), st.integers(1, 10**5),
       st.integers(0, 10**5))
def test_a_window_expires_exactly_when_its_end_plus_max_age_is_behind_its_labels_known_time(starts, mark, window_s,
                                                                                          max_age_s):
    starts = sorted({window_start(s, window_s) for s in starts})
    expired = set(expired_windows(starts, mark, window_s, max_age_s))
    for start in starts:
        assert (start in expired) == (start + window_s + max_age_s <= mark)


def test_an_idle_partition_stops_holding_the_watermark_back_unless_every_partition_is_idle():
    newest = {"in/0": 1000.0, "in/1": 5000.0, "in/2": 4000.0}
    seen_at = {"in/0": 0.0, "in/1": 990.0, "in/2": 995.0}  # in/0 brought nothing for 1,000 s of wall clock
    assert active_partitions(newest, seen_at, now_s=1000.0, idle_timeout_s=600.0) == {"in/1": 5000.0, "in/2": 4000.0}
    assert watermark(active_partitions(newest, seen_at, 1000.0, 600.0), 0.0) == 4000.0
    assert active_partitions(newest, seen_at, now_s=1000.0, idle_timeout_s=2000.0) == newest
    assert active_partitions(newest, {p: 0.0 for p in newest}, now_s=1000.0, idle_timeout_s=600.0) == newest
    assert active_partitions(newest, {}, now_s=1000.0, idle_timeout_s=600.0) == newest  # never timed: active
