"""`python -m benchmarks` as a user meets it: a bad request ends in one readable line."""
import subprocess
import sys
from pathlib import Path

from tests.test_cli import daily_buyers

REPO = Path(__file__).resolve().parents[2]


def benchmarks(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_a_bench_source_period_shorter_than_a_horizon_is_refused_naming_the_users_log(tmp_path):
    events = daily_buyers(tmp_path / "daily.jsonl", 60)
    result = benchmarks("adaptation", "--events", str(events), "--source-until", "2025-01-21",
                        "--task", "repurchase", "--horizon-days", "30")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {events} before 2025-01-21 settles the repurchase label of 0 purchases" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr



def test_an_unknown_benchmark_is_one_line():
    result = benchmarks("speed")
    assert result.returncode == 2 and "invalid choice: 'speed'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
