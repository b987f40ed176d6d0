import pytest

from worker.labels import next_of_same_user, repurchase_label

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


from worker.labels import resolve_on_purchase, watermark  # noqa: E402, next_of_same_user


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
