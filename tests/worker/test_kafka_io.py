import pytest
from kafka import TopicPartition
from kafka.errors import (
    CommitFailedError, IllegalGenerationError, KafkaConnectionError, RebalanceInProgressError, UnknownMemberIdError,
)

from worker.kafka_io import commit


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
