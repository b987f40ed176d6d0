"""Exactly-once commit step of the serving loop, with fake clients: how a failed transaction is handled."""
from types import SimpleNamespace

import pytest
from kafka import TopicPartition
from kafka.errors import CommitFailedError, ProducerFencedError

from worker.metrics import WorkerMetrics
from worker.pipeline import InputRecord
from worker.serving import BatchAborted, Outbox, ServingLoop
from worker.settings import load_settings
from worker.state import StateWrites


class FakeProducer:
    def __init__(self, commit_error: Exception | None = None):
        self.commit_error = commit_error
        self.calls: list[str] = []

    def partitions_for(self, topic):
        return {0, 1}

    def begin_transaction(self):
        self.calls.append("begin")

    def send(self, topic, key=None, value=None, partition=None):
        self.calls.append(f"send {topic}")
        return SimpleNamespace(get=lambda timeout=None: None)

    def flush(self, timeout=None):
        self.calls.append("flush")

    def send_offsets_to_transaction(self, offsets, group_metadata):
        self.calls.append(f"offsets {sorted((tp.partition, o.offset) for tp, o in offsets.items())} {group_metadata}")

    def commit_transaction(self):
        self.calls.append("commit")
        if self.commit_error is not None:
            raise self.commit_error

    def abort_transaction(self):
        self.calls.append("abort")


class FakeConsumer:
    def __init__(self, owned):
        self.owned = set(owned)
        self.seeks: dict[TopicPartition, int] = {}

    def assignment(self):
        return self.owned

    def group_metadata(self):
        return "generation-7"

    def seek(self, tp, offset):
        self.seeks[tp] = offset


def loop_with(producer, consumer) -> ServingLoop:
    settings = load_settings({"STREAMADAPT_KAFKA_EXACTLY_ONCE": "true"})
    model = SimpleNamespace(version="v1", meta=SimpleNamespace(task="next_category"))
    return ServingLoop(settings, consumer, producer, store=None, model=model, metrics=WorkerMetrics())


RECORDS = [InputRecord("in", 0, 10, 0, b"k", b"{}"), InputRecord("in", 1, 4, 0, b"k", b"{}"),
           InputRecord("in", 0, 11, 0, b"k", b"{}")]
OFFSETS = {TopicPartition("in", 0): 12, TopicPartition("in", 1): 5}


def outbox() -> Outbox:
    return Outbox([("predictions", b"u", b"{}", None), ("dlq", None, b"{}", None)], StateWrites(), [])


def test_a_batch_is_one_transaction_with_its_offsets():
    producer = FakeProducer()
    loop_with(producer, FakeConsumer({TopicPartition("in", 0)}))._produce_in_transaction(RECORDS, outbox(), OFFSETS)
    assert producer.calls == ["begin", "send predictions", "send dlq", "flush", "offsets [(0, 12), (1, 5)] generation-7",
                              "commit"]


def test_a_refused_commit_aborts_and_rewinds_the_partitions_still_owned():
    producer, consumer = FakeProducer(CommitFailedError("generation is stale")), FakeConsumer({TopicPartition("in", 0)})
    with pytest.raises(BatchAborted, match="3 records aborted"):
        loop_with(producer, consumer)._produce_in_transaction(RECORDS, outbox(), OFFSETS)
    assert producer.calls[-2:] == ["commit", "abort"]
    assert consumer.seeks == {TopicPartition("in", 0): 10}  # partition 1 went to another worker: not ours to rewind


def test_a_fenced_producer_is_fatal_and_says_why():
    producer = FakeProducer(ProducerFencedError())
    with pytest.raises(RuntimeError, match="own --kafka-transactional-id"):
        loop_with(producer, FakeConsumer(set()))._produce_in_transaction(RECORDS, outbox(), OFFSETS)
    assert "abort" not in producer.calls
