"""A flood of events from one user key: every event is predicted, and neither the user's state in Redis, nor
the labelled-example windows, nor the worker's memory grow with the flood."""
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from streamadapt.state.store import StateStore
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    dumps,
    event,
    produce,
    read_topic,
)

pytestmark = pytest.mark.integration

FLOOD = 20_000
WINDOW_MAX_EXAMPLES = 1000
FLOOD_START = datetime(2025, 8, 2, tzinfo=timezone.utc)  # one event every 30 s for a week, after the warm-up


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the worker's RSS from /proc")
def test_a_flood_from_one_user_keeps_state_and_memory_bounded(stack, names, checkpoint, tmp_path):
    warm_up = [event(i, user="user-warm-up") for i in range(2000)]
    flood = [event(i, user="user-flood", event_id=f"flood-{i}", item_id=f"item-{i}",
                   category=f"category-{i % 500}",  # far more categories than the state tracks
                   ts=(FLOOD_START + timedelta(seconds=30 * i)).isoformat().replace("+00:00", "Z"))
             for i in range(FLOOD)]
    env = {"STREAMADAPT_ROLE": "worker", "STREAMADAPT_TRAINING_WINDOW_MAX_EXAMPLES": str(WINDOW_MAX_EXAMPLES)}
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
        produce(stack, names.input_topic, [dumps(b) for b in warm_up], keys=[b"user-warm-up"] * len(warm_up))
        worker.wait_metric("streamadapt_predictions_total", len(warm_up), timeout_s=120)
        rss_before = rss_mib(worker.process.pid)
        produce(stack, names.input_topic, [dumps(b) for b in flood], keys=[b"user-flood"] * len(flood))
        records = read_topic(stack, names.predictions_topic, expect=len(warm_up) + len(flood), timeout_s=240)
        rss_after = rss_mib(worker.process.pid)
        assert worker.stop() == 0
    check_every_event_predicted(warm_up + flood, records)

    client = stack.redis_client()
    store = StateStore(client, stack.redis_settings(names.key_prefix))
    state_bytes = client.strlen(store.keys.profile("user-flood"))
    windows = list(store.window_sizes().values())
    keys_of_user = [k.decode() for k in client.scan_iter(f"{names.key_prefix}:*user-flood*")]
    client.close()
    print(f"user state {state_bytes} bytes; windows hold {windows} examples; keys of the user {sorted(keys_of_user)}; "
          f"worker RSS {rss_before:.0f} MiB before the flood, {rss_after:.0f} MiB after")
    assert 0 < state_bytes < 4096
    assert windows and max(windows) <= WINDOW_MAX_EXAMPLES
    assert len(keys_of_user) == 1  # its profile (state and pending prediction), however many events it sent
    assert rss_after - rss_before < 100, (rss_before, rss_after)
