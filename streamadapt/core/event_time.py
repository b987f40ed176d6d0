"""Event time in epoch seconds as an aware UTC datetime, for every float: a log line or a model version's
record must never fail on a time, whatever a stored example or a detector hands it."""
from __future__ import annotations

import math
from datetime import datetime, timezone

_EARLIEST_S = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()  # a day inside datetime's range on each side
_LATEST_S = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()


def utc_datetime(ts_s: float) -> datetime:
    """`ts_s` as a UTC datetime; clamped to the years 1 to 9999, and NaN read as the epoch."""
    ts_s = float(ts_s)
    if math.isnan(ts_s):
        ts_s = 0.0
    return datetime.fromtimestamp(min(max(ts_s, _EARLIEST_S), _LATEST_S), tz=timezone.utc)
