"""The Kafka broker stops and starts again while events flow in: the worker rides it out (its batch is
retried, consumption pauses) and every event still gets its prediction.

This restarts the shared broker of scripts/dev-stack, so it waits for it to be back before it ends."""
import subprocess
import threading
import time

import pytest

from tests.conftest import STACK_SCRIPT
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    event,
    produce_paced,
    read_topic,
)

pytestmark = pytest.mark.integration

RATE_PER_S = 500


FAULT_RUNS = [pytest.param(client, exactly_once, marks=pytest.mark.faults)
              for client, exactly_once in [("kafka-python", "false"), ("kafka-python", "true"), ("confluent", "true")]]


@pytest.mark.parametrize("client, exactly_once", [("confluent", "false"), *FAULT_RUNS])
def test_a_broker_restart_mid_stream_loses_no_event(stack, names, checkpoint, tmp_path, client, exactly_once):
    """Exactly-once on confluent-kafka may end the worker instead (a transactional call that librdkafka does
    not return from while the broker is away): restarted, as its container would be, it resolves the open
    transaction and reads on from the committed offsets."""
    bodies = [event(i, user=f"user-{i % 501}") for i in range(9_000)]
    env = {"STREAMADAPT_KAFKA_MAX_POLL_RECORDS": "500", "STREAMADAPT_ROLE": "worker", "STREAMADAPT_KAFKA_CLIENT": client,
           "STREAMADAPT_KAFKA_EXACTLY_ONCE": exactly_once}
    failures: list = []
    worker = WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env).start()
    restarts = 0
    try:
        producer = threading.Thread(target=produce_paced,
                                    args=(stack.kafka_bootstrap, names.input_topic, bodies, RATE_PER_S, failures))
        producer.start()
        worker.wait_metric("streamadapt_predictions_total", 2000, timeout_s=120)
        restarted_at = time.monotonic()
        result = subprocess.run([str(STACK_SCRIPT), "restart-kafka"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        print(f"broker down and back in {time.monotonic() - restarted_at:.1f} s")
        producer.join(timeout=600)
        assert not failures, f"{len(failures)} test events were not accepted by the broker, e.g. {failures[0]!r}"
        deadline = time.monotonic() + 240
        while True:
            if worker.process.poll() is not None:  # a supervisor restarts it
                assert exactly_once == "true" and "restart resolves the open transaction" in worker.log_path.read_text(), \
                    worker.log_path.read_text()[-3000:]
                restarts += 1
                worker = WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env).start()
            records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=20, settle_s=3,
                                 committed_only=exactly_once == "true")
            if len({r.value for r in records}) >= len(bodies) or time.monotonic() > deadline:
                break
        assert worker.process.poll() is None, "the worker exited during the broker restart"
        errors = worker.metric("streamadapt_dependency_errors_total")
    finally:
        assert worker.stop() == 0
    duplicates = check_every_event_predicted(bodies, records)
    if exactly_once == "true":
        assert duplicates == 0, "a read_committed reader sees each output once"
    print(f"predictions {len(records)} for {len(bodies)} events, {duplicates} re-emitted; {restarts} restarts; "
          f"{errors:.0f} batch attempts refused by Kafka")
