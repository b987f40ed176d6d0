"""The throughput bench's figures and goals, computed from drains and latency rows (the drains and rows
themselves run against the real stack in tests/integration/test_bench.py)."""
import pytest

from benchmarks.throughput import (
    DrainResult,
    Drains,
    WorkerDrain,
    print_throughput,
    run_throughput_bench,
    throughput_result,
)
from streamadapt.model.checkpoint import CheckpointError
from streamadapt.settings import load_settings

REDIS = {"keys": 1, "used_memory_mib": 2.0, "aof_rewrites": 0, "rdb_saves": 0}
SWAP = {"swaps": 200, "median_ms": 0.1, "p99_ms": 1.0, "max_ms": 2.0}
ALO, FAF = "at-least-once", "fire-and-forget"


def drains(bare_s: list[float], worker_s: list[float], rss_mib: float = 380.0, confluent_s: list[float] | None = None) -> Drains:
    """Drains of 100k events taking the given seconds: the bare kafka-python loop in both modes (fire-and-forget
    in half the time), and the worker on kafka-python (and on confluent, with its own bare loops at twice the
    speed, when `confluent_s` is given)."""
    bare = {f"kafka-python {ALO}": [DrainResult(f"bare kafka-python {ALO}", 100_000, s) for s in bare_s],
            f"kafka-python {FAF}": [DrainResult(f"bare kafka-python {FAF}", 100_000, s / 2) for s in bare_s]}
    workers = {"kafka-python": [WorkerDrain(DrainResult("worker", 100_000, s), rss_mib, 1.0) for s in worker_s]}
    if confluent_s is not None:
        bare |= {f"confluent {ALO}": [DrainResult(f"bare confluent {ALO}", 100_000, s / 2) for s in bare_s],
                 f"confluent {FAF}": [DrainResult(f"bare confluent {FAF}", 100_000, s / 4) for s in bare_s]}
        workers["confluent"] = [WorkerDrain(DrainResult("worker", 100_000, s), rss_mib, 1.0) for s in confluent_s]
    return Drains(bare=bare, workers=workers, redis_before=REDIS, redis_after=REDIS)


def row(contender: str, rate: float, p99_ms: float, missing: int = 0, during_ms: float | None = None,
        between_ms: float | None = None) -> dict:
    def part(p99):
        return {"contender": contender, "offered_events_per_s": rate, "sent": 1000, "missing": 0,
                "p50_ms": p99 / 2, "p99_ms": p99, "p999_ms": p99, "max_ms": p99, "p99_ms_per_slice": [p99]}

    figures = {**part(p99_ms), "missing": missing, "swaps": None, "redis_rewrites": 0}
    if during_ms is not None:
        figures |= {"while_training": part(during_ms), "between_training": part(between_ms)}
    return figures


def rows_at(worker_p99: dict[float, float], bare_p99: dict[float, float], client: str = "kafka-python") -> list[dict]:
    return ([row(f"worker ({client})", rate, p99) for rate, p99 in worker_p99.items()]
            + [row(f"bare {client} at-least-once", rate, p99) for rate, p99 in bare_p99.items()])


def verdicts(result: dict) -> list:
    return [goal["met"] for goal in result["goals"]]


def test_medians_and_ratios_come_from_the_runs_in_their_order():
    result = throughput_result("kafka-python", 100_000, 3, drains([4.0, 5.0, 4.5], [6.0, 5.0, 8.0]), SWAP, [])
    assert result["bare"][f"kafka-python {ALO}"]["events_per_s"] == pytest.approx(100_000 / 4.5)
    worker = result["workers_by_client"]["kafka-python"]
    assert worker["events_per_s"] == pytest.approx(100_000 / 6.0)
    assert worker["ratio_to_bare_kafka_python"] == worker["ratio_to_own_bare"] == pytest.approx(4.5 / 6.0)
    assert worker["ratio_to_own_fire_and_forget"] == pytest.approx(2.25 / 6.0)
    assert worker["ratio_per_run"] == pytest.approx([4.0 / 6.0, 5.0 / 5.0, 4.5 / 8.0])  # each against its round's bare
    assert worker["start_up_s_per_run"] == [1.0, 1.0, 1.0]


def test_each_client_is_also_measured_against_its_own_bare_loops():
    result = throughput_result("confluent", 100_000, 1, drains([4.0], [6.0], confluent_s=[3.0]), SWAP, [])
    confluent = result["workers_by_client"]["confluent"]
    assert confluent["ratio_to_bare_kafka_python"] == pytest.approx(4.0 / 3.0)
    assert confluent["ratio_to_own_bare"] == pytest.approx(2.0 / 3.0)
    assert confluent["ratio_to_own_fire_and_forget"] == pytest.approx(1.0 / 3.0)
    assert result["goals"][0]["met"] is True  # the drain goal is against bare kafka-python, the client users named


