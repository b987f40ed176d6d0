"""The serving loop's consumer and producer on confluent-kafka (librdkafka), for `--kafka-client confluent`.

The protocol's adapter (streamadapt.kafka.protocol) on librdkafka, with the guarantees of the kafka-python
one; the work of the Kafka protocol (fetching, batching, compression, acknowledgements) happens in librdkafka's C threads instead
of in Python. Keyed records go to the partition the Java client and kafka-python pick (murmur2), so
replicas on either client agree.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka import TopicPartition as ConfluentPartition

from streamadapt.kafka.deadline import Deadline
from streamadapt.kafka.protocol import (
    ACK_TIMEOUT_S,
    InputRecord,
    KafkaClientError,
    KafkaUnavailable,
    Message,
    NotAcknowledged,
    ProducerFatal,
    ProducerFenced,
    RecordsRefused,
    TopicPartition,
    TransactionAborted,
    TransactionStuck,
)
from streamadapt.settings import KafkaSettings

log = logging.getLogger(__name__)

# The group changed under the consumer: a commit is refused, the records are replayed by their new owner.
GROUP_CHANGED = {KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID,
                 KafkaError._ASSIGNMENT_LOST}
# A broker or the cluster is away, or the group coordinator is loading or moving (a broker restarting): the
# call is retried, as with kafka-python's timeouts. librdkafka does not flag the coordinator's errors retriable
# in what a synchronous commit raises.
UNAVAILABLE = {KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
               KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
               KafkaError.NOT_COORDINATOR}


def client_config(settings: KafkaSettings, role: str) -> dict:
    """librdkafka's names for streamadapt.kafka.kafka_python.client_options."""
    config = {"bootstrap.servers": settings.bootstrap, "client.id": f"{settings.client_id}-{role}",
              "security.protocol": settings.security_protocol.lower(),
              # librdkafka's own log lines go through Python's logging (and its format), not straight to stderr
              "logger": logging.getLogger("librdkafka")}
    if settings.security_protocol.startswith("SASL_"):
        config.update({"sasl.mechanism": settings.sasl_mechanism, "sasl.username": settings.sasl_username,
                       "sasl.password": settings.sasl_password.get_secret_value()})
    for key, path in (("ssl.ca.location", settings.ssl_cafile), ("ssl.certificate.location", settings.ssl_certfile),
                      ("ssl.key.location", settings.ssl_keyfile)):
        if path is not None:
            config[key] = str(path)
    return config


def _log_client_error(error: KafkaError) -> None:
    """librdkafka reports connection trouble here and retries by itself; only a fatal error ends us."""
    if error.fatal():
        raise KafkaException(error)
    log.warning("kafka client: %s", error.str())


@contextmanager
def _reported_as_protocol() -> Iterator[None]:
    """librdkafka's errors as the protocol's: an outage as KafkaUnavailable, any other as KafkaClientError."""
    try:
        yield
    except KafkaException as error:
        raise _protocol_error(error) from error


def _kafka_error(error: Exception) -> KafkaError | None:
    """The KafkaError a KafkaException carries, if it carries one."""
    cause = error.args[0] if isinstance(error, KafkaException) and error.args else None
    return cause if isinstance(cause, KafkaError) else None


