"""The scaling benchmark's arithmetic: speed-up against the fewest processes, share of linear, CPU per event."""
from benchmarks.scaling import ScalingRow, print_scaling, scaling_result


def test_speed_up_and_share_of_linear_are_against_the_fewest_processes_on_the_same_redis():
    rows = [ScalingRow("redis", 1, 10_000, 1.0, 0.8, 0.1, 1.2), ScalingRow("redis", 2, 15_000, 1.0, 1.3, 0.15, 2.0),
            ScalingRow("redis-cluster", 1, 9_000, 1.0, 0.8, 0.2, 1.3), ScalingRow("redis-cluster", 3, 18_000, 1.0, 1.5, 0.3, 2.0)]
    result = scaling_result(rows, {"redis": {"claim": 150.0}}, events=120_000, partitions=6)
    two = result["runs"]["redis"][1]
    assert (two["speed_up"], two["linear_share"]) == (1.5, 0.75)
    three = result["runs"]["redis-cluster"][1]
    assert (three["speed_up"], round(three["linear_share"], 3)) == (2.0, 0.667)
    assert round(two["worker_cpu_ms_per_event"], 4) == round(1.3 / 15_000 * 1000, 4)
    assert round(two["other_cpu_ms_per_event"], 4) == round((2.0 - 1.3 - 0.15) / 15_000 * 1000, 4)
    assert two["machine_busy_cores"] == 2.0
    lines = []
    print_scaling(result, echo=lines.append)
    assert any("redis-cluster" in line and "18,000" in line for line in lines)
