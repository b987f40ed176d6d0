"""Exactly-once commit step of the serving loop, with fake clients: a failed transaction rewinds its batch."""
from types import SimpleNamespace

import pytest
from kafka import TopicPartition

from worker import kafka_io
from worker.metrics import WorkerMetrics
from worker.pipeline import InputRecord
from worker.serving import BatchAborted, Outbox, ServingLoop
from worker.settings import load_settings
from worker.state import StateWrites


class FakeProducer:
    def __init__(self, error: Exception | None = None):
        self.error = error
        self.transactions: list[tuple] = []

    def send_in_transaction(self, messages, next_offsets, group_metadata):
        self.transactions.append((len(messages), dict(next_offsets), group_metadata))
        if self.error is not None:
            raise self.error


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


class FakeStore:
    def save(self, writes):
        pass


RECORDS = [InputRecord("in", 0, 10, 0, b"k", b"{}"), InputRecord("in", 1, 4, 0, b"k", b"{}"),
           InputRecord("in", 0, 11, 0, b"k", b"{}")]


def commit_with(producer, consumer) -> None:
    settings = load_settings({"STREAMADAPT_KAFKA_EXACTLY_ONCE": "true"})
    model = SimpleNamespace(version="v1", meta=SimpleNamespace(task="next_category"))
    loop = ServingLoop(settings, consumer, producer, store=FakeStore(), model=model, metrics=WorkerMetrics())
    outbox = Outbox([("predictions", b"u", b"{}", None), ("dlq", None, b"{}", None)], StateWrites(), [])
    loop._commit(RECORDS, outbox)


def test_a_batch_is_one_transaction_with_the_offsets_after_it_and_the_group_metadata():
    producer = FakeProducer()
    commit_with(producer, FakeConsumer({TopicPartition("in", 0)}))
    assert producer.transactions == [(2, {TopicPartition("in", 0): 12, TopicPartition("in", 1): 5}, "generation-7")]


def test_an_aborted_transaction_rewinds_the_partitions_still_owned():
    consumer = FakeConsumer({TopicPartition("in", 0)})
    with pytest.raises(BatchAborted, match="3 records aborted"):
        commit_with(FakeProducer(kafka_io.TransactionAborted("CommitFailedError: generation is stale")), consumer)
    assert consumer.seeks == {TopicPartition("in", 0): 10}  # partition 1 went to another worker: not ours to rewind


def test_a_fenced_producer_ends_the_loop_with_a_reason():
    with pytest.raises(kafka_io.ProducerFenced, match="own --kafka-transactional-id"):
        commit_with(FakeProducer(kafka_io.ProducerFenced()), FakeConsumer(set()))
