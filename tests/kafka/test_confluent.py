"""The confluent-kafka adapter's reading of librdkafka's transactional errors."""
import pytest
from confluent_kafka import KafkaError, KafkaException

from streamadapt.kafka.confluent import _fenced_if_fatal
from streamadapt.kafka.protocol import ProducerFatal, ProducerFenced


def test_only_fencing_is_called_fenced_and_any_other_fatal_error_ends_the_process_to_be_restarted():
    with pytest.raises(ProducerFenced, match="own --kafka-transactional-id"):
        _fenced_if_fatal(KafkaException(KafkaError(KafkaError.PRODUCER_FENCED, fatal=True)))
    # what librdkafka says when a commit retried after a broker restart finds its transaction already ended
    invalid = KafkaException(KafkaError(KafkaError.INVALID_TXN_STATE, "Failed to end transaction", fatal=True))
    with pytest.raises(ProducerFatal, match="restart resolves the open transaction"):
        _fenced_if_fatal(invalid)
    _fenced_if_fatal(KafkaException(KafkaError(KafkaError._TIMED_OUT, retriable=True)))  # retried, not fatal
    _fenced_if_fatal(ValueError("not a Kafka error"))


def test_a_group_coordinator_loading_or_moving_is_an_outage_to_wait_out():
    from streamadapt.kafka.confluent import _protocol_error
    from streamadapt.kafka.protocol import KafkaClientError, KafkaUnavailable

    for code in (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR):
        assert isinstance(_protocol_error(KafkaException(KafkaError(code, "Commit failed"))), KafkaUnavailable)
    refused = _protocol_error(KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)))
    assert type(refused) is KafkaClientError


class UnansweredAborts:
    """A librdkafka producer whose transaction coordinator never answers an abort."""

    def __init__(self):
        self.aborts = 0

    def abort_transaction(self, timeout_s):
        self.aborts += 1
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish",
                                        retriable=True))


def test_an_abort_left_unanswered_is_tried_again_then_given_up_for_a_restart(monkeypatch):
    from streamadapt.kafka import confluent
    from streamadapt.kafka.protocol import KafkaUnavailable, TransactionStuck

    clock = [1000.0]
    monkeypatch.setattr(confluent.time, "monotonic", lambda: clock[0])
    producer = confluent.ServingProducer(UnansweredAborts())
    try:
        for _ in range(3):  # within the bound: an outage, tried again by the next batch
            with pytest.raises(KafkaUnavailable, match="abort_transaction"):
                producer._abort()
            clock[0] += confluent.ABORT_GIVE_UP_S / 4
        clock[0] += confluent.ABORT_GIVE_UP_S
        with pytest.raises(TransactionStuck, match="restart resolves the open transaction"):
            producer._abort()
    finally:
        producer._deadline.close()
