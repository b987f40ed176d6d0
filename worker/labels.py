"""Label rules, shared by pretraining (on a file) and the worker (on the stream). Pure.

- next_category: the label of a purchase is the category of the same user's next purchase.
- repurchase: 1 when the user's next purchase falls within `horizon_days` of this one (event time);
  0 once the event-time watermark has passed the deadline with no purchase; unresolved before that.
"""
from __future__ import annotations

from typing import Literal

Task = Literal["next_category", "repurchase"]
TASKS: tuple[Task, ...] = ("next_category", "repurchase")
BINARY_CLASSES = ("0", "1")  # repurchase: "1" = buys again within the horizon


def repurchase_label(ts_s: float, next_ts_s: float | None, watermark_s: float, horizon_days: float) -> str | None:
    """The repurchase label of a purchase at `ts_s`, or None while unresolved.

    `next_ts_s` is the user's next purchase time, if any has been seen; `watermark_s` is how far event time
    is known to have progressed.
    """
    deadline_s = ts_s + horizon_days * 86400.0
    if next_ts_s is not None and next_ts_s <= deadline_s:
        return "1"
    if watermark_s > deadline_s:
        return "0"
    return None
