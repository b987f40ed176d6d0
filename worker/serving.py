"""The serving loop: poll a batch, handle it, commit it. Short on purpose; the logic is in pipeline."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError

from worker import kafka_io
from worker.metrics import WorkerMetrics
from worker.model import ServingModel
from worker.parsing import Rejection, parse_event
from worker.pipeline import BatchPlan, InputRecord, make_dead_letter, make_predictions, next_offsets, plan_batch
from worker.settings import Settings
from worker.features import UserState
from worker.state import EventClaim, StateStore

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 60.0
LAG_REFRESH_S = 5.0


@dataclass
class Outbox:
    """Records to produce for one batch: (topic, key, value, input record timestamp in ms or None)."""

    messages: list[tuple[str, bytes | None, bytes, int | None]]
    claims: list[tuple[str, EventClaim]]
    states: dict[str, UserState]


class ServingLoop:
    def __init__(self, settings: Settings, consumer: KafkaConsumer, producer: KafkaProducer, store: StateStore,
                 model: ServingModel, metrics: WorkerMetrics, clock=lambda: datetime.now(timezone.utc)):
        self._settings = settings
        self._consumer = consumer
        self._producer = producer
        self._store = store
        self._model = model
        self._metrics = metrics
        self._clock = clock
        self.last_poll_ok_monotonic: float | None = None
        metrics.model_info.info({"version": model.version, "task": model.meta.task})

    @property
    def model(self) -> ServingModel:
        return self._model

    def run(self, stop: threading.Event) -> None:
        """Poll and handle batches until `stop` is set; each batch is committed before the next poll."""
        timeout_ms = self._settings.kafka.poll_timeout_ms
        next_lag_at = next_progress_at = time.monotonic()
        progress = _Progress(self._metrics)
        while not stop.is_set():
            polled = self._consumer.poll(timeout_ms=timeout_ms)
            self.last_poll_ok_monotonic = time.monotonic()
            records = [InputRecord(r.topic, r.partition, r.offset, r.timestamp, r.key, r.value)
                       for batch in polled.values() for r in batch]
            if records:
                self.handle(records)
            now = time.monotonic()
            if now >= next_lag_at:
                self._refresh_lag()
                next_lag_at = now + LAG_REFRESH_S
            if now >= next_progress_at:
                progress.log(now)
                next_progress_at = now + self._settings.progress_interval_s
        progress.log(time.monotonic())

    def handle(self, records: list[InputRecord]) -> None:
        started = time.perf_counter()
        try:
            outbox = self._build_outbox(records)
            self._commit(records, outbox)
        except Exception:
            first, last = records[0], records[-1]
            log.exception("batch of %d records failed (from %s to %s)", len(records), first.ref, last.ref)
            raise
        self._metrics.batch_duration.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(records))

    def _build_outbox(self, records: list[InputRecord]) -> Outbox:
        s, m = self._settings, self._metrics
        now = self._clock()
        m.events_consumed.inc(len(records))
        valid, messages = [], []
        for record in records:
            parsed = parse_event(record.value, now=now, max_payload_bytes=s.max_payload_bytes,
                                 max_future_skew_s=s.max_future_skew_s)
            if isinstance(parsed, Rejection):
                letter = make_dead_letter(record, parsed, now, s.dlq_payload_max_chars)
                messages.append((s.kafka.dlq_topic, record.key, letter.model_dump_json().encode(), None))
                m.dead_letters.labels(parsed.reason.value).inc()
            else:
                valid.append((record, parsed))
        claims, states = self._store.load([e.event_id for _, e in valid], list({e.user_id for _, e in valid}))
        model = self._model  # one model for the whole batch, even if a swap happens meanwhile
        plan: BatchPlan = plan_batch(valid, claims, states, model.meta.feature_spec)
        predictions = make_predictions(plan.fresh, model.predict_many(plan.features), model.meta, model.version, now)
        new_claims = []
        for (record, event), prediction in zip(plan.fresh, predictions):
            body = prediction.model_dump_json().encode()
            new_claims.append((event.event_id, EventClaim(record.ref, body)))
            messages.append((s.kafka.predictions_topic, event.user_id.encode(), body, record.timestamp_ms))
        for record, body in plan.replays:
            messages.append((s.kafka.predictions_topic, record.key, body, record.timestamp_ms))
        m.duplicates.inc(len(plan.duplicates))
        m.replayed.inc(len(plan.replays))
        m.predictions.labels(model.meta.task).inc(len(predictions) + len(plan.replays))
        return Outbox(messages, new_claims, plan.states)

    def _commit(self, records: list[InputRecord], outbox: Outbox) -> None:
        """The commit step, in this order:
        1. Redis: new event claims and user states in one MULTI/EXEC;
        2. Kafka: produce predictions and dead letters, flush, and check every acknowledgement;
        3. Kafka: commit the offsets after the batch.
        A crash between steps replays the batch: claims make the replay emit the same predictions.
        """
        self._store.save(outbox.claims, outbox.states)
        futures = [self._producer.send(topic, key=key, value=value) for topic, key, value, _ in outbox.messages]
        self._producer.flush(timeout=ACK_TIMEOUT_S)
        kafka_io.wait_acknowledged(futures, ACK_TIMEOUT_S)
        acked_ms = time.time() * 1000.0
        for _, _, _, source_ms in outbox.messages:
            if source_ms is not None and source_ms >= 0:
                self._metrics.latency.observe(max(0.0, acked_ms - source_ms) / 1000.0)
        offsets = {TopicPartition(topic, partition): offset for (topic, partition), offset in next_offsets(records).items()}
        try:
            kafka_io.commit(self._consumer, offsets)
        except CommitFailedError as error:
            # The group rebalanced under us; the new owner replays these records and re-emits the same outputs.
            log.warning("offset commit refused after a rebalance, records will be replayed: %s", error)

    def _refresh_lag(self) -> None:
        try:
            for tp, lag in kafka_io.consumer_lag(self._consumer).items():
                self._metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        except Exception as error:  # lag is an observation; a failed look-up must not stop serving
            log.warning("could not read consumer lag: %s", error)


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
