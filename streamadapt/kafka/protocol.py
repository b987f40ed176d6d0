"""What the serving loop needs of a Kafka client library, and the errors it tells apart. Pure: no client here.

Each library has an adapter behind these Protocols: `streamadapt.kafka.confluent` (librdkafka, the default)
and `streamadapt.kafka.kafka_python`. An adapter speaks in the types of this module only, and turns its
library's errors into the ones below, so the loop never learns which library runs under it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

ACK_TIMEOUT_S = 30.0  # an output not acknowledged by then counts as refused (NotAcknowledged)

# (topic, key, value): one record a batch produces
Message = tuple[str, "bytes | None", bytes]


class TopicPartition(NamedTuple):
    """A partition of a topic. A tuple, so it equals and hashes as kafka-python's TopicPartition does."""

    topic: str
    partition: int


class InputRecord(NamedTuple):
    """The parts of a consumed Kafka record the pipeline uses (a tuple: one is built per record)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None

    @property
    def ref(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def partition_ref(self) -> str:
        return partition_ref(self.topic, self.partition)


def partition_ref(topic: str, partition: int) -> str:
    """"{topic}/{partition}": how Redis keys an input partition (event-time progress, deadlines)."""
    return f"{topic}/{partition}"


class KafkaClientError(Exception):
    """The Kafka client failed in a way the operator may have to fix (at start-up: a wrong address or
    credentials, a topic that never shows up)."""


class KafkaUnavailable(KafkaClientError):
    """A broker, partition leader or coordinator cannot be reached now: the batch is produced again once it can."""


class NotAcknowledged(KafkaUnavailable):
    """A produced record was not acknowledged, by a retriable error or within ACK_TIMEOUT_S."""


class TransactionAborted(KafkaClientError):
    """Exactly-once: the batch's transaction failed and was aborted; nothing of it is visible to read_committed.
    `refused` are the indices of the batch's records that the broker will never accept (Acks.check)."""

    def __init__(self, message: str, refused: dict[int, str] | None = None):
        super().__init__(message)
        self.refused = refused or {}


class RecordsRefused(KafkaClientError):
    """Exactly-once: records of the batch were refused for what they are (Acks.check), so its transaction cannot
    commit; `refused` maps their index in the batch to the error."""

    def __init__(self, refused: dict[int, str]):
        super().__init__(f"{len(refused)} records refused: {next(iter(refused.values()))}")
        self.refused = refused


class TransactionStuck(RuntimeError):
    """Exactly-once: a transactional call did not return by its deadline (streamadapt.kafka.deadline), or did
    not succeed for that long, call after call. The transaction it holds can only be resolved by a new producer
    with the same transactional id, which aborts it, or completes a commit the coordinator had already
    decided: the process ends, and its restart does that before it reads on from the committed offsets."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(f"Kafka: {what} did not succeed within {timeout_s:.0f} s while a broker was away; "
                         "exiting so that a restart resolves the open transaction (its transactional id fences "
                         "this producer)")


class ProducerFatal(RuntimeError):
    """Exactly-once: the client declared its transactional producer unusable (a fatal error other than being
    fenced, such as librdkafka's INVALID_TXN_STATE when a commit retried after a broker restart finds its
    transaction already completed). Only a new producer with the same transactional id can learn how the open
    transaction ended: the process ends, and its restart does that."""

    def __init__(self, cause: str):
        super().__init__(f"Kafka: the transactional producer hit a fatal error ({cause}); exiting so that a restart "
                         "resolves the open transaction")


class ProducerFenced(RuntimeError):
    """Exactly-once: another producer took over this worker's transactional id. Not retried: two replicas
    share an id, which only the operator can fix."""

    def __init__(self) -> None:
        super().__init__("another producer took over this worker's transactional id: give each replica its own "
                         "--kafka-transactional-id (the default is <group-id>-<hostname>)")


class Acks(Protocol):
    """The acknowledgements of one batch's records: `done()` once every record is acknowledged or refused,
    without waiting. Then `check()` raises the first refusal that concerns more than one record
    (NotAcknowledged when retriable, KafkaClientError when not), and returns the records the broker refused
    for what they are (too large for the topic, invalid), by index in the batch, with the error: sending them
    again would fail again."""

    def done(self) -> bool: ...

    def wait(self, timeout_s: float) -> None: ...

    def check(self) -> dict[int, str]: ...


class ServingConsumer(Protocol):
    """The serving loop's consumer: a member of the input topic's group, committing offsets itself.
    `before_revoke` is called inside `poll` when a rebalance is about to take partitions away, and
    `on_assigned(assigned)` once it has assigned them: it returns the offsets to start some of them at, in
    place of where the client would (the committed offset, or for a partition kept through an eager
    rebalance, kafka-python's position before it)."""

    before_revoke: Callable[[], None]
    on_assigned: Callable[[set[TopicPartition]], dict[TopicPartition, int]]

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputRecord]: ...

    def assignment(self) -> set[TopicPartition]: ...

    def pause_all(self) -> None: ...

    def resume_all(self) -> None: ...

    def pause(self, partitions: set[TopicPartition]) -> None:
        """Stop fetching these partitions (of the assignment) until `resume`; a rebalance resumes what it assigns."""

    def resume(self, partitions: set[TopicPartition]) -> None: ...

    def seek(self, tp: TopicPartition, offset: int) -> None: ...

    def commit(self, next_offsets: dict[TopicPartition, int]) -> bool:
        """Commit and wait; False when the group changed under us (the records are replayed by their new owner)."""

    def commit_async(self, next_offsets: dict[TopicPartition, int], done: Callable[[], None]) -> None:
        """Commit without waiting; `done()` once the coordinator answered, whatever it said."""

    def lag(self) -> dict[TopicPartition, int]: ...

    def fetching(self) -> bool | None:
        """Whether the client fetched lately; None when it does not say."""

    def group_metadata(self) -> object: ...

    def close(self) -> None: ...


class ServingProducer(Protocol):
    """The serving loop's producer: a batch sent without waiting (its Acks are checked later), or a batch and
    the consumer's offsets in one transaction."""

    def send(self, messages: list[Message]) -> Acks: ...

    def flush(self, timeout_s: float = ACK_TIMEOUT_S) -> None: ...

    def send_in_transaction(self, messages: list[Message], next_offsets: dict[TopicPartition, int],
                            group_metadata: object) -> None:
        """Raises TransactionAborted (after aborting), ProducerFenced when another producer has our id."""

    def close(self, timeout_s: float = 30.0) -> None: ...