def _described(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def _protocol_error(error: KafkaException) -> KafkaClientError:
    cause = _kafka_error(error)
    return _as_protocol(cause) if cause is not None else KafkaClientError(str(error))


def _as_protocol(error: KafkaError, unavailable: type[KafkaUnavailable] = KafkaUnavailable) -> KafkaClientError:
    """A librdkafka error as the protocol's: a retriable one, or one of UNAVAILABLE, as `unavailable`."""
    kind = unavailable if error.retriable() or error.code() in UNAVAILABLE else KafkaClientError
    return kind(_described(error))


class ServingConsumer:
    def __init__(self, consumer: Consumer, max_records: int, answered: deque):
        self._consumer = consumer
        self._max_records = max_records
        self._answered = answered  # the `done` of each asynchronous commit, in order: librdkafka answers in order
        self.before_revoke: Callable[[], None] = lambda: None  # called inside poll before partitions go
        self.on_assigned: Callable[[set[TopicPartition]], dict[TopicPartition, int]] = lambda _: {}

    @classmethod
    @_reported_as_protocol()
    def open(cls, settings: KafkaSettings, metadata_timeout_s: float = 60.0) -> ServingConsumer:
        answered: deque[Callable[[], None]] = deque()

        def committed(error, partitions) -> None:  # called from poll, for synchronous commits too
            if error is not None:
                log.warning("an offset commit was refused, those records will be replayed if this worker stops "
                            "before its next commit: %s", error)
            if answered:
                answered.popleft()()

        consumer = Consumer({
            **client_config(settings, "serving"),
            "group.id": settings.group_id,
            "enable.auto.commit": False,  # offsets are committed by the pipeline, after outputs are acknowledged
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "fetch.min.bytes": settings.fetch_min_bytes,
            "fetch.wait.max.ms": settings.fetch_max_wait_ms,
            "max.partition.fetch.bytes": 4 << 20,
            "fetch.max.bytes": 32 << 20,
            "topic.metadata.refresh.interval.ms": 30_000,
            "session.timeout.ms": settings.session_timeout_ms,
            "heartbeat.interval.ms": settings.heartbeat_interval_ms,
            "isolation.level": "read_committed" if settings.exactly_once else "read_uncommitted",
            "on_commit": committed,
            "error_cb": _log_client_error,
        })
        deadline = time.monotonic() + metadata_timeout_s
        while True:  # as kafka_python.open_consumer: subscribe once the topic's partitions are visible
            topic = consumer.list_topics(settings.input_topic, timeout=5).topics.get(settings.input_topic)
            if topic is not None and topic.error is None and topic.partitions:
                break
            if time.monotonic() > deadline:
                consumer.close()
                raise KafkaClientError(f"topic {settings.input_topic} has no visible partitions after "
                                        f"{metadata_timeout_s:.0f} s")
            time.sleep(0.2)
        serving = cls(consumer, settings.max_poll_records, answered)
        consumer.subscribe([settings.input_topic], on_revoke=lambda _, revoked: revoked and serving.before_revoke(),
                           on_assign=serving._assign,
                           on_lost=lambda _, lost: log.warning("partitions lost to the group: %s", lost))
        return serving

    def _assign(self, consumer: Consumer, partitions: list[ConfluentPartition]) -> None:
        """librdkafka's assignment, with the start offsets `on_assigned` asks for (the others start at their
        committed offsets)."""
        starts = self.on_assigned({TopicPartition(tp.topic, tp.partition) for tp in partitions})
        for tp in partitions:
            tp.offset = starts.get(TopicPartition(tp.topic, tp.partition), tp.offset)
        consumer.assign(partitions)

    def poll(self, timeout_ms: int, max_records: int | None = None) -> list[InputRecord]:
        """What is already fetched, up to `max_records` (max_poll_records); else wait up to `timeout_ms` for the
        first record.

        (`consume(n, timeout)` alone waits for n records or the whole timeout, which at low rates added
        the poll timeout to every event's latency.)"""
        consumer, most = self._consumer, max_records or self._max_records
        messages = consumer.consume(num_messages=most, timeout=0)
        if not messages:
            first = consumer.poll(timeout_ms / 1000.0)
            if first is None:
                return []
            messages = [first, *(consumer.consume(num_messages=most - 1, timeout=0) if most > 1 else [])]
        records = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    _log_client_error(error)
                continue
            records.append(InputRecord(message.topic(), message.partition(), message.offset(), message.timestamp()[1],
                                       message.key(), message.value()))
        return records

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def pause_all(self) -> None:
        self._consumer.pause(self._consumer.assignment())

    def resume_all(self) -> None:
        self._consumer.resume(self._consumer.assignment())

    def pause(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self._consumer.pause([ConfluentPartition(tp.topic, tp.partition) for tp in partitions])

    def resume(self, partitions: set[TopicPartition]) -> None:
        if partitions:
            self._consumer.resume([ConfluentPartition(tp.topic, tp.partition) for tp in partitions])

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._consumer.seek(ConfluentPartition(tp.topic, tp.partition, offset))

    def commit(self, next_offsets: dict[TopicPartition, int]) -> bool:
        try:
            self._consumer.commit(offsets=_offsets(next_offsets), asynchronous=False)
        except KafkaException as error:
            if error.args[0].code() in GROUP_CHANGED:
                log.warning("offset commit refused during a rebalance, the records will be replayed: %s", error)
                return False
            raise _protocol_error(error) from error
        return True

    def commit_async(self, next_offsets: dict[TopicPartition, int], done: Callable[[], None]) -> None:
        try:
            self._consumer.commit(offsets=_offsets(next_offsets), asynchronous=True)
        except KafkaException as error:  # refused at once, as if answered so
            log.warning("an offset commit was refused, those records will be replayed if this worker stops "
                        "before its next commit: %s", error)
            done()
            return
        self._answered.append(done)

    def lag(self) -> dict[TopicPartition, int]:
        """High-water mark of the last fetch (cached: no broker round trip) minus the position. A partition
        nothing has been read from yet (an idle one, say) has no position: its lag counts from the committed
        offset, or from the low-water mark when none is committed (where `auto.offset.reset` starts), both
        asked of the broker, as the cache may hold neither mark for it."""
        consumer, lag = self._consumer, {}
        positions = consumer.position(consumer.assignment())
        unread = [p for p in positions if p.offset < 0]
        committed = {(p.topic, p.partition): p.offset
                     for p in (consumer.committed(unread, timeout=LAG_LOOKUP_TIMEOUT_S) if unread else [])}
        for position in positions:
            offset = position.offset
            if offset >= 0:
                _, high = consumer.get_watermark_offsets(position, cached=True)
            else:
                low, high = consumer.get_watermark_offsets(position, timeout=LAG_LOOKUP_TIMEOUT_S)
                offset = committed.get((position.topic, position.partition), -1)
                offset = offset if offset >= 0 else low
            if high >= 0 and offset >= 0:
                lag[TopicPartition(position.topic, position.partition)] = max(0, high - offset)
        return lag

    def fetching(self) -> None:
        """Not known: librdkafka fetches on threads of its own and does not say."""
        return None

    def group_metadata(self):
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        self._consumer.close()


def _offsets(next_offsets: dict[TopicPartition, int]) -> list[ConfluentPartition]:
    return [ConfluentPartition(tp.topic, tp.partition, offset) for tp, offset in next_offsets.items()]


LAG_LOOKUP_TIMEOUT_S = 2.0  # the committed offsets of partitions not read yet, for the lag gauge


# The broker (or librdkafka) refuses the record itself: sending it again would fail again.
RECORD_REFUSED = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
                  KafkaError.INVALID_TIMESTAMP}


class Acks:
    """The delivery reports of one batch's records (protocol.Acks): librdkafka calls the callback of each from
    the producer's `poll`, which `done()` serves."""

    def __init__(self, producer: Producer, records: int):
        self._producer = producer
        self._waiting = records
        self._failure: KafkaError | None = None
        self.refused: dict[int, str] = {}

    def delivered_callback(self, index: int) -> Callable[[KafkaError | None, object], None]:
        def delivered(error, _message) -> None:
            self._waiting -= 1
            if error is None:
                return
            if error.code() in RECORD_REFUSED:
                self.refused[index] = _described(error)
            elif self._failure is None:
                self._failure = error
        return delivered

    def done(self) -> bool:
        if self._waiting:
            self._producer.poll(0)
        return not self._waiting

    def wait(self, timeout_s: float) -> None:
        if self._waiting:
            self._producer.poll(timeout_s)  # returns as soon as a delivery report is served

    def check(self) -> dict[int, str]:
        error = self._failure
        if error is not None:
            raise _as_protocol(error, NotAcknowledged)
        return self.refused


# A commit_transaction that times out is retried (librdkafka allows it) this many times, then given up.
COMMIT_ATTEMPTS = 4
# An abort the broker has not answered for this long, call after call, is given up: librdkafka can keep a request
# to a transaction coordinator that came back queued for ever, and only a new producer resolves the transaction.
ABORT_GIVE_UP_S = COMMIT_ATTEMPTS * ACK_TIMEOUT_S
DEADLINE_S = ACK_TIMEOUT_S + 15  # librdkafka's own timeouts are ACK_TIMEOUT_S: this only catches a call that hangs


def _fenced_if_fatal(error: Exception) -> None:
    """ProducerFenced when another producer took our transactional id, ProducerFatal for any other error after
    which librdkafka refuses to go on; nothing for an error the transaction can be aborted or retried after."""
    kafka_error = _kafka_error(error)
    if kafka_error is None:
        return
    if kafka_error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED):
        raise ProducerFenced() from error
    if kafka_error.fatal():
        raise ProducerFatal(kafka_error.str()) from error


