"""Three workers join and leave one consumer group on a six-partition topic in mid-stream (one stopped by
SIGTERM, one by kill -9): every event still gets a prediction, and a re-emitted one is identical. A version
promoted while all three serve reaches each of them within PROMOTION_BOUND_S of its announcement."""
import signal
import threading
import time

import pytest
import redis
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic

from streamadapt.kafka.kafka_python import open_consumer
from streamadapt.model.checkpoint import load_checkpoint
from streamadapt.settings import load_settings
from streamadapt.state.registry import Registry
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    committed_offsets,
    dumps,
    event,
    produce,
    put_version,
    read_topic,
)

pytestmark = pytest.mark.integration

BATCH = 300
# A replica learns of a promotion from the model-versions topic (or, failing that, from its 5 s registry
# check) and swaps between two batches; 10 s leaves room for a loaded CI machine.
PROMOTION_BOUND_S = 10.0


def feed(stack, topic, bodies, per_second):
    """Produce `bodies` in one-second slices of `per_second` events, keyed by user."""
    step = int(per_second)
    for start in range(0, len(bodies), step):
        began = time.monotonic()
        chunk = bodies[start:start + step]
        produce(stack, topic, [dumps(b) for b in chunk], keys=[b["user_id"].encode() for b in chunk])
        time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))


def promote_and_time(stack, names, checkpoint, workers) -> list[float]:
    """Promote a new version and announce it as the trainer does; seconds until each worker serves it."""
    model, meta = load_checkpoint(checkpoint)
    registry = Registry(redis.Redis.from_url(stack.redis_url), names.key_prefix, "purchases")
    record = put_version(registry, "v1", [w * 0.9 for w in model.get_weights()], meta.sha256, promoted=True)
    registry.set_champion("v1")
    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
    producer.send(names.model_versions_topic, key=b"purchases", value=record.model_dump_json().encode()).get(30)
    producer.close()
    announced = time.monotonic()
    waited = []
    for worker in workers:
        worker.wait_until(lambda w=worker: w.serving_version() == "v1", 60, "the promoted version served")
        waited.append(time.monotonic() - announced)
    return waited


@pytest.mark.parametrize("client, exactly_once", [
    ("confluent", False), pytest.param("kafka-python", False, marks=pytest.mark.faults),
    pytest.param("confluent", True, marks=pytest.mark.faults), pytest.param("kafka-python", True, marks=pytest.mark.faults)])
def test_workers_joining_and_leaving_lose_no_event(stack, names, checkpoint, tmp_path, client, exactly_once):
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    admin.create_topics([NewTopic(names.input_topic, 6, 1), NewTopic(names.predictions_topic, 6, 1)])
    admin.close()
    bodies = [event(i, user=f"user-{i % 1009}") for i in range(24_000)]
    env = {"STREAMADAPT_KAFKA_MAX_POLL_RECORDS": str(BATCH), "STREAMADAPT_ROLE": "worker",
           "STREAMADAPT_KAFKA_SESSION_TIMEOUT_MS": "6000", "STREAMADAPT_NO_FINETUNE": "false",
           "STREAMADAPT_KAFKA_CLIENT": client, "STREAMADAPT_KAFKA_EXACTLY_ONCE": str(exactly_once).lower()}
    workers = [WorkerProcess(stack, names, checkpoint, tmp_path / f"worker{i}.log",
                             STREAMADAPT_KAFKA_TRANSACTIONAL_ID=f"{names.group_id}-{i}", **env) for i in range(3)]
    feeding = threading.Thread(target=feed, args=(stack, names.input_topic, bodies, 600.0), daemon=True)
    try:
        workers[0].start()
        feeding.start()  # 40 s of events at 600 a second, while the group changes under them
        workers[1].start()  # joins: the group rebalances under a consuming worker
        workers[2].start()
        workers[2].wait_metric("streamadapt_events_consumed_total", 1, timeout_s=60)
        promotion_s = promote_and_time(stack, names, checkpoint, workers)
        print("promoted version served after " + ", ".join(f"{s:.2f} s" for s in promotion_s))
        assert max(promotion_s) <= PROMOTION_BOUND_S, promotion_s
        assert workers[0].stop(signal.SIGTERM) == 0  # leaves cleanly
        workers[1].wait_metric("streamadapt_events_consumed_total", 1, timeout_s=60)
        workers[1].process.send_signal(signal.SIGKILL)  # leaves without a word: its partitions move after the session timeout
        workers[1].process.wait(timeout=30)
        feeding.join(timeout=120)
        records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=300, settle_s=3,
                             committed_only=exactly_once)
        assert workers[2].stop() == 0
    finally:
        for worker in workers:
            worker.__exit__(None, None, None)
    duplicates = check_every_event_predicted(bodies, records)
    print(f"predictions {len(records)} for {len(bodies)} events: {duplicates} re-emitted across 4 rebalances")
    if exactly_once:
        assert duplicates == 0, "a read_committed reader sees each output once"
    # Each rebalance can leave each worker's polled, uncommitted batch (and one asynchronously committed) to replay.
    assert duplicates <= 4 * 3 * 2 * BATCH, duplicates


