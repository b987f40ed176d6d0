import math
from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st

from streamadapt.core.event_time import utc_datetime


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_every_float_is_a_utc_datetime_and_a_time_in_range_is_itself(ts_s):
    moment = utc_datetime(ts_s)
    assert moment.tzinfo is timezone.utc
    if not math.isnan(ts_s) and -62_135_000_000 < ts_s < 253_402_000_000:
        assert abs(moment.timestamp() - ts_s) < 1e-3  # datetime keeps microseconds


def test_nan_is_the_epoch_and_the_ends_are_clamped():
    assert utc_datetime(float("nan")) == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert utc_datetime(-1e300).year == 1 and utc_datetime(1e300).year == 9999
