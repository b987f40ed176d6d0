"""One batch of input records -> the records to produce, and what the batch writes to Redis.

`BatchBuilder.build` validates, dedupes, computes features, predicts and joins labels, reading Redis;
`BatchBuilder.save` writes everything the batch changed (one MULTI/EXEC; one script per shard on a Redis
Cluster: streamadapt.state.store), and hands back the labels the batch resolved, which the serving loop scores
(prequential quality and drift) once the batch is committed. The serving loop (streamadapt.serving.loop) calls
both on its own thread, then produces the outputs and commits the offsets. The pure logic is in
streamadapt.serving.plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

from streamadapt.core.examples import labels_known_until
from streamadapt.core.parsing import InputLimits, Rejection, parse_event
from streamadapt.core.plugin import Features
from streamadapt.kafka.protocol import InputRecord, Message
from streamadapt.model.checkpoint import ServingModel
from streamadapt.serving.plan import (
    dead_letter_message,
    expire_pendings,
    first_event_time,
    make_predictions,
    newest_event_times,
    plan_batch,
    resolved_examples,
    served_examples,
    split_stale,
)
from streamadapt.settings import Settings
from streamadapt.state.store import StateStore, StateWrites

WINDOWS_EXPIRY_INTERVAL_S = 60.0  # how often a serving process drops example windows past their maximum age


class Resolved(NamedTuple):
    """The labels a saved batch resolved, to be scored once it is committed: for each, the version that
    served the prediction, the probabilities it served, the label's class index, and the event time at
    which the label became known."""

    versions: list[str]
    probabilities: np.ndarray  # (n, n_classes) float32
    labels: list[int]
    resolved_ts_s: list[float]

    @classmethod
    def of(cls, writes: StateWrites) -> Resolved:
        examples = [example for _, example in writes.examples]
        probabilities = (np.stack([e.probabilities for e in examples]) if examples
                         else np.zeros((0, 0), np.float32))
        return cls([e.model_version for e in examples], probabilities, [e.label for e in examples],
                   [e.resolved_ts_s for e in examples])


@dataclass
class Built:
    """A built batch: the records to produce as (topic, key, value), each with its input record; and what it amounts to, for the metrics
    and the quality monitor once the batch is committed (`resolved` is filled in by `BatchBuilder.save`)."""

    messages: list[Message]
    sources: list[InputRecord]  # the input record of each message
    # the input record timestamp (ms) of each prediction, for the event-to-prediction latency histogram
    input_timestamps_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    dead_letter_reasons: list[str] = field(default_factory=list)
    duplicates: int = 0
    replayed: int = 0
    predicted: int = 0
    resolved: Resolved | None = None

    @property
    def labels_resolved(self) -> int:
        return len(self.resolved.labels) if self.resolved is not None else 0


class BatchBuilder:
    def __init__(self, settings: Settings, store: StateStore, model: ServingModel, features: Features,
                 dlq_max_bytes: int | None = None, clock=lambda: datetime.now(timezone.utc)):
        """`features` is the plug-in the model was trained with; `store` keeps the users' states by it.
        `dlq_max_bytes` bounds a dead letter (default: settings.dlq_max_bytes; service.run lowers it to what
        the dead-letter topic accepts)."""
        self._settings = settings
        self._limits = InputLimits(max_payload_bytes=settings.max_payload_bytes, max_future_skew_s=settings.max_future_skew_s,
                                   max_item_id_chars=settings.max_item_id_chars,
                                   max_category_chars=settings.max_category_chars)
        self._dlq_max_bytes = dlq_max_bytes or settings.dlq_max_bytes
        self._newest_s: dict[str, float] | None = None  # newest event time per input partition, read once from Redis
        self._windows_expire_at = 0.0  # monotonic
        self._store = store
        self._model = model
        self._features = features
        self._clock = clock

    def build(self, records: list[InputRecord]) -> tuple[Built, StateWrites]:
        """The batch's outputs and the Redis writes that must land before they are sent (the batch before
        has been saved). Redis errors propagate."""
        s = self._settings
        now = self._clock()
        valid, rejected = [], []
        for record in records:
            parsed = parse_event(record.value, now=now, limits=self._limits)
            (rejected if isinstance(parsed, Rejection) else valid).append((record, parsed))
        if self._newest_s is None:
            self._newest_s = self._store.newest_by_partition()
        valid, stale = split_stale(valid, self._newest_s, s.max_past_skew_s)
        rejected += stale
        messages = [dead_letter_message(record, rejection, now, s.kafka.dlq_topic, self._dlq_max_bytes)
                    for record, rejection in rejected]
        sources = [record for record, _ in rejected]
        reasons = [rejection.reason.value for _, rejection in rejected]
        claims, states, pendings, observed_since_s = self._store.load(
            [(e.user_id, e.event_id) for _, e in valid], first_event_time([e for _, e in valid]))
        model, meta = self._model, self._model.meta
        plan = plan_batch(valid, claims, states, pendings, meta, self._features, observed_since_s)
        probabilities = model.predict_many(plan.features)
        predictions, claims = make_predictions(plan.fresh, probabilities, meta, model.version, now)
        writes = StateWrites(states=plan.states)
        predictions_topic = s.kafka.predictions_topic
        for (record, event), body, claim in zip(plan.fresh, predictions, claims):
            writes.claims.append((event.user_id, event.event_id, claim))
            messages.append((predictions_topic, event.user_id.encode(), body))
            sources.append(record)
        for record, event, body in plan.replays:
            messages.append((predictions_topic, event.user_id.encode(), body))
            sources.append(record)
        input_timestamps_ms = np.array([record.timestamp_ms for record, _ in plan.fresh]
                                       + [record.timestamp_ms for record, _, _ in plan.replays], dtype=np.float64)
        served = served_examples(plan, probabilities, model.version)
        writes.examples = resolved_examples(plan, served)
        writes.pendings = {user: served[i] for user, i in plan.last_fresh_of_user.items()}
        writes.newest_by_partition = newest_event_times(plan.fresh)
        if meta.task == "repurchase":
            partition_of_user = {user: plan.fresh[i][0].partition_ref for user, i in plan.last_fresh_of_user.items()}
            self._resolve_negatives(writes, partition_of_user, meta.horizon_days or 0.0)
        if time.monotonic() >= self._windows_expire_at:
            self._expire_windows()
        built = Built(messages, sources, input_timestamps_ms, reasons, duplicates=len(plan.duplicates), replayed=len(plan.replays),
                      predicted=len(predictions) + len(plan.replays))
        return built, writes

    def newest_event_times(self) -> dict[str, float]:
        """The newest event time of each input partition (by partition_ref) as this worker knows it: those it
        served, and the fleet's as Redis had them when it started."""
        return self._newest_s or {}

    def save(self, built: Built, writes: StateWrites) -> Built:
        """Apply the batch's writes; the batch then carries the labels it resolved (they
        are in Redis now, so each is scored once). Redis errors propagate: the batch is then built again, and
        a write that did land makes that second build a replay, with the same predictions."""
        self._store.save(writes)
        built.resolved = Resolved.of(writes)
        return built

    def _expire_windows(self) -> None:
        """Drop the example windows whose labels have been known for longer than their maximum age, as the
        trainer does before each round: with --no-finetune no trainer runs, and Redis must stay bounded."""
        meta = self._model.meta
        t = self._settings.training
        now_watermark = self._store.watermark(t.allowed_lateness_s, t.idle_partition_timeout_s)
        self._store.expire_windows(labels_known_until(meta.task, meta.horizon_days, now_watermark))
        self._windows_expire_at = time.monotonic() + WINDOWS_EXPIRY_INTERVAL_S

    def _resolve_negatives(self, writes: StateWrites, partition_of_user: dict[str, str], horizon_days: float) -> None:
        """Repurchase: new deadlines for the new pendings, and negatives for deadlines the watermark passed, on
        the input partitions of this batch (this worker owns them, so no other settles their users)."""
        horizon_s = horizon_days * 86400.0
        for user, pending in writes.pendings.items():
            writes.deadlines.setdefault(partition_of_user[user], {})[user] = pending.ts_s + horizon_s
        t = self._settings.training
        now_watermark = self._store.watermark(t.allowed_lateness_s, t.idle_partition_timeout_s, writes.newest_by_partition)
        if now_watermark is None:
            return
        replaced = set(writes.pendings)
        due = self._store.due_deadlines(writes.newest_by_partition, now_watermark)
        writes.labels_through = {partition: now_watermark for partition in writes.newest_by_partition
                                 if self._store.listed_every_due(due.get(partition, []))}
        for partition, users in due.items():
            states, pendings = self._store.load_profiles(users)
            negatives, cleared, requeue = expire_pendings(pendings, now_watermark, horizon_days, replaced)
            writes.examples.extend(negatives)
            writes.cleared_pendings.update({user: states.get(user) for user in cleared})
            writes.settled_deadlines[partition] = users  # requeued ones are added back after their removal
            if requeue:
                writes.deadlines.setdefault(partition, {}).update(requeue)
