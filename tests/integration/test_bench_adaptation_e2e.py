"""The adaptation bench through the real worker: the log goes through Kafka, the worker and Redis, and static
serving there must be what the offline replay serves (no quality goal is asserted here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamadapt.ops.generate import write_events

pytestmark = pytest.mark.integration


@pytest.mark.faults  # 45 s, past what the suite's 15 minutes leave: scripts/test -m faults
def test_a_log_through_the_real_worker_is_served_as_the_replay_serves_it(stack, tmp_path):
    log = tmp_path / "log.jsonl"
    write_events(log, events=5000, market="target", drift_at=2500, seed=21)
    middle = json.loads(log.read_text().splitlines()[2500])["ts"][:10]
    out = tmp_path / "e2e.json"
    env = {**os.environ, "STREAMADAPT_KAFKA_BOOTSTRAP": stack.kafka_bootstrap, "STREAMADAPT_REDIS_URL": stack.redis_url,
           "STREAMADAPT_TRAINING_EVERY_EXAMPLES": "500", "STREAMADAPT_TRAINING_MIN_EXAMPLES": "300"}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "adaptation", "--events", str(log), "--source-until", middle,
         "--task", "repurchase", "--horizon-days", "3", "--through-worker", "--river", "none", "--no-oracle",
         "--curve-sizes", "", "--out", str(out)], env=env, capture_output=True, text=True, timeout=900,
        cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    figures = json.loads(out.read_text())
    worker_static, worker_adapted = figures["through_worker"]
    offline_static = next(row for row in figures["contenders"] if row["name"] == "static")
    assert figures["static_agreement"]["agree"], figures["static_agreement"]
    assert figures["static_agreement"]["missing"] == 0
    assert worker_static["after_log_loss"] == pytest.approx(offline_static["after_log_loss"], abs=1e-5)
    assert worker_static["after"] == pytest.approx(offline_static["after"], abs=1e-4)
    assert worker_static["model_versions"] == [f"src-{figures['source_checkpoint_sha256'][:12]}"]
    assert 0.0 < worker_adapted["after_log_loss"] < 2.0
    assert "static through the worker and in the replay agree" in result.stdout
