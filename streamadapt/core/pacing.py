"""Pacing a stream that is catching up: which input partitions serving pauses, and why.

Live, event time moves with the clock: the partitions stay close together, and a fine-tune round (seconds to
minutes) finishes long before the stream has moved on by an hour. A replayed log or a backlog moves through days
of event time in seconds. Left alone, one partition would run to its end while another starts, and every event
would be served before the first round finished. So a partition whose newest event time is more than `max_lag_s`
behind the clock (it is catching up) is paused while it runs more than `max_lag_s` of event time ahead of

- "align": the slowest active input partition of the fleet, so that the watermark, and the labels it settles,
  keep up with it;
- "round": where the trainer last began a round, while the next one is due or running. So a backlog of a
  busy stream, which moves by an hour of event time in a few seconds, waits for a round once an hour at most;
  a replayed log, whose hour is a few events, waits for every round it calls for;
- "swap": nothing, once the trainer has caught up, until this worker serves the champion it chose (it swaps
  between batches).

A partition within `max_lag_s` of the clock is live and never paused. Nothing here does I/O.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerProgress:
    """What the leading trainer publishes after each look at the stream."""

    through_s: float  # the stream's slowest active partition, in event time, when it last began (or skipped) a round
    next_round_examples: int  # the examples total at which its next round is due
    running: bool  # a round is running


@dataclass(frozen=True)
class TrainerView:
    """What serving reads to decide (streamadapt.serving.pacing reads it in two round trips)."""

    progress: TrainerProgress | None  # None until a trainer has published
    trainer_alive: bool  # the lease is held, or the trainer this worker started is starting
    examples_total: int
    drift_alarm_raised: bool
    champion: str | None  # None: no champion to wait for


def round_due(view: TrainerView, first_round_examples: int) -> bool:
    """A round is running, or the trainer would start one at its next look."""
    if view.drift_alarm_raised:
        return True
    if view.progress is None:
        return view.examples_total >= first_round_examples
    return view.progress.running or view.examples_total >= view.progress.next_round_examples


def partitions_to_pause(newest_s: Mapping[str, float], slowest_s: float | None, view: TrainerView | None,
                        now_s: float, max_lag_s: float, serving_version: str, first_round_examples: int
                        ) -> dict[str, str]:
    """The partitions (of `newest_s`: this worker's, by the newest event time it served from each) to pause,
    each with its reason (see the module's docstring). `slowest_s` is the newest event time of the fleet's
    slowest active partition (None: not known); `view` None: no trainer to pace by."""
    if max_lag_s <= 0:
        return {}
    catching_up = {p: t for p, t in newest_s.items() if t < now_s - max_lag_s}
    if not catching_up:
        return {}
    pacing = view is not None and view.trainer_alive
    behind_round = pacing and round_due(view, first_round_examples)
    through_s = view.progress.through_s if pacing and view.progress is not None else float("-inf")
    swap_pending = pacing and view.champion is not None and view.champion != serving_version
    paused = {}
    for partition, t in catching_up.items():
        if slowest_s is not None and t > slowest_s + max_lag_s:
            paused[partition] = "align"
        elif behind_round and t > through_s + max_lag_s:
            paused[partition] = "round"
        elif swap_pending:
            paused[partition] = "swap"
    return paused
