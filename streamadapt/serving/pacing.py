"""The serving loop's side of pacing (streamadapt.core.pacing decides which partitions wait): when to read the
fleet's event times and the trainer's progress, how long a wait for the trainer may last, and the metrics.

Live, every partition this worker serves is within `max_lag_s` of the clock, and this reads nothing. While the
stream catches up (a replay, a backlog), it reads Redis at most every CHECK_EVERY_S.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from streamadapt.core.pacing import TrainerView, partitions_to_pause
from streamadapt.metrics import WorkerMetrics
from streamadapt.state.registry import Registry
from streamadapt.state.store import StateStore

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.02  # while catching up: how often the fleet's event times and the trainer's progress are read
ROUND_WAIT_MAX_S = 300.0  # a round waited for longer than this: pace by the trainer no more until it moves
SWAP_WAIT_MAX_S = 10.0  # a champion not swapped in within this (the follower refused it?) is not waited for again
# A poll takes at most this many records while one batch would carry a partition over `max_lag_s` of event time
# (a replayed log): a batch is served whole, and its labels count towards a round all at once.
FINE_POLL_RECORDS = 200
FINE_POLLS_FOR_S = 5.0  # for this long after such a batch (a fine batch may well stay within the lag)


class Pacer:
    def __init__(self, store: StateStore, registry: Registry, max_lag_s: float, idle_partition_timeout_s: float,
                 first_round_examples: int, metrics: WorkerMetrics, trainer_starting_s: float = 0.0,
                 rounds_on_drift: bool = True):
        """`trainer_starting_s`: for this long from now, count a trainer as there before it holds its lease
        (`--role all` starts one, which takes seconds to load TensorFlow). `rounds_on_drift`: a drift alarm makes
        a round due (--training-on-drift)."""
        self._store, self._registry = store, registry
        self._max_lag_s, self._idle_s = max_lag_s, idle_partition_timeout_s
        self._first_round_examples = first_round_examples
        self._metrics = metrics
        self._rounds_on_drift = rounds_on_drift
        self._trainer_starting_until = time.monotonic() + trainer_starting_s
        self._paused: dict[str, str] = {}  # partition -> reason, as last decided
        self._looked_at: dict[str, float] = {}  # the newest event times of the last look
        self.poll_records: int | None = None  # the most records a poll may take, when pacing limits it
        self._coarse_until = 0.0  # monotonic
        self._next_check = 0.0
        self._round_wait_since: float | None = None  # monotonic
        self._gave_up_at_through: float | None = None  # pacing by the trainer gave up while it was here
        self._swap_wait: tuple[str, float] | None = None  # (champion, since: monotonic)
        self._not_waited_for: str | None = None  # a champion that was not swapped in within SWAP_WAIT_MAX_S
        self._through_s, self._champion = float("-inf"), None  # the trainer's, as last read

    def to_pause(self, newest_s: Mapping[str, float], serving_version: str) -> set[str]:
        """The partitions the loop keeps paused before its next poll, of `newest_s`: the newest event time this
        worker served from each partition it owns."""
        now = time.monotonic()
        # Partitions that served more since the last look, or wait: a quiet partition has nothing to pace.
        moving = {p: t for p, t in newest_s.items() if p in self._paused or self._looked_at.get(p) != t}
        if not any(t < time.time() - self._max_lag_s for t in moving.values()):
            self._set({})
            self.poll_records = None
            return set()
        if now >= self._next_check:
            self._next_check = now + CHECK_EVERY_S
            if any(t - self._looked_at.get(p, t) > self._max_lag_s for p, t in moving.items()):
                self._coarse_until = now + FINE_POLLS_FOR_S
            self.poll_records = FINE_POLL_RECORDS if now < self._coarse_until else None
            self._looked_at = dict(newest_s)
            self._set(partitions_to_pause(moving, self._store.slowest_partition_s(self._idle_s),
                                          self._trainer_view(now), time.time(), self._max_lag_s, serving_version,
                                          self._first_round_examples))
            self._limit_waits(now)
        return set(self._paused)

    def _trainer_view(self, now: float) -> TrainerView | None:
        progress, leased, champion = self._registry.trainer_state()
        self._through_s = progress.through_s if progress is not None else float("-inf")
        self._champion = champion
        if self._gave_up_at_through is not None:
            if self._through_s == self._gave_up_at_through:
                return None
            self._gave_up_at_through = None
        if champion == self._not_waited_for:
            champion = None
        examples, alarm = self._store.examples_and_alarm()
        return TrainerView(progress, leased or now < self._trainer_starting_until, examples,
                           alarm and self._rounds_on_drift, champion)

    def _limit_waits(self, now: float) -> None:
        """Give up a wait for the trainer that lasts too long: serving goes on (the partitions' alignment
        still holds)."""
        reasons = set(self._paused.values())
        if "round" not in reasons:
            self._round_wait_since = None
        elif self._round_wait_since is None:
            self._round_wait_since = now
        elif now - self._round_wait_since > ROUND_WAIT_MAX_S:
            self._gave_up_at_through = self._through_s
            self._round_wait_since = None
            log.warning("waited %.0f s for the trainer's round while the stream ran over %.0f s of event time "
                        "ahead of it: serving on until the trainer moves", ROUND_WAIT_MAX_S, self._max_lag_s)
            self._set({p: r for p, r in self._paused.items() if r != "round"})
        if "swap" not in reasons:
            self._swap_wait = None
            return
        champion = self._champion
        if self._swap_wait is None or self._swap_wait[0] != champion:
            self._swap_wait = (champion, now)
        elif now - self._swap_wait[1] > SWAP_WAIT_MAX_S:
            log.warning("champion %s was not swapped in within %.0f s: serving on with the current model", champion,
                        SWAP_WAIT_MAX_S)
            self._not_waited_for, self._swap_wait = champion, None
            self._set({p: r for p, r in self._paused.items() if r != "swap"})

    def _set(self, paused: dict[str, str]) -> None:
        for partition, reason in paused.items():
            if self._paused.get(partition) != reason:
                self._metrics.pacing_pauses.labels(reason).inc()
        self._paused = paused
        self._metrics.paced_partitions.set(len(paused))