def test_a_rebalance_begun_by_new_topic_metadata_completes_though_the_revoke_outlasts_the_poll(stack, names):
    """kafka-python joins the group with the partitions its first metadata after subscribing shows; when that
    metadata comes after the first join (a poll right after subscribing), or shows new partitions later, the
    leader rebalances again. The worker's revoke callback first finishes its batches in flight, which can take
    longer than the poll: without streamadapt.kafka.workarounds.rejoin_until_joined the join then completed between two polls and was
    never finished, and the consumer read nothing more (a stalled worker at start-up)."""
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    admin.create_topics([NewTopic(names.input_topic, 4, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap)

    def send(value: bytes) -> None:
        for partition in range(4):
            for _ in range(50):
                producer.send(names.input_topic, value=value, partition=partition)
        producer.flush()

    send(b"first")
    revokes = []
    settings = load_settings(names.env(stack)).kafka
    consumer = open_consumer(settings, before_revoke=lambda: (revokes.append(1), time.sleep(0.3)))
    seen = {partition: 0 for partition in range(4)}
    try:
        began = time.monotonic()
        while time.monotonic() < began + 20 and (min(seen.values()) < 100 or not revokes):
            if time.monotonic() > began + 3 and sum(seen.values()) == 200:
                send(b"second")  # after the rebalance: read only if its join was seen through
            for tp, records in consumer.poll(timeout_ms=settings.poll_timeout_ms).items():
                seen[tp.partition] += len(records)
            time.sleep(0.05)  # the serving loop's work between two polls
    finally:
        consumer.close()
        producer.close()
    assert revokes, "no rebalance took partitions away: the case this test is about did not arise"
    assert seen == {partition: 100 for partition in range(4)}, seen


def test_partitions_added_to_the_input_topic_are_read_and_every_event_predicted(stack, names, checkpoint, tmp_path):
    """Adding partitions is how a busy input topic is scaled out. A serving worker picks them up at its next
    metadata refresh (within 30 s) and rebalances onto them; every event, on old partitions and new, gets its
    prediction, and the worker commits its place on the new partitions."""
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    admin.create_topics([NewTopic(names.input_topic, 2, 1)])
    bodies = [event(i, user=f"user-{i % 211}") for i in range(6_000)]
    first, second = bodies[:3_000], bodies[3_000:]
    env = {"STREAMADAPT_ROLE": "worker", "STREAMADAPT_NO_FINETUNE": "true"}
    try:
        with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
            produce(stack, names.input_topic, [dumps(b) for b in first], keys=[b["user_id"].encode() for b in first])
            worker.wait_metric("streamadapt_predictions_total", len(first), timeout_s=120)
            admin.create_partitions({names.input_topic: NewPartitions(4)})
            placed = produce(stack, names.input_topic, [dumps(b) for b in second], keys=[b["user_id"].encode() for b in second])
            assert {partition for partition, _ in placed} == {0, 1, 2, 3}, "the new partitions got no events"
            records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=120, settle_s=2)
            assert worker.stop() == 0
    finally:
        admin.close()
    check_every_event_predicted(bodies, records)
    committed = committed_offsets(stack, names.group_id, names.input_topic)
    on_new = sum(1 for partition, _ in placed if partition >= 2)
    assert committed[2] + committed[3] == on_new, committed
