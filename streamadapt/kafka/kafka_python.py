"""The Kafka clients on kafka-python: the serving loop's adapter (streamadapt.kafka.protocol), and the plain
clients everything else opens (the trainer's and the tools' producers, the model follower, the admin client).
Every client is configured here, from one KafkaSettings.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KafkaPartition
from kafka.errors import (
    BrokerNotAvailableError,
    CommitFailedError,
    IllegalGenerationError,
    InvalidRecordError,
    InvalidTimestampError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    RebalanceInProgressError,
    RecordListTooLargeError,
    UnknownMemberIdError,
)
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata

from streamadapt.kafka import workarounds
from streamadapt.kafka.deadline import Deadline
from streamadapt.kafka.protocol import (
    ACK_TIMEOUT_S,
    InputRecord,
    KafkaClientError,
    KafkaUnavailable,
    Message,
    NotAcknowledged,
    ProducerFenced,
    RecordsRefused,
    TopicPartition,
    TransactionAborted,
)
from streamadapt.settings import KafkaSettings

log = logging.getLogger(__name__)


def client_options(settings: KafkaSettings, role: str = "") -> dict:
    """What every Kafka client of the worker shares: where the brokers are, who we are, and how we
    authenticate (TLS and SASL). `role` is appended to the client id, as broker logs show it."""
    workarounds.apply_to_transports()  # every kafka-python client is built from these options
    options = {"bootstrap_servers": settings.bootstrap,
               "client_id": f"{settings.client_id}-{role}" if role else settings.client_id,
               "security_protocol": settings.security_protocol}
    if settings.security_protocol.startswith("SASL_"):
        options.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=settings.sasl_password.get_secret_value())
    if settings.security_protocol.endswith("SSL"):
        options.update(ssl_cafile=_path(settings.ssl_cafile), ssl_certfile=_path(settings.ssl_certfile),
                       ssl_keyfile=_path(settings.ssl_keyfile))
    return options


def _path(path) -> str | None:
    return None if path is None else str(path)


def open_consumer(settings: KafkaSettings, before_revoke: Callable[[], None],
                  on_assigned: Callable[[set[TopicPartition]], dict[TopicPartition, int]] = lambda _: {},
                  metadata_timeout_s: float = 60.0) -> KafkaConsumer:
    """A consumer subscribed to the input topic, once the topic's partitions are visible to it; a rebalance
    calls `before_revoke` before it takes partitions away, and `on_assigned` once it has assigned them, which
    returns the offsets to start some of them at (ServingConsumer.on_assigned).

    Subscribing before a just-created topic shows up in metadata would join the group with nothing to
    read until the next metadata refresh (minutes), so this waits for the partitions first.
    """
    consumer = KafkaConsumer(
        **client_options(settings),
        group_id=settings.group_id,
        enable_auto_commit=False,  # offsets are committed by the pipeline, after outputs are acknowledged
        auto_offset_reset="earliest",
        max_poll_records=settings.max_poll_records,
        max_partition_fetch_bytes=4 << 20,
        fetch_min_bytes=settings.fetch_min_bytes,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        fetch_max_bytes=32 << 20,
        metadata_max_age_ms=30_000,  # new partitions of the input topic are picked up within 30 s
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        # Exactly-once: only committed input (records of aborted upstream transactions are skipped).
        isolation_level="read_committed" if settings.exactly_once else "read_uncommitted",
    )
    deadline = time.monotonic() + metadata_timeout_s
    while not consumer.partitions_for_topic(settings.input_topic):
        if time.monotonic() > deadline:
            consumer.close()
            raise KafkaTimeoutError(f"topic {settings.input_topic} has no visible partitions after {metadata_timeout_s:.0f} s")
        consumer.topics()  # forces a metadata refresh
        time.sleep(0.2)
    workarounds.apply_to_consumer(consumer)
    consumer.subscribe([settings.input_topic], listener=_Rebalance(consumer, before_revoke, on_assigned))
    return consumer


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: KafkaConsumer, before_revoke: Callable[[], None],
                 on_assigned: Callable[[set[TopicPartition]], dict[TopicPartition, int]]):
        self._consumer = consumer
        self._before_revoke = before_revoke
        self._on_assigned = on_assigned

    def on_partitions_revoked(self, revoked) -> None:
        if revoked:
            self._before_revoke()

    def on_partitions_assigned(self, assigned) -> None:
        for tp, offset in self._on_assigned({_ours(tp) for tp in assigned}).items():
            self._consumer.seek(KafkaPartition(*tp), offset)


def open_producer(settings: KafkaSettings, transactional_id: str | None = None, linger_ms: int = 5,
                  max_batch_bytes: int | None = None) -> KafkaProducer:
    """An idempotent producer; a transactional one (initialised, ready for `begin_transaction`) when
    `transactional_id` is given. The serving loop's has `linger_ms` 0: it sends a whole batch at once and
    never flushes, so a linger would only delay every batch. Initialising aborts whatever transaction a
    crashed predecessor with the same id left open, so read_committed readers are not held up until it times
    out."""
    producer = KafkaProducer(
        **client_options(settings),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        # A polled batch's predictions often all go to one partition (the input and the output are keyed by
        # user_id alike), about 1 MB for 2,000. Once a partition's records outgrow one producer batch,
        # kafka-python wakes its sender thread on every further send, so a batch this large keeps those
        # wake-ups rare. Kept under the broker's default message.max.bytes (1 MiB), and under the output topics'.
        batch_size=min(1_000_000, max_batch_bytes or 1_000_000),
        max_request_size=4 << 20,
        transactional_id=transactional_id,
    )
    if transactional_id is not None:
        try:
            producer.init_transactions()
        except Exception:
            producer.close(timeout=5)
            raise
    return producer


# The group changed under the consumer (a replica joined or left): the commit is refused, not failed.
GROUP_CHANGED = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)


def commit(consumer: KafkaConsumer, next_offsets: dict[TopicPartition, int]) -> bool:
    """Commit `next_offsets` (the offset of the next record to read, per partition).

    Returns False when the group rebalanced under us: the partitions' new owner then reads these records
    again, and since outputs are idempotent by event_id it re-emits the same ones. Other errors raise.
    """
    with _reported_as_protocol():
        try:
            consumer.commit(_offsets(next_offsets))
        except GROUP_CHANGED as error:
            log.warning("offset commit refused during a rebalance, the records will be replayed: %s", error)
            return False
    return True


def commit_async(consumer: KafkaConsumer, next_offsets: dict[TopicPartition, int],
                 done: Callable[[], None] = lambda: None) -> None:
    """Commit `next_offsets` without waiting for the coordinator: a round trip less per batch. `done()` is
    called once the coordinator has answered, whatever it said (possibly on the client's own thread).

    Safe for at-least-once because it is only called once the batch's outputs are acknowledged; a
    commit lost in a crash or a rebalance makes the partition's next owner replay that batch, whose
    outputs are then the same. Shutdown commits synchronously (`commit`)."""

    def answered(offsets, response) -> None:
        if isinstance(response, Exception):
            log.warning("an offset commit was refused, those records will be replayed if this worker stops "
                        "before its next commit: %s", response)
        done()

    try:
        consumer.commit_async(_offsets(next_offsets), callback=answered)
    except KafkaError as error:  # no coordinator (the broker is away): refused at once, as if answered so
        answered(next_offsets, error)


def consumer_lag(consumer: KafkaConsumer) -> dict[TopicPartition, int]:
    """Per assigned partition: the high-water mark of the last fetch response minus the position.

    Both are known locally, so reading the lag costs no round trip to the broker (it used to take one
    per partition every few seconds, which showed up as latency spikes)."""
    lag = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            lag[_ours(tp)] = max(0, highwater - consumer.position(tp))
    return lag


class KeyPartitioner:
    """The partition of a record key, as kafka-python's default partitioner (and the Java client) picks
    it: murmur2 of the key modulo the topic's partition count. Remembered per key, because the serving
    loop sends one record per event and users come back; hashing each time cost a sixth of `send`.

    Call `new_batch()` before each batch: the topics' partition counts are re-read then, and a topic
    whose count changed starts a fresh memo.
    """

    # An entry costs about its key plus this (a dict slot, a bytes object, an int): the memo is bounded in bytes,
    # since keys are any bytes a producer sends (an invalid record's key comes back on its dead letter).
    ENTRY_OVERHEAD_BYTES = 120

    def __init__(self, producer: KafkaProducer, max_memo_bytes: int = 64 << 20):
        self._producer = producer
        self._max_memo_bytes = max_memo_bytes
        self._memo_bytes = 0
        self._topics: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self._checked: set[str] = set()

    def new_batch(self) -> None:
        self._checked.clear()

    def __call__(self, topic: str, key: bytes | None) -> int | None:
        """The partition for `key`, or None (kafka-python then picks one) for records without a key."""
        if key is None:
            return None
        if topic not in self._checked:
            partitions = sorted(self._producer.partitions_for(topic))
            known = self._topics.get(topic)
            if known is None or known[0] != partitions:
                self._topics[topic] = (partitions, {})
            self._checked.add(topic)
        partitions, memo = self._topics[topic]
        partition = memo.get(key)
        if partition is None:
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
            self._memo_bytes += len(key) + self.ENTRY_OVERHEAD_BYTES
            if self._memo_bytes > self._max_memo_bytes:
                for _, other in self._topics.values():
                    other.clear()
                self._memo_bytes = len(key) + self.ENTRY_OVERHEAD_BYTES
            memo[key] = partition
        return partition

    @property
    def memo_bytes(self) -> int:
        return self._memo_bytes


class ServingConsumer:
    """The serving loop's consumer on kafka-python: batches of InputRecords, pause and rewind, commits, lag.
    `before_revoke` and `on_assigned` are called inside `poll` around a rebalance (the protocol's)."""

    def __init__(self, consumer: KafkaConsumer):
        self._consumer = consumer
        self.before_revoke: Callable[[], None] = lambda: None
        self.on_assigned: Callable[[set[TopicPartition]], dict[TopicPartition, int]] = lambda _: {}

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputRecord]:
        with _reported_as_protocol():
            polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [InputRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
                for batch in polled.values() for r in batch]

    def assignment(self) -> set[TopicPartition]:
        return {_ours(tp) for tp in self._consumer.assignment()}

    def pause_all(self) -> None:
        self._consumer.pause(*self._consumer.assignment())

    def resume_all(self) -> None:
        self._consumer.resume(*self._consumer.paused())

    def pause(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self._consumer.pause(*(KafkaPartition(*tp) for tp in partitions))

    def resume(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self._consumer.resume(*(KafkaPartition(*tp) for tp in partitions))

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(KafkaPartition(*tp), offset)

    def commit(self, next_offsets: dict[TopicPartition, int]) -> bool:
        return commit(self._consumer, next_offsets)

    def commit_async(self, next_offsets: dict[TopicPartition, int], done: Callable[[], None]) -> None:
        commit_async(self._consumer, next_offsets, done)

    def lag(self) -> dict[TopicPartition, int]:
        return consumer_lag(self._consumer)

    def fetching(self) -> bool | None:
        """Whether the client sent a fetch within its metrics window (two samples of 30 s): kafka-python's
        `fetch-rate` is then above zero. A consumer with partitions fetches at least every fetch wait
        (`--kafka-fetch-max-wait-ms`), even from an idle topic. None when the client does not report that
        metric (kafka-python calls its metrics an unstable interface): a renamed metric must not read as a
        stall."""
        rate = (self._consumer.metrics() or {}).get("consumer-fetch-manager-metrics", {}).get("fetch-rate")
        return None if rate is None else rate > 0.0

    def group_metadata(self):
        return self._consumer.group_metadata()

    def close(self) -> None:
        self._consumer.close()


class Acks:
    """The acknowledgements of one batch's records on kafka-python (protocol.Acks). `refused` are records the
    client refused when they were sent (larger than its request size), by index."""

    def __init__(self, futures: list[Future | None], refused: dict[int, str] | None = None):
        self._futures = futures
        self._refused = refused or {}
        self._next = 0  # the futures before this one are done: each is looked at until done, then never again

    def done(self) -> bool:
        futures, i, n = self._futures, self._next, len(self._futures)
        while i < n and (futures[i] is None or futures[i].is_done):
            i += 1
        self._next = i
        return i == n

    def wait(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` (the sender thread completes the futures; there is nothing to wake us)."""
        if not self.done():
            time.sleep(timeout_s)

    def check(self) -> dict[int, str]:
        refused = dict(self._refused)
        for index, future in enumerate(self._futures):
            if future is None or future.exception is None:
                continue
            if isinstance(future.exception, RECORD_REFUSED):
                refused[index] = _described(future.exception)
            else:
                raise _refusal(future.exception)
        return refused


# The broker (or the client) refuses the record itself: sending it again would fail again.
RECORD_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, InvalidTimestampError)


def _described(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _refusal(error: Exception) -> Exception:
    """A send error as the serving loop tells them apart: retriable ones (an outage) as NotAcknowledged."""
    if isinstance(error, KafkaError) and (getattr(error, "retriable", False) or isinstance(error, KafkaTimeoutError)):
        return NotAcknowledged(_described(error))
    return KafkaClientError(_described(error)) if isinstance(error, KafkaError) else error


class ServingProducer:
    """The serving loop's producer on kafka-python: a batch of records sent without waiting, whose
    acknowledgements the loop checks later (`Acks`); or a batch and the input offsets in one transaction."""

    def __init__(self, producer: KafkaProducer):
        self._producer = producer
        self._partition_of = KeyPartitioner(producer)
        self._deadline = Deadline(ACK_TIMEOUT_S)

    def send(self, messages: list[Message]) -> Acks:
        """Hand `messages` to the client, which sends them at once (linger 0) on its own thread."""
        self._partition_of.new_batch()
        send, partition_of = self._producer.send, self._partition_of
        futures: list[Future | None] = []
        refused: dict[int, str] = {}
        with _reported_as_protocol():  # a send waits for the topic's metadata, and can time out
            for index, (topic, key, value) in enumerate(messages):
                try:
                    futures.append(send(topic, key=key, value=value, partition=partition_of(topic, key)))
                except MessageSizeTooLargeError as error:
                    futures.append(None)
                    refused[index] = _described(error)
        return Acks(futures, refused)

    def flush(self, timeout_s: float = ACK_TIMEOUT_S) -> None:
        """Wait until every record sent so far is acknowledged or refused (their Acks say which)."""
        with _reported_as_protocol():
            self._producer.flush(timeout=timeout_s)

    def send_in_transaction(self, messages: list[Message], next_offsets: dict[TopicPartition, int],
                            group_metadata) -> None:
        """`messages` and the consumer's `next_offsets` in one transaction. Raises TransactionAborted (after
        aborting) when it fails, ProducerFenced when another producer has our transactional id, and
        TransactionStuck when a transactional call waits past its deadline (kafka-python's take no timeout)."""
        producer = self._producer
        with _reported_as_protocol():
            producer.begin_transaction()
        try:
            acks = self.send(messages)
            producer.flush(timeout=ACK_TIMEOUT_S)
            refused = acks.check()
            if refused:
                raise RecordsRefused(refused)
            self._deadline.call("send_offsets_to_transaction", producer.send_offsets_to_transaction,
                                _offsets(next_offsets), group_metadata)
            self._deadline.call("commit_transaction", producer.commit_transaction)
        except ProducerFencedError as error:
            raise ProducerFenced() from error
        except (KafkaError, KafkaClientError) as error:
            self._deadline.call("abort_transaction", producer.abort_transaction)
            raise TransactionAborted(_described(error),
                                     error.refused if isinstance(error, RecordsRefused) else None) from error

    def close(self, timeout_s: float = 30.0) -> None:
        self._deadline.close()
        self._producer.close(timeout=timeout_s)


def open_serving_producer(settings: KafkaSettings, transactional_id: str | None,
                          max_batch_bytes: int | None = None) -> ServingProducer:
    with _reported_as_protocol():
        return ServingProducer(open_producer(settings, transactional_id, linger_ms=0, max_batch_bytes=max_batch_bytes))


def open_serving_consumer(settings: KafkaSettings) -> ServingConsumer:
    with _reported_as_protocol():
        consumer = ServingConsumer(open_consumer(settings, lambda: consumer.before_revoke(),
                                                 lambda assigned: consumer.on_assigned(assigned)))
    return consumer


# A broker, leader or coordinator away for now: the loop produces the batch again once it is back.
_UNAVAILABLE = (KafkaTimeoutError, KafkaConnectionError, BrokerNotAvailableError)


@contextmanager
def _reported_as_protocol() -> Iterator[None]:
    """kafka-python's errors as the protocol's: an outage as KafkaUnavailable, any other as KafkaClientError."""
    try:
        yield
    except _UNAVAILABLE as error:
        raise KafkaUnavailable(_described(error)) from error
    except KafkaError as error:
        raise KafkaClientError(_described(error)) from error


def _ours(tp: KafkaPartition) -> TopicPartition:
    return TopicPartition(tp.topic, tp.partition)


def _offsets(next_offsets: dict[TopicPartition, int]) -> dict[KafkaPartition, OffsetAndMetadata]:
    return {KafkaPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in next_offsets.items()}
