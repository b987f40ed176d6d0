"""The serving path end to end: real Kafka, real Redis, the worker as a real process."""
from __future__ import annotations

import json
import signal
import urllib.request
from collections import Counter, defaultdict

import pytest

from streamadapt.schemas import DeadLetter, Prediction
from tests.conftest import stack_with
from tests.integration.conftest import (
    WorkerProcess,
    committed_offsets,
    dumps,
    event,
    metric_at,
    produce,
    read_topic,
)

pytestmark = pytest.mark.integration

BREAKING = [  # (payload, reason) for every kind of contract-breaking input
    (b"this is not json", "invalid_json"),
    (b"\xff\xfe\xfa invalid utf-8", "invalid_json"),
    (b"[" * 2000 + b"]" * 2000, "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"", "empty_payload"),
    (None, "empty_payload"),
    (dumps({k: v for k, v in event(900001).items() if k != "price"}), "missing_field"),
    (dumps(event(900002, price="12.50")), "wrong_type"),
    (dumps(event(900003, quantity=0)), "invalid_value"),
    (dumps(event(900004, currency="euros")), "invalid_value"),
    (dumps(event(900005)).replace(b'"price": 8.5', b'"price": NaN'), "non_finite_number"),
    (dumps(event(900006, ts="2025-08-01T10:00:00")), "invalid_timestamp"),
    (dumps(event(900007, ts="2999-01-01T00:00:00Z")), "future_timestamp"),
    (dumps(event(900008, schema_version=99)), "unsupported_schema_version"),
    (dumps(event(900009, padding="x" * 70_000)), "payload_too_large"),
]


@pytest.mark.parametrize("client, redis_kind", [("kafka-python", "redis"), ("confluent", "redis-cluster")])
def test_bad_input_is_dead_lettered_duplicates_dropped_and_every_valid_event_predicted_once(request, names, checkpoint, tmp_path,
                                                                                           client, redis_kind):
    stack = stack_with(request, redis_kind)
    assert b"NaN" in BREAKING[10][0]
    valid = [event(i) for i in range(300)]
    values, expected_reasons = [], {}
    for i, body in enumerate(valid):
        values.append(dumps(body))
        if i % 20 == 0:
            payload, reason = BREAKING[(i // 20) % len(BREAKING)]
            expected_reasons[len(values)] = reason
            values.append(payload)
        if i % 50 == 7:
            values.append(dumps(body))  # an exact repeat: must not be predicted twice
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", STREAMADAPT_KAFKA_CLIENT=client) as worker:
        coordinates = produce(stack, names.input_topic, values)
        predictions = read_topic(stack, names.predictions_topic, expect=len(valid))
        letters = read_topic(stack, names.dlq_topic, expect=len(expected_reasons))
        worker.wait_metric("streamadapt_events_consumed_total", len(values))

        by_event = Counter(json.loads(r.value)["event_id"] for r in predictions)
        assert set(by_event) == {b["event_id"] for b in valid}
        assert set(by_event.values()) == {1}, "every valid event gets exactly one prediction"
        for record in predictions:
            Prediction.model_validate_json(record.value)
        assert worker.metric("streamadapt_events_duplicate_total") == sum(1 for i in range(300) if i % 50 == 7)

        got = {(d.partition, d.offset): d for d in (DeadLetter.model_validate_json(r.value) for r in letters)}
        assert len(got) == len(letters) == len(expected_reasons)
        for position, reason in expected_reasons.items():
            partition, offset = coordinates[position]
            letter = got[(partition, offset)]
            assert (letter.reason.value, letter.topic) == (reason, names.input_topic)
            assert letter.detail
        assert set(expected_reasons.values()) == {reason for _, reason in BREAKING}

        # still up and serving
        assert worker.http_status("/healthz") == 200 and worker.http_status("/readyz") == 200
        produce(stack, names.input_topic, [dumps(event(5000))])
        assert any(json.loads(r.value)["event_id"] == "ev-5000"
                   for r in read_topic(stack, names.predictions_topic, expect=len(valid) + 1))
        assert worker.stop() == 0


@pytest.mark.parametrize("client, exactly_once", [("confluent", "false"), ("kafka-python", "true"),
                                                   pytest.param("kafka-python", "false", marks=pytest.mark.faults),
                                                   pytest.param("confluent", "true", marks=pytest.mark.faults)])
def test_hostile_records_are_dead_lettered_within_the_topics_limit_and_the_records_around_them_served(
        stack, names, checkpoint, tmp_path, client, exactly_once):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    dlq_limit = 65_536  # the dead-letter topic accepts less than the worker's default bound: read at start-up
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka_bootstrap)
    admin.create_topics([NewTopic(names.dlq_topic, 1, 1, topic_configs={"max.message.bytes": str(dlq_limit)})])
    admin.close()
    hostile = [  # (key, value, reason)
        (b"k" * 700_000, b"\x01" * 300_000, "payload_too_large"),  # about 1.09 MB of dead letter, uncut
        (b"k", dumps(event(900101, ts="0001-01-01T00:00:00+23:59")), "past_timestamp"),
        (b"k", dumps(event(900102, ts="1971-01-01T00:00:00Z")), "past_timestamp"),
        (b"k", dumps(event(900103, category="c" * 5000)), "field_too_long"),
        (b"k", dumps(event(900104, item_id="i" * 300)), "field_too_long"),
        (b"k", dumps(event(900105, event_id="e" * 200)), "field_too_long"),
    ]
    valid = [event(i) for i in range(300)]
    keys, values, expected = [], [], {}
    for i, body in enumerate(valid):
        keys.append(b"k")
        values.append(dumps(body))
        if i % 50 == 25:
            key, value, reason = hostile[i // 50]
            expected[len(values)] = reason
            keys.append(key)
            values.append(value)
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", STREAMADAPT_KAFKA_CLIENT=client,
                       STREAMADAPT_KAFKA_EXACTLY_ONCE=exactly_once) as worker:
        coordinates = produce(stack, names.input_topic, values, keys=keys)
        committed_only = exactly_once == "true"
        predictions = read_topic(stack, names.predictions_topic, expect=len(valid), committed_only=committed_only)
        letters = read_topic(stack, names.dlq_topic, expect=len(expected), committed_only=committed_only)
        worker.wait_metric("streamadapt_events_consumed_total", len(values))
        assert Counter(json.loads(r.value)["event_id"] for r in predictions) == Counter(b["event_id"] for b in valid)
        assert len(letters) == len(expected)
        got = {(d.partition, d.offset): (d, r) for r in letters for d in [DeadLetter.model_validate_json(r.value)]}
        for position, reason in expected.items():
            letter, record = got[coordinates[position]]
            assert letter.reason.value == reason, letter.detail
            assert len(record.key or b"") + len(record.value) <= dlq_limit
        big, record = got[coordinates[26]]
        assert big.payload_truncated and big.key_truncated and big.payload_bytes == 300_000
        assert record.key == b"k" * 1024 and set(big.payload) == {"\x01"}
        assert worker.metric("streamadapt_outputs_refused_total") == 0
        assert worker.http_status("/readyz") == 200
        worker.wait_until(lambda: sum(committed_offsets(stack, names.group_id, names.input_topic).values()) == len(values),
                          what="every record committed")
        assert worker.stop() == 0
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_sigterm_in_the_middle_of_a_backlog_loses_nothing(stack, names, checkpoint, tmp_path):
    bodies = [event(i, user=f"user-{i % 211}") for i in range(20_000)]
    produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
    worker = WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log",
                           STREAMADAPT_KAFKA_MAX_POLL_RECORDS="500").start()
    worker.wait_metric("streamadapt_events_consumed_total", 1000)
    assert worker.stop(signal.SIGTERM) == 0, (tmp_path / "worker.log").read_text()[-2000:]

    # Everything below a committed offset must already have its prediction (commit after outputs).
    committed = committed_offsets(stack, names.group_id, names.input_topic)
    partial = read_topic(stack, names.predictions_topic, expect=sum(committed.values()), timeout_s=30)
    predicted_ids = {json.loads(r.value)["event_id"] for r in partial}
    assert 0 < sum(committed.values()) < len(bodies), "the stop should land in the middle of the backlog"
    assert len(predicted_ids) >= sum(committed.values())

    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker2.log") as second:
        second.wait_metric("streamadapt_events_consumed_total", len(bodies) - sum(committed.values()), timeout_s=120)
        records = read_topic(stack, names.predictions_topic, expect=len(bodies))
        assert second.stop() == 0
    per_event = defaultdict(set)
    for record in records:
        body = json.loads(record.value)
        per_event[body["event_id"]].add(record.value)
    assert set(per_event) == {b["event_id"] for b in bodies}, "no event may lack a prediction"
    assert all(len(versions) == 1 for versions in per_event.values()), "a replay re-emits the same prediction"


def test_same_stream_gives_same_predictions_twice(stack, names, checkpoint, tmp_path):
    from tests.conftest import Names

    bodies = [event(i, user=f"user-{i % 23}") for i in range(1500)]
    runs = []
    for run in ("a", "b"):
        run_names = Names(*(f"{value}-{run}" for value in (names.input_topic, names.predictions_topic,
                                                               names.dlq_topic, names.group_id, names.key_prefix,
                                                               names.model_versions_topic)))
        with WorkerProcess(stack, run_names, checkpoint, tmp_path / f"worker-{run}.log") as worker:
            produce(stack, run_names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
            records = read_topic(stack, run_names.predictions_topic, expect=len(bodies))
            assert worker.stop() == 0
        runs.append({p["event_id"]: p for p in (json.loads(r.value) for r in records)})
    first, second = runs
    assert set(first) == set(second) == {b["event_id"] for b in bodies}
    for event_id, p in first.items():
        q = second[event_id]
        assert (p["label"], p["model_version"]) == (q["label"], q["model_version"])
        # float32 inference: BLAS sums a batch of one row (gemv) in another order than a larger batch (gemm), and
        # the two runs cut the stream into batches differently, so scores agree to float32 rounding, not bitwise
        assert p["score"] == pytest.approx(q["score"], rel=1e-5, abs=1e-6)
        assert [c["label"] for c in p["probabilities"]] == [c["label"] for c in q["probabilities"]]


def test_two_serving_processes_share_the_partitions_and_predict_every_event_once(stack, names, checkpoint, tmp_path):
    bodies = [event(i, user=f"user-{i % 101}") for i in range(4_000)]
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", STREAMADAPT_PROCESSES="2",
                       STREAMADAPT_ROLE="worker") as worker:
        second_port = worker.port + 2  # the second process serves its metrics on --metrics-port + 2
        # once the second process reports the lag of partitions of its own, the group has shared them out
        worker.wait_until(lambda: owns_partitions(second_port), timeout_s=90, what="the second process owning partitions")
        produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
        records = read_topic(stack, names.predictions_topic, expect=len(bodies), timeout_s=120)
        served = worker.metric("streamadapt_predictions_total"), metric_at(second_port, "streamadapt_predictions_total")
        assert worker.stop() == 0
    assert Counter(json.loads(r.value)["event_id"] for r in records) == Counter(b["event_id"] for b in bodies)
    assert all(count > 0 for count in served) and sum(served) == len(bodies), served


def owns_partitions(port: int) -> bool:
    """Whether the process serving metrics on `port` reports the lag of a partition (it is up and owns one)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
    except OSError:  # not listening yet
        return False
    return any(line.startswith("streamadapt_consumer_lag_records{") for line in lines)