class ServingProducer:
    def __init__(self, producer: Producer):
        self._producer = producer
        self._deadline = Deadline(DEADLINE_S)
        self._abort_pending_since: float | None = None  # exactly-once: an abort not answered yet (monotonic)

    @classmethod
    @_reported_as_protocol()
    def open(cls, settings: KafkaSettings, transactional_id: str | None, max_batch_bytes: int | None = None
             ) -> ServingProducer:
        config = {
            **client_config(settings, "serving"),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 0,  # a batch is produced at once and never flushed (kafka_python.open_producer)
            "batch.size": min(256 * 1024, max_batch_bytes or 256 * 1024),  # within the output topics' limits
            "message.max.bytes": 4 << 20,
            "partitioner": "murmur2_random",  # keyed records: the Java client's (and kafka-python's) partition
            "error_cb": _log_client_error,
        }
        if transactional_id is not None:
            config["transactional.id"] = transactional_id
        producer = Producer(config)
        if transactional_id is not None:
            producer.init_transactions(ACK_TIMEOUT_S)
        return cls(producer)

    def send(self, messages: list[Message]) -> Acks:
        acks = Acks(self._producer, len(messages))
        produce, delivered = self._producer.produce, acks.delivered_callback
        for index, (topic, key, value) in enumerate(messages):
            while True:
                try:
                    produce(topic, value=value, key=key, on_delivery=delivered(index))
                    break
                except BufferError:  # librdkafka's queue is full: let it drain
                    self._producer.poll(0.05)
                except KafkaException as error:  # larger than message.max.bytes: refused before it is queued
                    cause = _kafka_error(error)
                    if cause is None or cause.code() not in RECORD_REFUSED:
                        raise
                    delivered(index)(cause, None)  # reported as the delivery report would
                    break
        self._producer.poll(0)
        return acks

    def flush(self, timeout_s: float = ACK_TIMEOUT_S) -> None:
        self._producer.flush(timeout_s)

    def send_in_transaction(self, messages: list[Message], next_offsets: dict[TopicPartition, int],
                            group_metadata) -> None:
        """`messages` and the consumer's `next_offsets` in one transaction. A failure before the commit aborts
        it (TransactionAborted); an abort the broker does not answer raises KafkaUnavailable and is finished
        by the next call. A commit that keeps failing for want of the broker, or a call past its deadline,
        raises TransactionStuck: only a new producer can tell whether that transaction committed."""
        producer = self._producer
        if self._abort_pending_since is not None:
            self._abort()
        producer.begin_transaction()
        try:
            acks = self.send(messages)
            remaining = producer.flush(ACK_TIMEOUT_S)
            if remaining:
                raise NotAcknowledged(f"{remaining} records not acknowledged within {ACK_TIMEOUT_S:.0f} s")
            refused = acks.check()
            if refused:
                raise RecordsRefused(refused)
            self._deadline.call("send_offsets_to_transaction", producer.send_offsets_to_transaction,
                                _offsets(next_offsets), group_metadata, ACK_TIMEOUT_S)
        except (KafkaException, KafkaClientError) as error:  # the transaction cannot commit: abort it
            _fenced_if_fatal(error)
            self._abort()
            raise TransactionAborted(str(error), error.refused if isinstance(error, RecordsRefused) else None) from error
        for _ in range(COMMIT_ATTEMPTS):
            try:
                self._deadline.call("commit_transaction", producer.commit_transaction, ACK_TIMEOUT_S)
                return
            except KafkaException as error:
                _fenced_if_fatal(error)
                kafka_error = _kafka_error(error)
                if kafka_error is not None and kafka_error.txn_requires_abort():
                    self._abort()
                    raise TransactionAborted(str(error)) from error
                log.warning("commit_transaction failed (%s); trying it again", error)
        raise TransactionStuck("commit_transaction", COMMIT_ATTEMPTS * ACK_TIMEOUT_S)

    def _abort(self) -> None:
        """Abort the open transaction; KafkaUnavailable while the broker does not answer (the next call tries
        again), TransactionStuck once it has not for ABORT_GIVE_UP_S."""
        try:
            self._deadline.call("abort_transaction", self._producer.abort_transaction, ACK_TIMEOUT_S)
        except KafkaException as error:
            _fenced_if_fatal(error)
            now = time.monotonic()
            if self._abort_pending_since is None:
                self._abort_pending_since = now
            elif now - self._abort_pending_since > ABORT_GIVE_UP_S:
                raise TransactionStuck("abort_transaction", ABORT_GIVE_UP_S) from error
            raise KafkaUnavailable(f"abort_transaction: {error}") from error
        self._abort_pending_since = None

    def close(self, timeout_s: float = 30.0) -> None:
        self._deadline.close()
        try:
            self._producer.flush(timeout_s)
        except KafkaException as error:  # a producer in a fatal state refuses even a flush: the error was reported
            log.warning("closing the producer: %s", error)


def open_serving_producer(settings: KafkaSettings, transactional_id: str | None,
                          max_batch_bytes: int | None = None) -> ServingProducer:
    return ServingProducer.open(settings, transactional_id, max_batch_bytes)


def open_serving_consumer(settings: KafkaSettings) -> ServingConsumer:
    return ServingConsumer.open(settings)
