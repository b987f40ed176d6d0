"""The serving loop: poll a batch, build it and save its Redis writes, send its outputs, and commit the
offsets of the batches whose outputs are acknowledged, in order.

One thread does it all, and never waits for an acknowledgement: a batch's outputs are handed to the Kafka
client, which sends them on its own thread, and the batch joins the window of batches in flight while the loop
polls the next. Each batch keeps the order that makes a replay safe: its Redis transaction has landed before
its outputs are sent, and its offsets are committed only once every output of it, and of every batch before
it, is acknowledged. A refused output rewinds the partitions to the oldest batch not committed and reads it
again; the event claims in Redis make its outputs the same. While Redis or Kafka refuses the work,
consumption pauses with backoff (streamadapt.serving.outage). Each committed batch goes to the Observer
(metrics, live quality, the drift detector); a new champion is swapped in between two batches.

In exactly-once mode each batch is one Kafka transaction (its outputs and its offsets), committed before
the next batch is polled.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from streamadapt.kafka.protocol import (
    ACK_TIMEOUT_S,
    Acks,
    InputRecord,
    KafkaUnavailable,
    NotAcknowledged,
    ServingConsumer,
    ServingProducer,
    TopicPartition,
    TransactionAborted,
    partition_ref,
)
from streamadapt.metrics import WorkerMetrics, observe_many
from streamadapt.model.checkpoint import ServingModel
from streamadapt.serving.batch import Built
from streamadapt.serving.hotswap import ModelFollower
from streamadapt.serving.observer import Observer
from streamadapt.serving.outage import Outage
from streamadapt.serving.pacing import Pacer
from streamadapt.serving.plan import first_offsets, next_offsets
from streamadapt.settings import Settings
from streamadapt.state.store import REDIS_OUTAGE_ERRORS, StateWrites

log = logging.getLogger(__name__)

T = TypeVar("T")
TAKEN = object()  # what a retry of the batch in hand returns once a rebalance has taken it


class BatchAborted(Exception):
    """Exactly-once mode: the batch's transaction was aborted; its partitions are rewound to its start and
    it is read again by whoever owns them (this worker, or a new owner after a rebalance). `refused` are the
    indices of the outputs the broker refused for what they are."""

    def __init__(self, message: str, refused: dict[int, str]):
        super().__init__(message)
        self.refused = refused


# Outputs refused for what they are, remembered in exactly-once mode to be left out when their batch is read again
# after the abort; bounded, since a refused output is rare and is read again within moments.
MAX_REMEMBERED_REFUSALS = 10_000


# While batches wait for acknowledgements, a poll waits at most this long, so that a batch acknowledged
# meanwhile is committed (and the window freed) soon after; a busy stream returns at once anyway.
IN_FLIGHT_POLL_MS = 5
FULL_WINDOW_POLL_MS = 1
FULL_WINDOW_WAIT_S = 0.001
PACED_POLL_MS = 20  # a poll while pacing holds every partition: it keeps the consumer in its group
# How long a stop waits for a group coordinator that is loading or moving (a broker restarting) to take the final
# commit; past it the last records are left to be read again by their partitions' next owner.
FINAL_COMMIT_WAIT_S = 15.0
FINAL_COMMIT_RETRY_S = 0.5
SETTLE_SAVED_WAIT_S = 1.0  # during a Redis outage, how long the window's acknowledgements are waited for


class Builder(Protocol):
    """What the loop needs of streamadapt.serving.batch.BatchBuilder."""

    def build(self, records: list[InputRecord]) -> tuple[Built, StateWrites]: ...

    def save(self, built: Built, writes: StateWrites) -> Built: ...

    def newest_event_times(self) -> Mapping[str, float]: ...


@dataclass
class _Batch:
    """A batch whose outputs are sent and not yet all acknowledged."""

    records: list[InputRecord]
    built: Built
    acks: Acks
    polled_at: float  # perf_counter
    sent_monotonic: float


class ServingLoop:
    def __init__(self, settings: Settings, consumer: ServingConsumer, producer: ServingProducer,
                 builder: Builder, model: ServingModel, metrics: WorkerMetrics,
                 follower: ModelFollower | None = None, raise_drift_alarm: Callable[[float], None] | None = None,
                 pacer: Pacer | None = None):
        """`builder` builds with `model`, whose parameters the loop swaps between batches.
        `raise_drift_alarm(regime_since_ts)` asks the trainer for a fine-tune (StateStore.raise_drift_alarm).
        `pacer` pauses the partitions that run ahead while the stream catches up (streamadapt.serving.pacing)."""
        self._pacer = pacer
        self._paced: set[TopicPartition] = set()  # partitions the pacer paused
        self._owned: dict[str, TopicPartition] | None = None  # the assignment by partition_ref, read again after a rebalance
        self._settings = settings
        self._follower = follower
        self._consumer = consumer
        self._producer = producer
        self._builder = builder
        self._transactional = settings.kafka.exactly_once
        self._window_records = settings.kafka.max_in_flight_records
        self._max_poll_records = settings.kafka.max_poll_records
        self._model = model
        self._metrics = metrics
        self.last_poll_ok_monotonic: float | None = None
        self._outage = Outage(consumer, metrics, self._rewind, self._polled)
        self._latest_offsets: dict[TopicPartition, int] = {}  # last offsets committed (asynchronously) per partition
        self._in_flight: deque[_Batch] = deque()  # sent, oldest first
        # Records acknowledged whose offset commit the coordinator has not answered yet: (records, when sent).
        # They count in the window, so that a crash replays at most `max_in_flight_records` records.
        self._committing: deque[tuple[int, float]] = deque()
        self._commits_answered: deque[None] = deque()  # one entry per answer, appended on the client's thread
        # exactly-once: (input record ref, topic) of outputs refused for what they are -> the error
        self._refused: dict[tuple[str, str], str] = {}
        self.observer = Observer(consumer, metrics, model.meta.task, settings.training.quality_window,
                                 settings.progress_interval_s, raise_drift_alarm)
        self._in_hand: list[InputRecord] | None = None  # the batch being served
        self._restart_at: dict[TopicPartition, int] = {}  # from _before_revoke to _on_assigned
        consumer.before_revoke = self._before_revoke
        consumer.on_assigned = self._on_assigned
        metrics.model_info.info({"model_version": model.version, "task": model.meta.task})

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; then wait for the batches in flight and commit them."""
        timeout_ms = self._settings.kafka.poll_timeout_ms
        while not stop.is_set():
            if self._follower is not None:
                self._follower.swap_ready(self._model)  # between batches: a batch is built by one version
            self._settle(stop)
            all_paced = self._pacer is not None and self._pace()
            room = self._window_records - self.in_flight
            if room <= 0:
                self._wait_for_room()
                continue
            most = min(room, self._max_poll_records, (self._pacer and self._pacer.poll_records) or room)
            records = self._consumer.poll(PACED_POLL_MS if all_paced else IN_FLIGHT_POLL_MS if self._in_flight
                                          else timeout_ms, most)
            self._polled()
            if records:
                self._serve(records, stop)
            self.observer.tick(time.monotonic(), self.paused)
        self._finish_in_flight()
        self._drop_in_flight()
        owned = self._consumer.assignment()
        final = {tp: offset for tp, offset in self._latest_offsets.items() if tp in owned}
        if final:
            self._commit_final(final)
        self.observer.final()

    def _commit_final(self, final: dict[TopicPartition, int]) -> None:
        """Commit synchronously, so that a clean stop leaves nothing to replay: through a coordinator that is
        loading or moving for up to FINAL_COMMIT_WAIT_S, then leaving the records to be read again."""
        deadline = time.monotonic() + FINAL_COMMIT_WAIT_S
        while True:
            try:
                self._consumer.commit(final)
                return
            except KafkaUnavailable as error:
                if time.monotonic() >= deadline:
                    log.warning("the final offset commit was refused for %.0f s (%s): the last records will be read "
                                "again by their partitions' next owner", FINAL_COMMIT_WAIT_S, error)
                    return
                time.sleep(FINAL_COMMIT_RETRY_S)

    @property
    def stalled(self) -> bool:
        """True while the consumer owns partitions and has stopped fetching (Observer.check_fetching)."""
        return self.observer.stalled

    @property
    def paused(self) -> bool:
        """True while an outage of Redis or Kafka holds consumption back."""
        return self._outage.paused

    def _polled(self) -> None:
        self.last_poll_ok_monotonic = time.monotonic()

    @property
    def in_flight(self) -> int:
        """Records polled and not yet committed: sent and waiting for acknowledgements, or waiting for the
        coordinator to confirm their offsets. A crash replays at most these."""
        return (sum(len(batch.records) for batch in self._in_flight)
                + sum(records for records, _ in self._committing))

    def _take_commit_answers(self) -> None:
        """Forget the commits the coordinator has answered, and those it left unanswered for ACK_TIMEOUT_S."""
        committing = self._committing
        while self._commits_answered:
            self._commits_answered.popleft()
            if committing:
                committing.popleft()
        while committing and time.monotonic() - committing[0][1] > ACK_TIMEOUT_S:
            log.warning("an offset commit was not answered within %.0f s", ACK_TIMEOUT_S)
            committing.popleft()  # its answer, if one comes, is taken for a later commit's: nothing waits for ever

    def _serve(self, records: list[InputRecord], stop: threading.Event) -> None:
        """Build and save the batch (through a Redis outage), then send it: into the window, or in exactly-once
        mode as one transaction with its offsets. A rebalance while the batch waits out an outage takes it out
        of this worker's hands (`_before_revoke`): it is then neither saved nor sent."""
        polled_at = time.perf_counter()
        self._metrics.events_consumed.inc(len(records))
        self._in_hand = records
        try:
            self._serve_in_hand(records, polled_at, stop)
        finally:
            self._in_hand = None

    def _serve_in_hand(self, records: list[InputRecord], polled_at: float, stop: threading.Event) -> None:
        try:
            built = self._build_and_save(records)
        except REDIS_OUTAGE_ERRORS as error:
            try:
                built = self._retry_in_hand(lambda: self._build_and_save(records), error, REDIS_OUTAGE_ERRORS, stop,
                                            between=self._settle_saved)
            except REDIS_OUTAGE_ERRORS:
                self._rewind(records)  # stopped during the outage: read again by whoever owns them next
                return
            if built is TAKEN:
                return
        if not self._transactional:
            try:
                acks = self._producer.send(built.messages)
            except KafkaUnavailable as error:  # kafka-python waits for metadata in send, and can time out
                self._rewind_window(error, stop, also=records)
                return
            self._in_flight.append(_Batch(records, built, acks, polled_at, time.monotonic()))
            return
        if self._refused:
            built = self._without_refused(built)
        try:
            try:
                self._send_in_transaction(records, built)
            except KafkaUnavailable as error:
                if self._retry_in_hand(lambda: self._send_in_transaction(records, built), error, KafkaUnavailable,
                                       stop) is TAKEN:
                    return
        except KafkaUnavailable:
            self._rewind(records)
            return
        except BatchAborted as aborted:
            log.warning("%s", aborted)
            self._outage.end("batch aborted")  # read again from its start, unpaused
            for index, error in aborted.refused.items():  # left out when the batch is read again
                if len(self._refused) >= MAX_REMEMBERED_REFUSALS:
                    self._refused.pop(next(iter(self._refused)))
                self._refused[(built.sources[index].ref, built.messages[index][0])] = error
            self._rewind(records)
            return
        self._committed(records, built, polled_at)

    def _retry_in_hand(self, attempt: Callable[[], T], error: Exception,
                       outage_errors: type[Exception] | tuple[type[Exception], ...], stop: threading.Event,
                       between: Callable[[], None] = lambda: None) -> T | object:
        """Outage.retry for the batch in hand, until a rebalance takes it (`_before_revoke`): then TAKEN, and the
        outage ends, since its records are read again from where the rebalance left them."""
        result = self._outage.retry(lambda: TAKEN if self._in_hand is None else attempt(), error, outage_errors,
                                    stop, between)
        if result is TAKEN:
            self._outage.end("a rebalance took the batch in hand")
        return result

    def _without_refused(self, built: Built) -> Built:
        """Exactly-once: the batch without the outputs refused for what they are when it was sent before."""
        refused = {}
        for index, (message, source) in enumerate(zip(built.messages, built.sources)):
            error = self._refused.pop((source.ref, message[0]), None)
            if error is not None:
                refused[index] = error
        if not refused:
            return built
        self._skip_refused(built, refused)
        kept = [i for i in range(len(built.messages)) if i not in refused]
        built.messages = [built.messages[i] for i in kept]
        built.sources = [built.sources[i] for i in kept]
        return built

    def _skip_refused(self, built: Built, refused: dict[int, str]) -> None:
        """Outputs the broker refused for what they are (sending them again would fail again): counted, logged
        with their input record, and skipped; the input's offset is committed with its batch."""
        for index, error in refused.items():
            topic = built.messages[index][0]
            self._metrics.outputs_refused.labels(topic).inc()
            log.error("the output to %s of input record %s was refused (%s): skipped, and the input committed",
                      topic, built.sources[index].ref, error)

    def _wait_for_room(self) -> None:
        """With the window full: wait a moment for the oldest batch's acknowledgements, which the producer's
        threads take; or, when every batch left waits for the coordinator's answer to its commit, poll, since
        both clients take those answers only inside `poll`, and read again later the record it may return."""
        if self._in_flight:
            self._in_flight[0].acks.wait(FULL_WINDOW_WAIT_S)
            return
        records = self._consumer.poll(FULL_WINDOW_POLL_MS, 1)
        self._polled()
        if records:
            self._rewind(records)

    def _pace(self) -> bool:
        """Pause the partitions the pacer holds back and resume those it lets go; whether it holds every one.
        The held ones are paused again each time, since the end of an outage resumes every partition."""
        if self._owned is None:
            self._owned = {partition_ref(tp.topic, tp.partition): tp for tp in self._consumer.assignment()}
        by_ref, owned = self._owned, set(self._owned.values())
        newest = self._builder.newest_event_times()
        held_refs = self._pacer.to_pause({ref: newest[ref] for ref in by_ref if ref in newest}, self._model.version)
        held = {by_ref[ref] for ref in held_refs}
        self._consumer.pause(held)
        self._consumer.resume((self._paced - held) & owned)
        self._paced = held
        return bool(held) and held == owned

    def _build_and_save(self, records: list[InputRecord]) -> Built:
        built, writes = self._builder.build(records)
        return self._builder.save(built, writes)

    def _settle(self, stop: threading.Event | None, ends_outage: bool = True) -> None:
        """Commit the batches at the head of the window whose outputs are all acknowledged (one asynchronous
        commit for all of them). A refused output, or a batch unacknowledged for ACK_TIMEOUT_S, is an outage:
        the window is dropped, its partitions rewound to its oldest batch, and consumption pauses for the
        backoff before that batch is read again (without `stop`, the error is raised instead). A committed
        batch ends an outage, unless `ends_outage` is false (during a Redis outage, batches saved before it)."""
        self._take_commit_answers()
        window, offsets, settled = self._in_flight, {}, 0  # settled: records
        try:
            while window and window[0].acks.done():
                batch = window[0]
                refused = batch.acks.check()
                if refused:
                    self._skip_refused(batch.built, refused)
                window.popleft()
                offsets.update(next_offsets(batch.records))
                settled += len(batch.records)
                self._committed(batch.records, batch.built, batch.polled_at, ends_outage)
            if window and time.monotonic() - window[0].sent_monotonic > ACK_TIMEOUT_S:
                raise NotAcknowledged(f"a batch waited over {ACK_TIMEOUT_S:.0f} s for its "
                                               "acknowledgements")
        except KafkaUnavailable as error:
            self._commit_async(offsets, settled)
            if stop is None:  # inside a rebalance or a stop: the caller leaves the window to be read again
                raise
            self._rewind_window(error, stop)
            return
        self._commit_async(offsets, settled)

    def _rewind_window(self, error: Exception, stop: threading.Event, also: list[InputRecord] = ()) -> None:
        """Kafka refused the window's outputs: drop the window (and `also`, a batch it did not take), rewind
        to its oldest batch, wait the backoff out paused, and resume, to read the dropped batches again. The
        outage lasts until a batch is committed."""
        self._rewind(self._drop_in_flight() + list(also))
        self._outage.wait_out(error, stop)
        self._consumer.resume_all()

    def _commit_async(self, offsets: dict[tuple[str, int], int], records: int) -> None:
        if offsets:
            by_partition = _by_partition(offsets)
            self._committing.append((records, time.monotonic()))
            self._consumer.commit_async(by_partition, lambda: self._commits_answered.append(None))
            self._latest_offsets.update(by_partition)

    def _committed(self, records: list[InputRecord], built: Built, polled_at: float, ends_outage: bool = True) -> None:
        """Metrics and scores of a batch whose outputs are acknowledged and whose offsets are committed."""
        if ends_outage:
            self._outage.end()
        self.observer.committed(built)
        self._metrics.batch_duration.observe(time.perf_counter() - polled_at)
        self._metrics.batch_size.observe(len(records))
        sent_ms = built.input_timestamps_ms
        observe_many(self._metrics.latency, np.maximum(0.0, time.time() * 1000.0 - sent_ms[sent_ms >= 0]) / 1000.0)

    def _drop_in_flight(self) -> list[InputRecord]:
        """Forget the batches in flight, to be read again; their records."""
        records = [record for batch in self._in_flight for record in batch.records]
        self._in_flight.clear()
        return records

    def _finish_in_flight(self) -> None:
        """Wait for the acknowledgements of the batches in flight and commit them (asynchronously); those not
        acknowledged stay in the window, for the caller to drop and leave to be read again."""
        if not self._in_flight:
            return
        try:
            self._producer.flush(ACK_TIMEOUT_S)
            self._settle(None)
        except KafkaUnavailable as error:
            log.warning("the batches in flight are left to be read again (%s: %s)", type(error).__name__, error)

    def _before_revoke(self) -> None:
        """Called by the consumer before a rebalance takes partitions away (on kafka-python, from its network
        thread while `poll` waits). The batches in flight are acknowledged and their offsets committed now,
        while the partitions are still ours, so that their next owner neither reads them again nor reads Redis
        before their writes; during an outage they are not waited for. What is left, with the batch in hand,
        is dropped: its partitions' next owner reads it again from their committed offsets, and `_on_assigned`
        starts the partitions this worker keeps at its first records, since kafka-python keeps a kept
        partition's position (past them) where librdkafka goes back to the committed offset."""
        if not self.paused:
            self._finish_in_flight()
        dropped = self._drop_in_flight()
        if self._in_hand is not None:
            dropped += self._in_hand
            self._in_hand = None
        self._restart_at = _by_partition(first_offsets(dropped))

    def _on_assigned(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Called by the consumer when a rebalance has assigned partitions: where to start those among them whose
        records the revocation before it dropped. Only for a partition kept through that one rebalance: one
        that was away meanwhile starts at what its other owner committed."""
        restart_at, self._restart_at = self._restart_at, {}
        self._paced, self._owned = set(), None  # an assignment starts unpaused
        starts = {tp: offset for tp, offset in restart_at.items() if tp in assigned}
        if starts:
            log.warning("a rebalance took the records in hand of %d kept partitions: they are read again from "
                        "their first", len(starts))
        return starts

    def _send_in_transaction(self, records: list[InputRecord], built: Built) -> None:
        """Exactly-once: the batch's outputs and the offsets after it in one Kafka transaction, so a
        read_committed reader sees its outputs once, whatever happens."""
        try:
            self._producer.send_in_transaction(built.messages, _by_partition(next_offsets(records)),
                                               self._consumer.group_metadata())
        except TransactionAborted as error:
            raise BatchAborted(f"transaction of {len(records)} records aborted ({error}); "
                               "they will be read again", error.refused) from error

    def _settle_saved(self) -> None:
        """While Redis refuses a batch: commit the batches of the window that were saved before and are
        acknowledged since, so that they are not left to be read again, nor missing from the metrics, for as
        long as the outage lasts. A Kafka refusal among them is left to the loop, once Redis answers."""
        try:
            if self._in_flight:
                self._producer.flush(SETTLE_SAVED_WAIT_S)  # their acknowledgements are due any moment
            self._settle(None, ends_outage=False)
        except KafkaUnavailable:
            pass

    def _rewind(self, records: list[InputRecord]) -> None:
        """Seek the partitions this worker still owns back to the first of `records`, to read them again."""
        owned = self._consumer.assignment()
        for tp, first in _by_partition(first_offsets(records)).items():
            if tp in owned:
                self._consumer.seek(tp, first)


def _by_partition(offsets: dict[tuple[str, int], int]) -> dict[TopicPartition, int]:
    """pipeline's (topic, partition) keys as the Kafka clients' TopicPartition."""
    return {TopicPartition(topic, partition): offset for (topic, partition), offset in offsets.items()}
