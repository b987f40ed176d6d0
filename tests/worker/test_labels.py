import pytest

from worker.labels import repurchase_label

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
