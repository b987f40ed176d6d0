"""The serving loop: poll a batch, hand it to the builder processes, produce what they built, commit it.

Batches are pipelined: up to three are in the builders (worker.builder) at once, so that while this loop
produces batch N and commits its offsets, N+1's Redis transaction lands and N+2 is built. Batches are taken
back in order, and each keeps the order that makes a replay safe: its Redis transaction, then its outputs,
then its offsets. The labels a committed batch resolved are scored here, whichever builder joined them:
rolling live quality per version, and the drift detector on the loss of every label this worker sees.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import redis
from kafka import TopicPartition
from kafka.errors import BrokerNotAvailableError, KafkaConnectionError, KafkaTimeoutError

from worker import kafka_io
from worker.batch import Built, Resolved
from worker.builder import BuilderFailed, Builders
from worker.hotswap import ModelFollower
from worker.kafka_io import ServingConsumer, ServingProducer
from worker.metrics import WorkerMetrics, observe_many
from worker.model import ServingModel
from worker.pipeline import InputRecord, first_offsets, next_offsets
from worker.quality import QualityMonitor
from worker.settings import Settings
from worker.state import REDIS_OUTAGE_ERRORS

log = logging.getLogger(__name__)

OUTAGE_FIRST_RETRY_S = 0.5
OUTAGE_MAX_RETRY_S = 30.0
# Errors of an unavailable Kafka: the batch's outputs are produced again, not dropped, and the worker does
# not exit. (Redis's are in worker.batch: the builder meets them.)
KAFKA_OUTAGE_ERRORS = (KafkaTimeoutError, KafkaConnectionError, BrokerNotAvailableError, kafka_io.NotAcknowledged)


class BatchAborted(Exception):
    """Exactly-once mode: the batch's transaction was aborted; its partitions are rewound to its start and
    it is read again by whoever owns them (this worker, or a new owner after a rebalance)."""


GAUGE_REFRESH_S = 5.0  # consumer lag and live quality are observations: refreshed on a timer, not per batch
# A consumer that owns partitions, is not paused, and has not fetched for this long has stalled inside the client
# (ServingLoop.stalled). Its fetch rate covers about a minute, so a stall shows about two minutes after it began.
STALLED_AFTER_S = 60.0
# Batches left in the builder while the loop produces the oldest: one being saved, one being built.
PIPELINE_DEPTH = 2


class ServingLoop:
    def __init__(self, settings: Settings, consumer: ServingConsumer, producer: ServingProducer,
                 builder: Builders, model: ServingModel, metrics: WorkerMetrics,
                 follower: ModelFollower | None = None, raise_drift_alarm: Callable[[float], None] | None = None):
        """`raise_drift_alarm(regime_since_ts)` asks the trainer for a fine-tune (StateStore.raise_drift_alarm)."""
        self._settings = settings
        self._follower = follower
        self._quality_series: set[tuple[str, str]] = set()
        self._consumer = consumer
        self._producer = producer
        self._builder = builder
        self._transactional = settings.kafka.exactly_once
        self._model = model  # the version served; swaps are checked against it before the builder gets them
        self._metrics = metrics
        self.last_poll_ok_monotonic: float | None = None
        self.stalled = False  # see _check_fetching
        self._not_fetching_since: float | None = None
        self._outage_since: float | None = None  # monotonic time the current outage began
        self._latest_offsets: dict[TopicPartition, int] = {}  # last offsets committed (asynchronously) per partition
        # batches in the builder, oldest first, with the perf_counter when each was handed over
        self._in_flight: deque[tuple[list[InputRecord], float]] = deque()
        self._quality = QualityMonitor(model.meta.task, settings.training.quality_window)
        self._raise_drift_alarm = raise_drift_alarm
        consumer.before_revoke = self._commit_in_flight_before_revoke
        metrics.model_info.info({"version": model.version, "task": model.meta.task})

    def run(self, stop: threading.Event) -> None:
        """Poll and hand over batches until `stop` is set; then commit the batches in flight and stop."""
        try:
            self._run(stop)
        except BuilderFailed:
            self._in_flight.clear()  # gone with the builder: their partitions' next owner reads them again
            raise

    def _run(self, stop: threading.Event) -> None:
        timeout_ms = self._settings.kafka.poll_timeout_ms
        next_lag_at = next_progress_at = time.monotonic()
        progress = _Progress(self._metrics)
        while not stop.is_set():
            self._maybe_swap()
            # With batches in the builder, take only what is already fetched: on a quiet stream, waiting here
            # would hold the finished ones back.
            records = self._consumer.poll(0 if self._in_flight else timeout_ms)
            self.last_poll_ok_monotonic = time.monotonic()
            if records:
                self._submit(records)
            # Take the oldest back when the pipeline is full or it is ready; on a quiet stream, all of them.
            while self._in_flight and (len(self._in_flight) > PIPELINE_DEPTH or not records or self._builder.ready()):
                self._commit_oldest(stop)
            now = time.monotonic()
            if now >= next_lag_at:
                self._refresh_lag()
                self._check_fetching(now)
                self._refresh_quality()
                self._builder.check_alive()  # a dead builder ends the worker even on a quiet stream
                next_lag_at = now + GAUGE_REFRESH_S
            if now >= next_progress_at:
                progress.log(now)
                next_progress_at = now + self._settings.progress_interval_s
        while self._in_flight:
            self._commit_oldest(stop)
        owned = self._consumer.assignment()
        final = {tp: offset for tp, offset in self._latest_offsets.items() if tp in owned}
        if final:  # confirmed synchronously, so a clean stop leaves nothing to replay
            self._consumer.commit(final)
        self._refresh_quality()
        progress.log(time.monotonic())

    @property
    def paused(self) -> bool:
        """True while consumption is paused because Redis or Kafka refuses the batch's outputs."""
        return self._outage_since is not None

    def _submit(self, records: list[InputRecord]) -> None:
        self._metrics.events_consumed.inc(len(records))
        self._builder.submit(records)
        self._in_flight.append((records, time.perf_counter()))

    def _commit_oldest(self, stop: threading.Event | None) -> None:
        """Take the oldest batch in flight back from the builder, with those after it that are built already,
        produce them together and commit their offsets: one flush and one wait for acknowledgements however
        many batches a slow one held up.

        While Redis or Kafka is unavailable the batches are retried with backoff and consumption is paused
        (memory stays at the batches in flight; the group membership is kept), until they go through or
        `stop` is set; the batches built on top of them, and records polled meanwhile, are read again later.
        Any other error is a bug and propagates."""
        taken = [self._take_back(stop)]
        while self._in_flight and self._builder.ready():
            taken.append(self._take_back(stop))
        records = [record for batch, _, _ in taken for record in batch]
        built = Built.joined([built for _, built, _ in taken])
        try:
            self._produce_through_outage(records, built, stop)
        except BatchAborted as aborted:
            log.warning("%s", aborted)
            self._rewind(records + self._drop_in_flight())  # the batches built on the aborted ones are read again too
        else:
            self._account(built)
        self._resume_after_outage()
        now = time.perf_counter()
        for batch, _, started in taken:
            self._metrics.batch_duration.observe(now - started)
            self._metrics.batch_size.observe(len(batch))

    def _take_back(self, stop: threading.Event | None) -> tuple[list[InputRecord], Built, float]:
        """The oldest batch in flight, built and saved (through a Redis outage: the batches on top of it are
        dropped and read again); with the perf_counter when it was handed over."""
        batch, started = self._in_flight.popleft()
        try:
            built = self._builder.collect()
        except REDIS_OUTAGE_ERRORS as error:
            self._rewind(self._drop_in_flight())
            built = self._build_through_outage(batch, error, stop)
        return batch, built, started

    def _drop_in_flight(self) -> list[InputRecord]:
        """Take every batch in flight back unused, because the batch under them is read again; their records."""
        records = []
        while self._in_flight:
            records += self._in_flight.popleft()[0]
            try:
                self._builder.collect()
            except REDIS_OUTAGE_ERRORS:
                pass  # what the builder answers for a batch built on a failed one
        return records

    def _commit_in_flight_before_revoke(self) -> None:
        """Called by the consumer before a rebalance takes partitions away (on kafka-python, from its network
        thread while `poll` waits): the batches in flight are produced and their offsets committed now, while
        the partitions are still ours, so that their next owner neither reads them again nor reads Redis
        before their writes. During an outage they are left to the next owner, which replays them."""
        if self.paused:
            return
        try:
            while self._in_flight:
                self._commit_oldest(None)
        except (*REDIS_OUTAGE_ERRORS, *KAFKA_OUTAGE_ERRORS) as error:
            log.warning("the batches in flight are left to the partitions' next owner (%s: %s)", type(error).__name__, error)
            self._drop_in_flight()
        except BuilderFailed as failure:  # raised here, it would reach the Kafka client, not the worker
            log.error("the batches in flight are left to the partitions' next owner: %s", failure)
            self._in_flight.clear()  # the loop meets the dead builder at its next call to it

    def _build_through_outage(self, batch: list[InputRecord], error: Exception, stop: threading.Event | None) -> Built:
        def rebuild() -> Built:
            self._builder.submit(batch)
            return self._builder.collect()

        return self._retry_through_outage(rebuild, error, REDIS_OUTAGE_ERRORS, stop)

    def _produce_through_outage(self, batch: list[InputRecord], built: Built, stop: threading.Event | None) -> None:
        try:
            self._commit(batch, built)
        except KAFKA_OUTAGE_ERRORS as error:
            self._retry_through_outage(lambda: self._commit(batch, built), error, KAFKA_OUTAGE_ERRORS, stop)

    def _retry_through_outage(self, attempt, error: Exception, outage_errors: tuple, stop: threading.Event | None):
        """After `error`, wait the outage out (paused, with backoff) and call `attempt` again until it returns,
        or until `stop` is set (or there is no `stop`: inside a rebalance), when the last error is raised and
        the uncommitted batch is replayed by the next owner."""
        retry_in_s = OUTAGE_FIRST_RETRY_S
        while True:
            if stop is None or stop.is_set():
                raise error
            self._wait_out(error, retry_in_s, stop)
            retry_in_s = min(2 * retry_in_s, OUTAGE_MAX_RETRY_S)
            try:
                return attempt()
            except outage_errors as again:
                error = again

    def _resume_after_outage(self) -> None:
        if self._outage_since is not None:
            log.warning("outputs accepted again after %.1f s: resuming consumption", time.monotonic() - self._outage_since)
            self._outage_since = None
            self._metrics.paused.set(0)
            self._consumer.resume_all()

    def _rewind(self, records: list[InputRecord]) -> None:
        """Seek the partitions this worker still owns back to the first of `records`, to read them again."""
        owned = self._consumer.assignment()
        for tp, first in _by_partition(first_offsets(records)).items():
            if tp in owned:
                self._consumer.seek(tp, first)

    def _wait_out(self, error: Exception, delay_s: float, stop: threading.Event | None) -> None:
        """Pause every assigned partition and wait `delay_s` (less if `stop` is set) while polling, which
        keeps the consumer in its group. Records a poll still returns (partitions assigned during the
        wait) are sought back to."""
        dependency = "redis" if isinstance(error, redis.RedisError) else "kafka"
        self._metrics.dependency_errors.labels(dependency).inc()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._metrics.paused.set(1)
            log.error("%s refused the batch's outputs (%s: %s): consumption paused, retrying", dependency,
                      type(error).__name__, error)
        else:
            log.warning("still failing after %.0f s (%s: %s); next try in %.1f s",
                        time.monotonic() - self._outage_since, type(error).__name__, error, delay_s)
        until = time.monotonic() + delay_s
        while time.monotonic() < until and not (stop is not None and stop.is_set()):
            self._consumer.pause_all()
            slice_ms = max(1, int(min(1.0, until - time.monotonic()) * 1000))
            self._rewind(self._consumer.poll(slice_ms))
            self.last_poll_ok_monotonic = time.monotonic()
        self._consumer.pause_all()

    def _account(self, built: Built) -> None:
        """Metrics of a committed batch."""
        m, task = self._metrics, self._model.meta.task
        for reason in built.dead_letter_reasons:
            m.dead_letters.labels(reason).inc()
        m.duplicates.inc(built.duplicates)
        m.replayed.inc(built.replayed)
        m.predictions.labels(task).inc(built.predicted)
        if built.resolved is not None:
            m.labels_resolved.labels(task).inc(built.labels_resolved)
            self._score(built.resolved)

    def _score(self, resolved: Resolved) -> None:
        """Prequential scores of the labels a committed batch resolved; on a drift alarm, ask the trainer for a
        fine-tune on the examples since the estimated change."""
        observe = self._quality.observe
        changes = [change for version, probabilities, label, resolved_ts_s in zip(*resolved, strict=True)
                   if (change := observe(version, probabilities, label, resolved_ts_s)) is not None]
        if not changes:
            return
        self._metrics.drift_alarms.inc(len(changes))
        log.warning("drift detector alarmed on the live loss stream; the change is estimated at event time %s",
                    datetime.fromtimestamp(changes[-1], tz=timezone.utc).isoformat())
        if self._raise_drift_alarm is not None:
            try:
                self._raise_drift_alarm(changes[-1])
            except redis.RedisError as error:  # the batch is committed; a lost alarm only delays a fine-tune
                log.warning("could not pass the drift alarm to the trainer: %s", error)

    def _refresh_quality(self) -> None:
        """Export rolling quality per tracked version; drop the series of versions no longer tracked."""
        exported = set()
        for version, measures in self._quality.snapshot().items():
            for measure, value in measures.items():
                self._metrics.live_quality.labels(version, measure).set(value)
                exported.add((version, measure))
        for stale in self._quality_series - exported:
            self._metrics.live_quality.remove(*stale)
        self._quality_series = exported

    def _maybe_swap(self) -> None:
        ready = self._follower.take() if self._follower is not None else None
        if ready is None:
            return
        version, parameters = ready
        started = time.perf_counter()
        try:
            self._model.swap(parameters, version)  # checks that they fit
        except ValueError as error:
            self._metrics.swaps_refused.inc()
            log.error("refusing model %s, the current model keeps serving: %s", version, error)
            return
        self._builder.swap(parameters, version)  # it builds with them from its next batch on
        self._metrics.swap_duration.observe(time.perf_counter() - started)
        self._metrics.model_swaps.inc()
        self._metrics.model_info.info({"version": version, "task": self._model.meta.task})
        log.info("now serving model %s (swap took %.2f ms)", version, (time.perf_counter() - started) * 1000)

    def _commit(self, records: list[InputRecord], built: Built) -> None:
        """Produce a built batch and commit its offsets. The builder has written its Redis transaction
        (event claims, user states, pending predictions, labelled examples, deadlines, event-time progress);
        then, in this order:
        1. Kafka: produce predictions and dead letters, flush, and check every acknowledgement;
        2. Kafka: commit the offsets after the batch (asynchronously; the last ones again, synchronously, on
           a clean stop).
        A crash between steps replays the batch: claims make the replay emit the same predictions.
        In exactly-once mode both steps are one Kafka transaction, so a read_committed reader sees the
        batch's outputs once, whatever happens.
        """
        offsets = _by_partition(next_offsets(records))
        if self._transactional:
            try:
                self._producer.send_in_transaction(built.messages, offsets, self._consumer.group_metadata())
            except kafka_io.TransactionAborted as error:
                raise BatchAborted(f"transaction of {len(records)} records aborted ({error}); "
                                   "they will be read again") from error
        else:
            self._producer.send_all(built.messages)
            self._consumer.commit_async(offsets)
            self._latest_offsets.update(offsets)
        sent_ms = built.input_timestamps_ms
        observe_many(self._metrics.latency, np.maximum(0.0, time.time() * 1000.0 - sent_ms[sent_ms >= 0]) / 1000.0)

    def _check_fetching(self, now: float) -> None:
        """Whether the consumer has stalled: it owns partitions, consumption is not paused, and the client sent
        no fetch for STALLED_AFTER_S. Every poll then succeeds and returns nothing, and the lag gauge (the last
        fetch's high-water mark) can read 0, so nothing else would show it: kafka-python 3.0 once left a
        rebalance unfinished that way (worker/kafka_io.py). A stalled worker is not ready, and says so once."""
        try:
            fetching = self._consumer.fetching()
        except Exception as error:  # an observation, as the lag: a failed look-up must not stop serving
            log.warning("could not read whether the Kafka consumer fetches: %s", error)
            fetching = None
        owned = self._consumer.assignment() if fetching is False and self._outage_since is None else set()
        if not owned:
            self._not_fetching_since = None
        elif self._not_fetching_since is None:
            self._not_fetching_since = now
        stalled = self._not_fetching_since is not None and now - self._not_fetching_since >= STALLED_AFTER_S
        if stalled and not self.stalled:
            log.error("the Kafka consumer owns %d partitions but has fetched nothing for over a minute, though every "
                      "poll succeeds: /readyz reports not ready; restart the worker if it does not recover", len(owned))
        elif self.stalled and not stalled:
            log.info("the Kafka consumer fetches again")
        self.stalled = stalled

    def _refresh_lag(self) -> None:
        try:
            for tp, lag in self._consumer.lag().items():
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        except Exception as error:  # lag is an observation; a failed look-up must not stop serving
            log.warning("could not read consumer lag: %s", error)


def _by_partition(offsets: dict[tuple[str, int], int]) -> dict[TopicPartition, int]:
    """pipeline's (topic, partition) keys as the Kafka clients' TopicPartition."""
    return {TopicPartition(topic, partition): offset for (topic, partition), offset in offsets.items()}


class _Progress:
    """Periodic one-line progress reports from the counters."""

    def __init__(self, metrics: WorkerMetrics):
        self._metrics = metrics
        self._last = (time.monotonic(), 0.0)

    def log(self, now: float) -> None:
        consumed = self._metrics.total("streamadapt_events_consumed_total")
        predicted = self._metrics.total("streamadapt_predictions_total")
        dead = self._metrics.total("streamadapt_events_dead_lettered_total")
        duplicates = self._metrics.total("streamadapt_events_duplicate_total")
        then, consumed_then = self._last
        rate = (consumed - consumed_then) / max(1e-9, now - then)
        self._last = (now, consumed)
        log.info("progress: consumed=%d predicted=%d dead_lettered=%d duplicates=%d rate=%.0f events/s",
                 consumed, predicted, dead, duplicates, rate)
