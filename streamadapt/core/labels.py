"""Label rules, shared by pretraining (on a file) and the worker (on the stream). Pure.

- next_category: the label of a purchase is the category of the same user's next purchase.
- repurchase: 1 when the user's next purchase falls within `horizon_days` of this one (event time);
  0 once the event-time watermark has passed the deadline with no purchase; unresolved before that.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from streamadapt.schemas import PurchaseEvent

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


def settled(ts_s, horizon_days: float | None, watermark_s: float):
    """Whether a purchase at `ts_s` (a float or an array) has a label that can no longer change: its deadline,
    `ts_s` plus the horizon, is behind the watermark. Only such examples may train or judge a binary model with
    a horizon, whatever their label: before the deadline a positive can be known (the user came back) and a
    negative cannot, so the unsettled ones are mostly positives, and learning from them teaches the model that
    everybody comes back. Without a horizon (next_category) every resolved label is settled.

    Pretraining calls it with the file's last event time as the watermark, the trainer and the gate with the
    stream's, and the adaptation benchmark with the replayed stream's.

    >>> settled(0.0, 7.0, 7 * 86400.0 + 1), settled(0.0, 7.0, 7 * 86400.0), settled(0.0, None, -1.0)
    (True, False, True)
    """
    if horizon_days is None:
        return np.full(np.shape(ts_s), True) if np.ndim(ts_s) else True
    return ts_s + horizon_days * 86400.0 < watermark_s  # as repurchase_label: a negative once the deadline is passed


def next_of_same_user(user_ids: Sequence[str]) -> list[int]:
    """For a stream in event-time order (given as its user ids): the index of each event's user's next
    event, or -1 when the user buys nothing more in it."""
    following = [-1] * len(user_ids)
    last: dict[str, int] = {}
    for i, user in enumerate(user_ids):
        previous = last.get(user)
        if previous is not None:
            following[previous] = i
        last[user] = i
    return following


def file_labels(ordered: Sequence[PurchaseEvent], task: Task, horizon_days: float) -> list[str | None]:
    """The label of each event of a file in event-time order, by the rules above, with the file's last
    event time as the watermark; None where the file leaves it unresolved."""
    watermark_s = ordered[-1].ts_s if ordered else 0.0
    labels: list[str | None] = []
    for event, j in zip(ordered, next_of_same_user([e.user_id for e in ordered])):
        following = ordered[j] if j >= 0 else None
        if task == "next_category":
            labels.append(following.category if following is not None else None)
        else:
            labels.append(repurchase_label(event.ts_s, following.ts_s if following is not None else None,
                                           watermark_s, horizon_days))
    return labels


def resolve_on_purchase(task: Task, pending_ts_s: float, purchase_ts_s: float, purchase_class: int,
                        horizon_days: float | None) -> int | None:
    """Label index that a user's new purchase gives their pending prediction, or None if it gives none.

    next_category: the new purchase's class. repurchase: 1 within the horizon; a purchase after the
    deadline resolves it as 0 (the watermark may not have passed the deadline yet).
    """
    if task == "next_category":
        return purchase_class
    label = repurchase_label(pending_ts_s, purchase_ts_s, purchase_ts_s, horizon_days or 0.0)
    return 1 if label == "1" else 0


def active_partitions(newest_by_partition: dict[str, float], seen_at_s: dict[str, float], now_s: float,
                      idle_timeout_s: float) -> dict[str, float]:
    """The partitions that count toward the watermark: those that brought an event within `idle_timeout_s`
    of wall-clock time (`seen_at_s`; a partition never timed counts as active). An idle partition would
    otherwise hold the watermark where its last event left it, for ever (Flink's watermark idleness). When
    every partition is idle, all count: nothing moves the watermark then anyway."""
    active = {partition: ts_s for partition, ts_s in newest_by_partition.items()
              if now_s - seen_at_s.get(partition, now_s) <= idle_timeout_s}
    return active or newest_by_partition


def watermark(newest_by_partition: dict[str, float], allowed_lateness_s: float) -> float | None:
    """Event time up to which the stream is taken as complete, or None before any event.

    Each input partition is in event-time order on its own, but partitions are read at different speeds:
    one may be hours of event time ahead of another. So the watermark is the *slowest* partition's newest
    event time, less the allowed lateness; a global maximum would expire deadlines of users whose
    partition lags behind and label their purchases negative before they arrive.
    """
    if not newest_by_partition:
        return None
    return min(newest_by_partition.values()) - allowed_lateness_s
