"""Latency rows are timed from each event's scheduled send time (pure part)."""
import math

import numpy as np
import pytest

from benchmarks.latency import SLICE_S, WARMUP_S, summarize


def test_latency_runs_from_the_schedule_so_a_stall_counts_for_every_event_it_held_up():
    rate, seconds, t0 = 100.0, 32.0, 1000.0
    due = t0 + np.arange(int(rate * seconds)) / rate
    received = due + 0.005
    stalled = (due >= t0 + 20.0) & (due < t0 + 20.5)  # 50 events held up until t0 + 20.5 s, then released at once
    received[stalled] = t0 + 20.5
    received[7] = np.nan  # one output never arrives
    row = summarize("c", rate, seconds, received, t0, generator_behind_max_s=0.002)
    assert (row.sent, row.received, row.missing) == (3200, 3199, 1)
    assert row.p50_ms == pytest.approx(5.0)
    assert row.max_ms == pytest.approx(500.0)  # the first event due in the stall waited all of it
    assert row.p99_ms > 100.0  # 50 of the 3,000 timed events waited 10 to 500 ms: over 1 %
    assert len(row.p99_ms_per_slice) == math.ceil((seconds - WARMUP_S) / SLICE_S)
    # the stall shows in its own slice only
    assert row.p99_ms_per_slice[0] == pytest.approx(5.0) and row.p99_ms_per_slice[1] > 400.0
    assert row.p99_ms_per_slice[2] == pytest.approx(5.0)
    assert row.generator_behind_max_ms == pytest.approx(2.0)


def test_warm_up_events_must_arrive_but_are_not_timed():
    rate, t0 = 10.0, 0.0
    due = t0 + np.arange(100) / rate
    received = due + np.where(due < WARMUP_S, 3.0, 0.010)
    row = summarize("c", rate, 10.0, received, t0, 0.0)
    assert row.missing == 0 and row.max_ms == pytest.approx(10.0)
