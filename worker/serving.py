"""The serving loop: poll a batch, handle it, commit it. Short on purpose; the logic is in pipeline."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import redis
from kafka import TopicPartition
from kafka.errors import BrokerNotAvailableError, KafkaConnectionError, KafkaTimeoutError

from worker import kafka_io
from worker.hotswap import ModelFollower
from worker.kafka_io import ServingConsumer, ServingProducer
from worker.labels import watermark
from worker.metrics import WorkerMetrics
from worker.model import ServingModel
from worker.parsing import Rejection, parse_event
from worker.pipeline import (
    InputRecord, expire_pendings, first_offsets, make_dead_letter, make_predictions, next_offsets, plan_batch,
    resolved_examples, served_examples,
)
from worker.quality import QualityMonitor
from worker.settings import Settings
from worker.state import EventClaim, StateStore, StateWrites

log = logging.getLogger(__name__)

OUTAGE_FIRST_RETRY_S = 0.5
OUTAGE_MAX_RETRY_S = 30.0
# Errors of an unavailable dependency: the batch is retried, not dropped, and the worker does not exit.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                 redis.exceptions.ReadOnlyError, KafkaTimeoutError, KafkaConnectionError, BrokerNotAvailableError,
                 kafka_io.NotAcknowledged)


class BatchAborted(Exception):
    """Exactly-once mode: the batch's transaction was aborted and its partitions rewound to its start; the
    batch is read again by whoever owns them (this worker, or a new owner after a rebalance)."""


GAUGE_REFRESH_S = 5.0  # consumer lag and live quality are observations: refreshed on a timer, not per batch


@dataclass
class Outbox:
    """What one batch writes: Redis state, and records to produce as (topic, key, value, input timestamp ms);
    and what it amounts to, counted in the metrics only once the batch is committed (a batch retried after
    an outage is counted once)."""

    messages: list[kafka_io.Message]
    writes: StateWrites
    dead_letter_reasons: list[str]
    duplicates: int = 0
    replayed: int = 0
    predicted: int = 0


class ServingLoop:
    def __init__(self, settings: Settings, consumer: ServingConsumer, producer: ServingProducer, store: StateStore,
                 model: ServingModel, metrics: WorkerMetrics, follower: ModelFollower | None = None,
                 clock=lambda: datetime.now(timezone.utc)):
        self._settings = settings
        self._follower = follower
        self._quality = QualityMonitor(model.meta.task, settings.training.quality_window)
        self._quality_series: set[tuple[str, str]] = set()
        self._consumer = consumer
        self._producer = producer
        self._transactional = settings.kafka.exactly_once
        self._store = store
        self._model = model
        self._metrics = metrics
        self._clock = clock
        self.last_poll_ok_monotonic: float | None = None
        self._outage_since: float | None = None  # monotonic time the current outage began
        self._latest_offsets: dict[TopicPartition, int] = {}  # last offsets committed (asynchronously) per partition
        metrics.model_info.info({"version": model.version, "task": model.meta.task})

    def run(self, stop: threading.Event) -> None:
        """Poll and handle batches until `stop` is set; each batch is committed before the next poll."""
        timeout_ms = self._settings.kafka.poll_timeout_ms
        next_gauges_at = next_progress_at = time.monotonic()
        progress = _Progress(self._metrics)
        while not stop.is_set():
            self._maybe_swap()
            records = self._consumer.poll(timeout_ms)
            self.last_poll_ok_monotonic = time.monotonic()
            if records:
                self.handle(records, stop)
            now = time.monotonic()
            if now >= next_gauges_at:
                self._refresh_lag()
                self._refresh_quality()
                next_gauges_at = now + GAUGE_REFRESH_S
            if now >= next_progress_at:
                progress.log(now)
                next_progress_at = now + self._settings.progress_interval_s
        owned = self._consumer.assignment()
        final = {tp: offset for tp, offset in self._latest_offsets.items() if tp in owned}
        if final:  # confirmed synchronously, so a clean stop leaves nothing to replay
            self._consumer.commit(final)
        progress.log(time.monotonic())

    @property
    def paused(self) -> bool:
        """True while consumption is paused because Redis or Kafka refuses the batch's outputs."""
        return self._outage_since is not None

    def handle(self, records: list[InputRecord], stop: threading.Event | None = None) -> None:
        """Build and commit one batch. While Redis or Kafka is unavailable the same batch is retried with
        backoff and consumption is paused (memory stays at one batch; the group membership is kept), until
        it goes through or `stop` is set. Any other error is a bug and propagates."""
        started = time.perf_counter()
        self._metrics.events_consumed.inc(len(records))
        retry_in_s = OUTAGE_FIRST_RETRY_S
        while True:
            try:
                outbox = self._build_outbox(records)
                self._commit(records, outbox)
                break
            except BatchAborted as aborted:
                log.warning("%s", aborted)
                outbox = None
                break
            except OUTAGE_ERRORS as error:
                if stop is not None and stop.is_set():
                    raise  # stopping: the uncommitted batch is replayed by the next owner
                self._wait_out(error, retry_in_s, stop)
                retry_in_s = min(2 * retry_in_s, OUTAGE_MAX_RETRY_S)
            except Exception:
                first, last = records[0], records[-1]
                log.exception("batch of %d records failed (from %s to %s)", len(records), first.ref, last.ref)
                raise
        if self._outage_since is not None:
            log.warning("outputs accepted again after %.1f s: resuming consumption", time.monotonic() - self._outage_since)
            self._outage_since = None
            self._metrics.paused.set(0)
            self._consumer.resume_all()
        if outbox is not None:
            self._account(outbox)
        self._metrics.batch_duration.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(records))

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
            for tp, first in _by_partition(first_offsets(self._consumer.poll(slice_ms))).items():
                self._consumer.seek(tp, first)
            self.last_poll_ok_monotonic = time.monotonic()
        self._consumer.pause_all()

    def _account(self, outbox: Outbox) -> None:
        """Metrics and prequential quality of a committed batch."""
        m, task = self._metrics, self._model.meta.task
        for reason in outbox.dead_letter_reasons:
            m.dead_letters.labels(reason).inc()
        m.duplicates.inc(outbox.duplicates)
        m.replayed.inc(outbox.replayed)
        m.predictions.labels(task).inc(outbox.predicted)
        examples = outbox.writes.examples
        if not examples:
            return
        m.labels_resolved.labels(task).inc(len(examples))
        alarmed = False
        for example in examples:
            alarmed |= self._quality.observe(example.model_version, example.probabilities, example.label)
        if alarmed:
            m.drift_alarms.inc()
            log.warning("drift detector alarmed on the live loss stream")
            try:
                self._store.raise_drift_alarm()
            except redis.RedisError as error:  # the batch is committed; a lost alarm only delays a fine-tune
                log.warning("could not pass the drift alarm to the trainer: %s", error)

    def _build_outbox(self, records: list[InputRecord]) -> Outbox:
        s = self._settings
        now = self._clock()
        valid, messages, reasons = [], [], []
        for record in records:
            parsed = parse_event(record.value, now=now, max_payload_bytes=s.max_payload_bytes,
                                 max_future_skew_s=s.max_future_skew_s)
            if isinstance(parsed, Rejection):
                letter = make_dead_letter(record, parsed, now, s.dlq_payload_max_chars)
                messages.append((s.kafka.dlq_topic, record.key, letter.model_dump_json().encode(), None))
                reasons.append(parsed.reason.value)
            else:
                valid.append((record, parsed))
        claims, states, pendings = self._store.load([e.event_id for _, e in valid], list({e.user_id for _, e in valid}))
        model, meta = self._model, self._model.meta
        plan = plan_batch(valid, claims, states, pendings, meta)
        probabilities = model.predict_many(plan.features)
        predictions = make_predictions(plan.fresh, probabilities, meta, model.version, now)
        writes = StateWrites(states=plan.states)
        for (record, event), body in zip(plan.fresh, predictions):
            writes.claims.append((event.event_id, EventClaim(record.ref, body)))
            messages.append((s.kafka.predictions_topic, event.user_id.encode(), body, record.timestamp_ms))
        for record, body in plan.replays:
            messages.append((s.kafka.predictions_topic, record.key, body, record.timestamp_ms))
        served = served_examples(plan, probabilities, model.version)
        writes.examples = resolved_examples(plan, served)
        writes.pendings = {user: served[i] for user, i in plan.last_fresh_of_user.items()}
        for record, event in plan.fresh:
            partition = record.partition_ref
            writes.newest_by_partition[partition] = max(writes.newest_by_partition.get(partition, float("-inf")),
                                                        event.ts_s)
        if meta.task == "repurchase":
            partition_of_user = {user: plan.fresh[i][0].partition_ref for user, i in plan.last_fresh_of_user.items()}
            self._resolve_negatives(writes, partition_of_user, meta.horizon_days or 0.0)
        return Outbox(messages, writes, reasons, duplicates=len(plan.duplicates), replayed=len(plan.replays),
                      predicted=len(predictions) + len(plan.replays))

    def _resolve_negatives(self, writes: StateWrites, partition_of_user: dict[str, str], horizon_days: float) -> None:
        """Repurchase: new deadlines for the new pendings, and negatives for deadlines the watermark passed,
        on the input partitions of this batch."""
        horizon_s = horizon_days * 86400.0
        for user, pending in writes.pendings.items():
            writes.deadlines.setdefault(partition_of_user[user], {})[user] = pending.ts_s + horizon_s
        newest = self._store.newest_by_partition()
        for partition, ts_s in writes.newest_by_partition.items():
            newest[partition] = max(newest.get(partition, float("-inf")), ts_s)
        now_watermark = watermark(newest, self._settings.training.allowed_lateness_s)
        if now_watermark is None:
            return
        replaced = set(writes.pendings)
        for partition, users in self._store.due_deadlines(writes.newest_by_partition, now_watermark).items():
            negatives, cleared, requeue = expire_pendings(self._store.load_pendings(users), now_watermark, horizon_days,
                                                          replaced)
            writes.examples.extend(negatives)
            writes.cleared_pendings.extend(cleared)
            writes.settled_deadlines[partition] = users  # requeued ones are added back after their removal
            if requeue:
                writes.deadlines.setdefault(partition, {}).update(requeue)

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
        version, weights = ready
        started = time.perf_counter()
        try:
            self._model.swap(weights, version)
        except ValueError as error:
            self._metrics.swaps_refused.inc()
            log.error("refusing model %s, the current model keeps serving: %s", version, error)
            return
        self._metrics.swap_duration.observe(time.perf_counter() - started)
        self._metrics.model_swaps.inc()
        self._metrics.model_info.info({"version": version, "task": self._model.meta.task})
        log.info("now serving model %s (swap took %.2f ms)", version, (time.perf_counter() - started) * 1000)

    def _commit(self, records: list[InputRecord], outbox: Outbox) -> None:
        """The commit step, in this order:
        1. Redis: everything the batch changed (event claims, user states, pending predictions, labelled
           examples, deadlines, event-time progress) in one MULTI/EXEC;
        2. Kafka: produce predictions and dead letters, flush, and check every acknowledgement;
        3. Kafka: commit the offsets after the batch (asynchronously; the last ones again, synchronously, on
           a clean stop).
        A crash between steps replays the batch: claims make the replay emit the same predictions.
        In exactly-once mode steps 2 and 3 are one Kafka transaction, so a read_committed reader sees the
        batch's outputs once, whatever happens.
        """
        self._store.save(outbox.writes)
        offsets = _by_partition(next_offsets(records))
        if self._transactional:
            try:
                self._producer.send_in_transaction(outbox.messages, offsets, self._consumer.group_metadata())
            except kafka_io.TransactionAborted as error:
                owned = self._consumer.assignment()
                for tp, first in _by_partition(first_offsets(records)).items():
                    if tp in owned:
                        self._consumer.seek(tp, first)
                raise BatchAborted(f"transaction of {len(records)} records aborted ({error}); "
                                   "they will be read again") from error
        else:
            self._producer.send_all(outbox.messages)
            self._consumer.commit_async(offsets)
            self._latest_offsets.update(offsets)
        acked_ms = time.time() * 1000.0
        for _, _, _, source_ms in outbox.messages:
            if source_ms is not None and source_ms >= 0:
                self._metrics.latency.observe(max(0.0, acked_ms - source_ms) / 1000.0)

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