@pytest.mark.parametrize("bare_s, worker_s, met", [([4.0], [5.0], True), ([4.0], [5.01], False)])
def test_the_drain_goal_is_0_8_of_the_bare_at_least_once_kafka_python_loop(bare_s, worker_s, met):
    result = throughput_result("kafka-python", 100_000, 1, drains(bare_s, worker_s), SWAP, [])
    assert verdicts(result)[0] is met


def test_goals_not_measured_are_not_judged():
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, [])  # latency skipped
    assert verdicts(result)[1:5] == [None, None, None, None]
    assert all(goal["figures"] == "not measured" for goal in result["goals"][1:5])
    no_finetune_ran = [row("worker (kafka-python)", 2000.0, 60.0, during_ms=float("nan"), between_ms=60.0)]
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, no_finetune_ran)
    assert result["goals"][4]["met"] is None and result["goals"][4]["figures"] == "no fine-tune ran during the row"


@pytest.mark.parametrize("p99_2k, p99_5k, missing, met", [
    (20.0, 50.0, 0, [True, True]),
    (20.1, 50.1, 0, [False, False]),
    (10.0, 10.0, 1, [False, True]),  # an output that never came fails its row whatever the tail
])
def test_the_absolute_p99_goals_read_the_default_clients_worker_rows(p99_2k, p99_5k, missing, met):
    rows = [row("worker (kafka-python)", 2000.0, p99_2k, missing), row("worker (kafka-python)", 5000.0, p99_5k),
            row("worker (confluent)", 2000.0, 999.0)]  # the other client's rows do not count here
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, rows)
    assert verdicts(result)[1:3] == met


def test_the_ratio_to_the_bare_loop_holds_at_every_rate_and_per_client():
    rows = (rows_at({1000.0: 10.0, 2000.0: 20.0, 5000.0: 100.0}, {1000.0: 5.0, 2000.0: 10.0, 5000.0: 50.0})
            + rows_at({2000.0: 30.0}, {2000.0: 10.0}, client="confluent"))
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0], confluent_s=[3.0]), SWAP, rows)
    by_goal = {goal["goal"]: goal for goal in result["goals"]}
    own = by_goal["p99 at most 2 x the bare kafka-python loop's at every rate"]
    assert own["met"] is True and own["figures"] == "2.00 x at 1,000/s, 2.00 x at 2,000/s, 2.00 x at 5,000/s"
    assert by_goal["p99 at most 2 x the bare confluent loop's at every rate"]["met"] is False  # 3.00 x


@pytest.mark.parametrize("during_ms, between_ms, met", [(75.0, 50.0, True), (75.1, 50.0, False)])
def test_the_training_goal_reads_the_trainers_row(during_ms, between_ms, met):
    rows = [row("worker (kafka-python, with its trainer)", 2000.0, 60.0, during_ms=during_ms, between_ms=between_ms)]
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0]), SWAP, rows)
    assert verdicts(result)[4] is met


@pytest.mark.parametrize("max_ms, rss_mib, met", [(5.0, 1536.0, [True, True]), (5.4, 1537.0, [False, False])])
def test_the_slowest_swap_and_the_peak_memory_are_judged(max_ms, rss_mib, met):
    result = throughput_result("kafka-python", 100_000, 1, drains([4.0], [6.0], rss_mib), {**SWAP, "max_ms": max_ms}, [])
    assert verdicts(result)[-2:] == met


def test_the_printout_ends_with_every_goal():
    rows = rows_at({2000.0: 400.0}, {2000.0: 300.0}) + [
        row("worker (kafka-python, with its trainer)", 2000.0, 900.0, during_ms=900.0, between_ms=800.0)]
    result = throughput_result("kafka-python", 100_000, 3, drains([4.0, 5.0, 4.5], [6.0, 5.0, 8.0]), SWAP, rows)
    lines = []
    print_throughput(result, lines.append)
    assert [line.split(":")[0] for line in lines[-7:]] == [
        "goal MISSED", "goal MISSED", "goal not judged", "goal met", "goal met", "goal met", "goal met"]
    assert "goal MISSED: p99 at most 20 ms at 2,000 events/s on kafka-python, nothing missing: 400.0 ms, 0 missing" in lines
    assert any(line.startswith("worker (kafka-python): 0.750 of bare kafka-python at-least-once") for line in lines)
    assert any(line.startswith("  of which due during a fine-tune") for line in lines)


def test_a_checkpoint_the_workers_would_refuse_stops_the_bench_before_any_backlog(tmp_path):
    # the bootstrap names a port nothing listens on: the bench must not get as far as Kafka
    settings = load_settings({"STREAMADAPT_KAFKA_BOOTSTRAP": "127.0.0.1:9"})
    with pytest.raises(CheckpointError, match="is not a checkpoint: it needs model.keras and metadata.json"):
        run_throughput_bench(settings, 1000, tmp_path / "missing", None)
