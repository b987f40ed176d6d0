"""kill -9 in the middle of a backlog, twice: no valid event may lack a prediction afterwards, and a
replayed record re-emits exactly the prediction it had (outputs are idempotent by event_id). At least once,
a kill re-emits at most the batches in flight; in exactly-once mode a read_committed reader sees no
duplicate at all."""
import signal

import pytest

from tests.conftest import stack_with
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    dumps,
    event,
    produce,
    read_topic,
)

pytestmark = pytest.mark.integration

BATCH = 500  # max records per poll
WINDOW = 1500  # records polled and not yet committed, at most: what one kill can make the next worker re-emit


@pytest.mark.parametrize("client, exactly_once, redis_kind", [
    ("confluent", False, "redis"), ("kafka-python", False, "redis-cluster"), ("confluent", True, "redis"),
    pytest.param("kafka-python", True, "redis", marks=pytest.mark.faults)])
def test_two_kill_9s_during_a_backlog_lose_no_event(request, names, checkpoint, tmp_path, exactly_once, client,
                                                    redis_kind):
    """On a Redis Cluster a kill may land between the scripts of one batch's shards: the next worker replays
    the shards that landed and serves the others as the first time."""
    stack = stack_with(request, redis_kind)
    bodies = [event(i, user=f"user-{i % 997}") for i in range(30_000)]
    produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
    env = {"STREAMADAPT_KAFKA_MAX_POLL_RECORDS": str(BATCH), "STREAMADAPT_ROLE": "worker",
           "STREAMADAPT_KAFKA_SESSION_TIMEOUT_MS": "6000", "STREAMADAPT_KAFKA_MAX_IN_FLIGHT_RECORDS": str(WINDOW),
           "STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower(), "STREAMADAPT_KAFKA_CLIENT": client}
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
        assert duplicates <= 2 * WINDOW, duplicates  # each kill, at most the window in flight
