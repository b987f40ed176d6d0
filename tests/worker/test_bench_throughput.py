"""The throughput bench's figures and goals, computed from drains and latency rows (the drains themselves
run against the real stack in tests/integration/test_bench.py)."""
import math

import pytest

from worker.bench_throughput import (
    Drains, DrainResult, WorkerDrain, print_throughput, run_throughput_bench, throughput_result,
)
from worker.model import CheckpointError
from worker.settings import load_settings

REDIS = {"keys": 1, "used_memory_mib": 2.0, "aof_rewrites": 0, "rdb_saves": 0}
SWAP = {"swaps": 200, "median_ms": 0.1, "p99_ms": 1.0, "max_ms": 2.0}


def drains(bare_s: list[float], worker_s: list[float], rss_mib: float = 380.0) -> Drains:
    """Drains of 100k events taking the given seconds, on kafka-python."""
    return Drains(bare=[DrainResult("bare", 100_000, s) for s in bare_s],
                  workers={"kafka-python": [WorkerDrain(DrainResult("worker", 100_000, s), rss_mib, 1.0) for s in worker_s]},
                  redis_before=REDIS, redis_after=REDIS)


def latency_row(share: float, p99_ms: float, during_ms: float | None = None, between_ms: float | None = None) -> dict:
    def part(p99):
        return {"events": 0 if math.isnan(p99) else 1000, "p50_ms": p99 / 2, "p99_ms": p99, "p999_ms": p99}

    trainer = during_ms is not None
    return {"load_share": share, "name": "worker with its trainer" if trainer else "worker (--no-finetune)",
            "offered_events_per_s": 8000.0 * share * 2, "events": 2000, "received": 2000, "p50_ms": p99_ms / 2,
            "p99_ms": p99_ms, "p999_ms": p99_ms, "while_training": part(during_ms) if trainer else None,
            "between_training": part(between_ms) if trainer else None, "swaps": None, "redis_rewrites": 0}


def verdicts(result: dict) -> list:
    return [goal["met"] for goal in result["goals"]]


def test_medians_and_ratios_come_from_the_runs_in_their_order():
    result = throughput_result("kafka-python", 100_000, 3, drains([4.0, 5.0, 4.5], [6.0, 5.0, 8.0]), SWAP, [])
    assert result["bare"]["events_per_s"] == pytest.approx(100_000 / 4.5)
    assert result["worker"]["events_per_s"] == pytest.approx(100_000 / 6.0)
    assert result["ratio_worker_to_bare"] == pytest.approx(4.5 / 6.0)
    assert result["ratio_per_run"] == pytest.approx([4.0 / 6.0, 5.0 / 5.0, 4.5 / 8.0])  # each drain against its round's bare one
    assert result["workers_by_client"]["kafka-python"]["start_up_s_per_run"] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("bare_s, worker_s, rss_mib, met", [
    ([4.0], [6.0], 380.0, [True, True]),      # ratio 0.667 at 16,667 events/s
    ([4.0], [7.0], 380.0, [False, False]),    # 0.571 at 14,286
    ([2.0], [6.0], 380.0, [False, True]),     # fast enough, but a third of the bare loop
    ([6.0], [7.0], 380.0, [True, False]),     # near the bare loop (0.857), on a slow machine
])
def test_the_drain_goals_are_judged_on_the_median_run(bare_s, worker_s, rss_mib, met):
    result = throughput_result("kafka-python", 100_000, 1, drains(bare_s, worker_s, rss_mib), SWAP, [])
    assert verdicts(result)[:2] == met


def test_goals_not_measured_are_not_judged():
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, [])  # latency skipped
    p99, interference = result["goals"][2:4]
    assert p99["met"] is None and p99["figures"] == "not measured"
    assert interference["met"] is None and interference["figures"] == "not measured"
    no_finetune_ran = [latency_row(0.5, 40.0), latency_row(0.5, 60.0, during_ms=float("nan"), between_ms=60.0)]
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, no_finetune_ran)
    assert result["goals"][2]["met"] is True
    assert result["goals"][3]["met"] is None and result["goals"][3]["figures"] == "no fine-tune ran during the row"


@pytest.mark.parametrize("p99_ms, during_ms, between_ms, met", [
    (50.0, 75.0, 50.0, [True, True]),
    (50.1, 75.1, 50.0, [False, False]),
    (412.0, 800.0, 760.0, [False, True]),  # the factor is met far above the bound
])
def test_latency_goals_read_the_half_load_row_and_the_trainers_row(p99_ms, during_ms, between_ms, met):
    rows = [latency_row(0.25, 10.0), latency_row(0.5, p99_ms), latency_row(0.75, 900.0),
            latency_row(0.5, 99.0, during_ms, between_ms)]
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, rows)
    assert verdicts(result)[2:4] == met


@pytest.mark.parametrize("max_ms, rss_mib, met", [(5.0, 1536.0, [True, True]), (5.4, 1537.0, [False, False])])
def test_the_slowest_swap_and_the_peak_memory_are_judged(max_ms, rss_mib, met):
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0], rss_mib), {**SWAP, "max_ms": max_ms}, [])
    assert verdicts(result)[4:] == met


def test_the_printout_ends_with_every_goal():
    rows = [latency_row(0.5, 400.0), latency_row(0.5, 900.0, during_ms=900.0, between_ms=800.0)]
    result = throughput_result("kafka-python", 100_000, 3, drains([4.0, 5.0, 4.5], [6.0, 5.0, 8.0]), SWAP, rows)
    lines = []
    print_throughput(result, lines.append)
    assert [line.split(":")[0] for line in lines[-6:]] == [
        "goal met", "goal met", "goal MISSED", "goal met", "goal met", "goal met"]
    assert "goal MISSED: p99 at most 50 ms at 50 % load: 400.0 ms at 8,000 events/s" in lines
    assert any(line.startswith("ratio worker (kafka-python) / bare kafka-python: 0.750 (per run: 0.667 1.000 0.562)")
               for line in lines)


def test_a_checkpoint_the_workers_would_refuse_stops_the_bench_before_any_backlog(tmp_path):
    # the bootstrap names a port nothing listens on: the bench must not get as far as Kafka
    settings = load_settings({"STREAMADAPT_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    with pytest.raises(CheckpointError, match="is not a checkpoint: it needs model.keras and metadata.json"):
        run_throughput_bench(settings, 1000, tmp_path / "missing", None)
