"""One batch of input records -> the records to produce, and what the batch writes to Redis.

`BatchBuilder.build` validates, dedupes, computes features, predicts and joins labels, reading Redis;
`BatchBuilder.save` writes everything the batch changed in one MULTI/EXEC, then scores the labels the batch
resolved (prequential quality and drift). They run in the builder process (worker.builder), beside the
serving loop that produces the outputs and commits the offsets. The pure logic is in worker.pipeline.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

import redis

from worker.labels import watermark
from worker.model import ServingModel
from worker.parsing import Rejection, parse_event
from worker.pipeline import (
    InputRecord, Message, expire_pendings, make_dead_letter, make_predictions, newest_event_times, plan_batch,
    resolution_times, resolved_examples, served_examples,
)
from worker.quality import QualityMonitor
from worker.settings import Settings
from worker.state import EventClaim, StateStore, StateWrites

log = logging.getLogger(__name__)

# Errors of an unavailable Redis: the batch is built again once Redis answers.
REDIS_OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                       redis.exceptions.ReadOnlyError)


@dataclass
class Built:
    """A built batch: the records to produce as (topic, key, value, input timestamp ms); and what it amounts
    to, for the metrics once the batch is committed (the last three filled in by `BatchBuilder.save`)."""

    messages: list[Message]
    dead_letter_reasons: list[str] = field(default_factory=list)
    duplicates: int = 0
    replayed: int = 0
    predicted: int = 0
    labels_resolved: int = 0
    drift_alarms: int = 0
    quality: dict[str, dict[str, float]] | None = None  # rolling quality per version, when asked for


class Unsaved(NamedTuple):
    """The writes of the batch before, while its transaction may still be on its way to Redis."""

    writes: StateWrites
    landed: Future  # done once the transaction went through or failed


class BatchBuilder:
    def __init__(self, settings: Settings, store: StateStore, model: ServingModel,
                 clock=lambda: datetime.now(timezone.utc)):
        self._settings = settings
        self._store = store
        self._model = model
        self._quality = QualityMonitor(model.meta.task, settings.training.quality_window)
        self._clock = clock

    def swap(self, weights, version: str) -> None:
        self._model.swap(weights, version)

    def build(self, records: list[InputRecord], unsaved: Unsaved | None = None) -> tuple[Built, StateWrites]:
        """The batch's outputs and the Redis writes that must land before they are sent. It reads Redis as
        the writes in `unsaved` leave it (they win over what Redis holds until they land); Redis errors
        propagate."""
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
        claims, states, pendings = self._store.load([e.event_id for _, e in valid], list({e.user_id for _, e in valid}),
                                                    unsaved=unsaved and unsaved.writes)
        model, meta = self._model, self._model.meta
        plan = plan_batch(valid, claims, states, pendings, meta)
        probabilities = model.predict_many(plan.features)
        predictions = make_predictions(plan.fresh, probabilities, meta, model.version, now)
        writes = StateWrites(states=plan.states)
        predictions_topic = s.kafka.predictions_topic
        for (record, event), body in zip(plan.fresh, predictions):
            writes.claims.append((event.event_id, EventClaim(record.ref, body)))
            messages.append((predictions_topic, event.user_id.encode(), body, record.timestamp_ms))
        for record, body in plan.replays:
            messages.append((predictions_topic, record.key, body, record.timestamp_ms))
        served = served_examples(plan, probabilities, model.version)
        writes.examples = resolved_examples(plan, served)
        writes.resolved_ts_s = resolution_times(plan)
        writes.pendings = {user: served[i] for user, i in plan.last_fresh_of_user.items()}
        writes.newest_by_partition = newest_event_times(plan.fresh)
        if meta.task == "repurchase":
            partition_of_user = {user: plan.fresh[i][0].partition_ref for user, i in plan.last_fresh_of_user.items()}
            self._resolve_negatives(writes, partition_of_user, meta.horizon_days or 0.0, unsaved)
        built = Built(messages, reasons, duplicates=len(plan.duplicates), replayed=len(plan.replays),
                      predicted=len(predictions) + len(plan.replays))
        return built, writes

    def save(self, built: Built, writes: StateWrites, with_quality: bool = False) -> Built:
        """Apply the batch's writes in one transaction, then score the labels it resolved (they are in Redis
        now, so each is scored once). Redis errors propagate: the batch is then built again, and a
        transaction that did land makes that second build a replay, with the same predictions."""
        self._store.save(writes)
        built.labels_resolved = len(writes.examples)
        built.drift_alarms = self._score(writes)
        if with_quality:
            built.quality = self._quality.snapshot()
        return built

    def _resolve_negatives(self, writes: StateWrites, partition_of_user: dict[str, str], horizon_days: float,
                           unsaved: Unsaved | None) -> None:
        """Repurchase: new deadlines for the new pendings, and negatives for deadlines the watermark passed,
        on the input partitions of this batch. The deadline index is read once the batch before has landed."""
        if unsaved is not None:
            wait([unsaved.landed])
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
            states, pendings = self._store.load_profiles(users)
            negatives, cleared, requeue = expire_pendings(pendings, now_watermark, horizon_days, replaced)
            writes.examples.extend(negatives)
            writes.resolved_ts_s.extend(now_watermark for _ in negatives)  # known to be negative once the watermark passed
            writes.cleared_pendings.update({user: states.get(user) for user in cleared})
            writes.settled_deadlines[partition] = users  # requeued ones are added back after their removal
            if requeue:
                writes.deadlines.setdefault(partition, {}).update(requeue)

    def _score(self, writes: StateWrites) -> int:
        """Prequential scores of the labels this batch resolved; on a drift alarm, ask the trainer for a
        fine-tune on the examples since the estimated change. Returns the number of alarms."""
        changes = [change for example, resolved_ts_s in zip(writes.examples, writes.resolved_ts_s, strict=True)
                   if (change := self._quality.observe(example.model_version, example.probabilities, example.label,
                                                       resolved_ts_s)) is not None]
        if changes:
            log.warning("drift detector alarmed on the live loss stream; the change is estimated at event time %s",
                        datetime.fromtimestamp(changes[-1], tz=timezone.utc).isoformat())
            try:
                self._store.raise_drift_alarm(changes[-1])
            except redis.RedisError as error:  # the batch is saved; a lost alarm only delays a fine-tune
                log.warning("could not pass the drift alarm to the trainer: %s", error)
        return len(changes)
