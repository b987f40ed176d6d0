"""kill -9 in the middle of a backlog, twice: no valid event may lack a prediction afterwards, and a
replayed record re-emits exactly the prediction it had (outputs are idempotent by event_id). In
exactly-once mode a read_committed reader sees no duplicate at all. A killed builder process ends its
worker, and the next worker loses nothing either."""
import os
import signal
from pathlib import Path

import pytest

from tests.integration.conftest import WorkerProcess, check_every_event_predicted, dumps, event, produce, read_topic

pytestmark = pytest.mark.integration

BATCH = 500  # max records per poll: the most a kill can leave in flight


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
def test_two_kill_9s_during_a_backlog_lose_no_event(stack, names, checkpoint, tmp_path, exactly_once):
    bodies = [event(i, user=f"user-{i % 997}") for i in range(30_000)]
    produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
    env = {"STREAMADAPT_KAFKA_MAX_POLL_RECORDS": str(BATCH), "STREAMADAPT_ROLE": "worker",
           "STREAMADAPT_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower()}
    for run in range(2):
        worker = WorkerProcess(stack, names, checkpoint, tmp_path / f"killed{run}.log", **env).start()
        worker.wait_metric("streamadapt_events_consumed_total", 4000, timeout_s=120)
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=30)
    with WorkerProcess(stack, names, checkpoint, tmp_path / "survivor.log", **env) as survivor:
        records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=240, settle_s=3,
                             committed_only=exactly_once)
        assert survivor.stop() == 0
    duplicates = check_every_event_predicted(bodies, records)
    print(f"predictions {len(records)} for {len(bodies)} events: {duplicates} re-emitted after 2 kills")
    if exactly_once:  # what a reader that ignores transactions would see: the aborted batches too
        everything = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=60)
        print(f"read_uncommitted sees {len(everything)} records, {len(everything) - len(records)} of aborted transactions")
    if exactly_once:
        assert duplicates == 0, duplicates
    else:
        assert duplicates <= 2 * BATCH, duplicates  # each kill leaves at most one polled, uncommitted batch


def test_a_killed_builder_ends_its_worker_and_the_next_one_loses_no_event(stack, names, checkpoint, tmp_path):
    bodies = [event(i, user=f"user-{i % 997}") for i in range(12_000)]
    produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
    env = {"STREAMADAPT_KAFKA_MAX_POLL_RECORDS": str(BATCH), "STREAMADAPT_ROLE": "worker",
           "STREAMADAPT_KAFKA_SESSION_TIMEOUT_MS": "6000"}
    log_path = tmp_path / "builder-killed.log"
    worker = WorkerProcess(stack, names, checkpoint, log_path, **env).start()
    worker.wait_metric("streamadapt_events_consumed_total", 2000, timeout_s=120)
    os.kill(builder_of(worker.process.pid), signal.SIGKILL)
    assert worker.process.wait(timeout=60) == 1
    assert "error: the batch builder process died (exit code -9)" in log_path.read_text()
    with WorkerProcess(stack, names, checkpoint, tmp_path / "next.log", **env) as survivor:
        records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=240, settle_s=3)
        assert survivor.stop() == 0
    duplicates = check_every_event_predicted(bodies, records)
    print(f"predictions {len(records)} for {len(bodies)} events: {duplicates} re-emitted after the builder's death")
    assert duplicates <= 2 * BATCH, duplicates  # the batch being produced and the one committed asynchronously


def builder_of(worker_pid: int) -> int:
    """A builder process of the worker: a child of the server the builders fork from, which is the worker's
    child (beside multiprocessing's resource tracker)."""
    for server in children(worker_pid):
        if "forkserver" in Path(f"/proc/{server}/cmdline").read_text():
            for builder in children(server):
                return builder
    raise AssertionError(f"worker {worker_pid} has no builder process")


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]
