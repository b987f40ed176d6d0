import pytest
from kafka import TopicPartition
from kafka.errors import (
    CommitFailedError, IllegalGenerationError, KafkaConnectionError, RebalanceInProgressError, UnknownMemberIdError,
)

from worker.kafka_io import KeyPartitioner, commit


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


def test_other_errors_still_raise():
    with pytest.raises(KafkaConnectionError):
        commit(RefusingConsumer(KafkaConnectionError()), {TopicPartition("t", 0): 7})


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
    partition_of = KeyPartitioner(producer, max_keys_per_topic=50)
    keys = [f"user-{i}".encode() for i in range(300)] * 2  # repeated keys, and more keys than the memo holds
    for partitions in (range(6), range(9)):
        producer.metadata.partitions = partitions
        partition_of.new_batch()
        expected = [DefaultPartitioner().partition("t", k, k, None, None, producer.metadata) for k in keys]
        assert [partition_of("t", k) for k in keys] == expected
    assert partition_of("t", None) is None
