from types import SimpleNamespace

import pytest
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaConnectionError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    ProducerFencedError,
    RebalanceInProgressError,
    TopicAuthorizationFailedError,
    UnknownMemberIdError,
)

from streamadapt.kafka.kafka_python import (
    Acks,
    KeyPartitioner,
    ServingConsumer,
    ServingProducer,
    commit,
)
from streamadapt.kafka.protocol import (
    KafkaClientError,
    KafkaUnavailable,
    NotAcknowledged,
    ProducerFenced,
    TopicPartition,
    TransactionAborted,
)


class RefusingConsumer:
    """Stands in for the consumer's commit call only; the real path is in tests/integration."""

    def __init__(self, error=None):
        self.error, self.committed = error, None

    def commit(self, offsets):
        if self.error is not None:
            raise self.error
        self.committed = offsets


def test_commit_sends_the_next_offsets():
    consumer = RefusingConsumer()
    assert commit(consumer, {TopicPartition("t", 0): 7})
    assert consumer.committed[TopicPartition("t", 0)].offset == 7


@pytest.mark.parametrize("error", [CommitFailedError(), RebalanceInProgressError(), IllegalGenerationError(),
                                   UnknownMemberIdError()])
def test_a_rebalance_refuses_the_commit_without_crashing(error):
    assert commit(RefusingConsumer(error), {TopicPartition("t", 0): 7}) is False


def test_an_unreachable_coordinator_is_an_outage_and_other_errors_still_raise():
    with pytest.raises(KafkaUnavailable):
        commit(RefusingConsumer(KafkaConnectionError()), {TopicPartition("t", 0): 7})
    with pytest.raises(KafkaClientError):
        commit(RefusingConsumer(MessageSizeTooLargeError()), {TopicPartition("t", 0): 7})


class _Metadata:
    def __init__(self, partitions):
        self.partitions = partitions

    def topics(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return set(self.partitions)

    def available_partitions_for_topic(self, topic):
        return set(self.partitions)


class _Producer:
    def __init__(self, partitions):
        self.metadata = _Metadata(partitions)

    def partitions_for(self, topic):
        return self.metadata.partitions_for_topic(topic)


def test_key_partitioner_agrees_with_kafka_pythons_default_partitioner_and_follows_new_partitions():
    from kafka.partitioner.default import DefaultPartitioner

    producer = _Producer(range(6))
    partition_of = KeyPartitioner(producer, max_memo_bytes=50 * (8 + KeyPartitioner.ENTRY_OVERHEAD_BYTES))
    keys = [f"user-{i}".encode() for i in range(300)] * 2  # repeated keys, and more keys than the memo holds
    for partitions in (range(6), range(9)):
        producer.metadata.partitions = partitions
        partition_of.new_batch()
        expected = [DefaultPartitioner().partition("t", k, k, None, None, producer.metadata) for k in keys]
        assert [partition_of("t", k) for k in keys] == expected
    assert partition_of("t", None) is None


def test_key_partitioner_memo_is_bounded_in_bytes_whatever_the_keys():
    producer = _Producer(range(6))
    partition_of = KeyPartitioner(producer, max_memo_bytes=4 << 20)
    partition_of.new_batch()
    for i in range(100):  # an invalid record's key is any size: its dead letter carries it back
        partition_of("purchases.dlq", i.to_bytes(4, "big") * 100_000)
        assert partition_of.memo_bytes <= 4 << 20


class TransactionalProducer:
    """kafka-python's transactional calls, recorded; `commit_error` is raised by commit_transaction."""

    def __init__(self, commit_error=None):
        self.commit_error, self.calls = commit_error, []

    def partitions_for(self, topic):
        return {0, 1}

    def begin_transaction(self):
        self.calls.append("begin")

    def send(self, topic, key=None, value=None, partition=None):
        self.calls.append(f"send {topic}/{partition}")
        return _Acknowledged()

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


class _Acknowledged:
    is_done, exception = True, None


MESSAGES = [("predictions", b"user-1", b"{}"), ("dlq", None, b"{}")]


class _Future:
    def __init__(self, is_done=False, exception=None):
        self.is_done, self.exception = is_done, exception


def test_a_batch_is_acknowledged_once_every_record_is_and_a_refusal_says_whether_it_is_an_outage():
    futures = [_Future(True), _Future(), _Future(True)]
    acks = Acks(futures)
    assert not acks.done()
    futures[1].is_done = True
    assert acks.done()
    assert acks.check() == {}  # all acknowledged
    futures[2].exception = NotLeaderForPartitionError()
    with pytest.raises(NotAcknowledged, match="NotLeaderForPartitionError"):
        acks.check()  # retriable: an outage, the batch is read again
    futures[2].exception = TopicAuthorizationFailedError()
    with pytest.raises(KafkaClientError, match="TopicAuthorizationFailedError"):
        acks.check()  # not retriable, and not about the record: the operator must act, the worker stops
    futures[2].exception = MessageSizeTooLargeError()
    assert list(acks.check()) == [2]  # refused for what it is: the loop skips it


def test_a_transaction_sends_the_batch_then_the_offsets_then_commits():
    producer = TransactionalProducer()
    ServingProducer(producer).send_in_transaction(MESSAGES, {TopicPartition("in", 0): 12}, "generation-7")
    partition = KeyPartitioner(producer)("predictions", b"user-1")
    assert producer.calls == ["begin", f"send predictions/{partition}", "send dlq/None", "flush",
                              "offsets [(0, 12)] generation-7", "commit"]


def test_a_refused_transaction_is_aborted_and_a_fenced_producer_says_so():
    producer = TransactionalProducer(CommitFailedError("generation is stale"))
    with pytest.raises(TransactionAborted, match="CommitFailedError"):
        ServingProducer(producer).send_in_transaction(MESSAGES, {TopicPartition("in", 0): 12}, "g")
    assert producer.calls[-2:] == ["commit", "abort"]
    fenced = TransactionalProducer(ProducerFencedError())
    with pytest.raises(ProducerFenced, match="own --kafka-transactional-id"):
        ServingProducer(fenced).send_in_transaction(MESSAGES, {TopicPartition("in", 0): 12}, "g")
    assert "abort" not in fenced.calls


@pytest.mark.parametrize("metrics, fetching", [
    ({"consumer-fetch-manager-metrics": {"fetch-rate": 1.9}}, True),
    ({"consumer-fetch-manager-metrics": {"fetch-rate": 0.0}}, False),
    ({"consumer-fetch-manager-metrics": {}}, None),  # a renamed metric must not read as a stall
    (None, None),  # metrics switched off
])
def test_whether_the_consumer_fetches_comes_from_kafka_pythons_fetch_rate(metrics, fetching):
    consumer = ServingConsumer(SimpleNamespace(metrics=lambda: metrics))
    assert consumer.fetching() is fetching
