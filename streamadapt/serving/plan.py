"""The pure core of the serving path: from parsed records to what must be written, predicted and sent.

Nothing here does I/O; streamadapt.serving.loop wires it to Kafka, Redis and the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from streamadapt.core.examples import Example
from streamadapt.core.labels import resolve_on_purchase
from streamadapt.core.parsing import Rejection
from streamadapt.core.plugin import Features, State
from streamadapt.kafka.protocol import InputRecord, Message, partition_ref
from streamadapt.model.checkpoint import ModelMeta
from streamadapt.schemas import DeadLetter, PurchaseEvent, RejectReason
from streamadapt.schemas.prediction import PredictionWriter, iso_datetime
from streamadapt.state.store import EventClaim

TOP_CLASSES = 3


@dataclass
class BatchPlan:
    """What one batch of valid events amounts to, before inference."""

    fresh: list[tuple[InputRecord, PurchaseEvent]] = field(default_factory=list)  # to predict, in order
    features: np.ndarray | None = None  # one row per fresh event
    replays: list[tuple[InputRecord, PurchaseEvent, bytes]] = field(default_factory=list)  # prediction JSON to re-emit
    duplicates: list[tuple[InputRecord, PurchaseEvent]] = field(default_factory=list)
    states: dict[str, State] = field(default_factory=dict)  # user states changed by this batch
    # label join: (the user, a stored pending prediction or the index of an earlier fresh event here, label
    # index, event time of the purchase that resolved it)
    resolutions: list[tuple[str, Example | int, int, float]] = field(default_factory=list)
    last_fresh_of_user: dict[str, int] = field(default_factory=dict)  # becomes the user's new pending


def plan_batch(valid: list[tuple[InputRecord, PurchaseEvent]], claims: dict[str, EventClaim],
               states: dict[str, State], pendings: dict[str, Example], meta: ModelMeta, features: Features,
               observed_since_s: float) -> BatchPlan:
    """Sort each valid event into fresh, replay or duplicate, and compute features of the fresh ones.

    - replay: Redis says this very record (same topic/partition/offset) was already predicted, so its
      stored prediction is re-emitted and the user's state is left alone (it already holds the event);
    - duplicate: another record already carried this event_id (earlier in Redis or in this batch);
    - fresh: features from the user's state before the event (by the `features` plug-in), then the state
      advances; and the event resolves the label of the user's previous prediction (stored in `pendings`, or
      earlier in this batch).
    `observed_since_s` is the event time from which the states have been kept.
    Events of one user are handled in arrival order, so the result does not depend on batch boundaries.
    """
    spec = meta.feature_spec
    plan = BatchPlan()
    before: list[tuple[State, PurchaseEvent]] = []  # each fresh event with its user's state before it
    claimed_here: set[str] = set()
    for record, event in valid:
        claim = claims.get(event.event_id)
        if claim is not None and claim.record == record.ref and event.event_id not in claimed_here:
            plan.replays.append((record, event, replayed_prediction(claim, event, meta)))
            claimed_here.add(event.event_id)
        elif claim is not None or event.event_id in claimed_here:
            plan.duplicates.append((record, event))
        else:
            user = event.user_id
            state = plan.states.get(user)
            state = features.recall(states.get(user) if state is None else state, event.ts_s)
            index = len(plan.fresh)
            before.append((state, event))
            plan.states[user] = features.advance(state, event)
            previous = plan.last_fresh_of_user.get(user)
            source: Example | int | None = previous if previous is not None else pendings.get(user)
            if source is not None:
                source_ts_s = plan.fresh[source][1].ts_s if isinstance(source, int) else source.ts_s
                label = resolve_on_purchase(meta.task, source_ts_s, event.ts_s,
                                            spec.index_of(event.category), meta.horizon_days)
                plan.resolutions.append((user, source, label, event.ts_s))
            plan.last_fresh_of_user[user] = index
            plan.fresh.append((record, event))
            claimed_here.add(event.event_id)
    plan.features = features.encode(before, observed_since_s)
    return plan


def served_examples(plan: BatchPlan, probabilities: np.ndarray, model_version: str) -> list[Example]:
    """One pending Example per fresh event: its features and the probabilities served for it."""
    return [Example(event.event_id, event.ts_s, model_version, plan.features[i], probabilities[i])
            for i, (_, event) in enumerate(plan.fresh)]


def resolved_examples(plan: BatchPlan, served: list[Example]) -> list[tuple[str, Example]]:
    """The labelled examples this batch's purchases resolved, each with its user."""
    return [(user, (served[source] if isinstance(source, int) else source).with_label(label, resolved_ts_s))
            for user, source, label, resolved_ts_s in plan.resolutions]


def expire_pendings(due: dict[str, Example], watermark_s: float, horizon_days: float,
                    replaced: set[str]) -> tuple[list[tuple[str, Example]], list[str], dict[str, float]]:
    """Repurchase negatives: pendings whose deadline the watermark passed with no purchase.

    `due` are the pendings of users due in the deadline index; users in `replaced` got a new
    pending in this batch (their purchase resolved the old one). Returns (negative examples, users whose
    pending to delete, deadlines to put back because the pending there is newer than the due entry); each
    negative comes with its user.
    """
    horizon_s = horizon_days * 86400.0
    negatives, cleared, requeue = [], [], {}
    for user, pending in due.items():
        if user in replaced:
            continue
        deadline = pending.ts_s + horizon_s
        if deadline < watermark_s:
            negatives.append((user, pending.with_label(0, watermark_s)))  # known to be negative once the watermark passed
            cleared.append(user)
        else:
            requeue[user] = deadline
    return negatives, cleared, requeue


def make_predictions(fresh: list[tuple[InputRecord, PurchaseEvent]], probabilities: np.ndarray, meta: ModelMeta,
                     model_version: str, predicted_at: datetime) -> tuple[list[bytes], list[EventClaim]]:
    """The prediction message (JSON) of each fresh event, from the model's class probabilities (rows
    aligned with `fresh`), and the claim that lets a replay of its record write the same message again.
    Probabilities are made finite and clipped to [0, 1] first, as the schema asks."""
    write = PredictionWriter(task=meta.task, model_version=model_version, classes=meta.classes,
                             predicted_at=predicted_at)
    at = iso_datetime(predicted_at)
    rows = np.clip(np.nan_to_num(probabilities, nan=0.0), 0.0, 1.0)
    bodies, claims = [], []
    if meta.task == "repurchase":
        for (record, event), (p0, p1) in zip(fresh, rows.tolist()):
            label = int(p1 > p0)
            bodies.append(write(event.event_id, event.user_id, event.ts, label, p1))
            claims.append(EventClaim(record.ref, model_version, at, label, p1, None, None))
        return bodies, claims
    top_k = np.argsort(-rows, axis=1)[:, :TOP_CLASSES]
    top_p = np.take_along_axis(rows, top_k, axis=1)  # only these become Python floats, not whole rows
    for (record, event), order, ranked in zip(fresh, top_k.tolist(), top_p.tolist()):
        bodies.append(write(event.event_id, event.user_id, event.ts, order[0], ranked[0], list(zip(order, ranked))))
        claims.append(EventClaim(record.ref, model_version, at, order[0], ranked[0], order, ranked))
    return bodies, claims


def replayed_prediction(claim: EventClaim, event: PurchaseEvent, meta: ModelMeta) -> bytes:
    """The prediction message of a replayed record, the same bytes as when it was first predicted (`event` is
    the record's event again). Class indices are read with this model's classes: every version fine-tuned
    from one source checkpoint has its classes."""
    write = PredictionWriter(task=meta.task, model_version=claim.model_version, classes=meta.classes,
                             predicted_at=datetime.fromisoformat(claim.predicted_at))
    ranked = (None if claim.ranked_classes is None
              else list(zip(claim.ranked_classes, claim.ranked_probabilities or (), strict=True)))
    return write(event.event_id, event.user_id, event.ts, claim.label, claim.score, ranked)


# A dead letter's Kafka key is the input record's key, cut to this: a key only places the record on a partition.
DLQ_KEY_MAX_BYTES = 1024
DETAIL_MAX_CHARS = 500
DLQ_MIN_BYTES = 4096  # the key, and the rest of a letter with an empty payload, fit in this


def dead_letter_message(record: InputRecord, rejection: Rejection, failed_at: datetime, topic: str,
                        max_bytes: int) -> Message:
    """The dead letter of `record` for `topic`, its key and value together at most `max_bytes` (the dead-letter
    topic's record size limit; at least DLQ_MIN_BYTES): a longer key or payload is cut, and the letter says so
    (`key_truncated`, `payload_truncated`; `payload_bytes` is the original size)."""
    key = record.key
    key_truncated = key is not None and len(key) > DLQ_KEY_MAX_BYTES
    if key_truncated:
        key = key[:DLQ_KEY_MAX_BYTES]
    payload, encoding = DeadLetter.encode_payload(record.value)
    letter = DeadLetter(
        payload=payload, payload_encoding=encoding, payload_bytes=len(record.value or b""), key_truncated=key_truncated,
        reason=rejection.reason, detail=rejection.detail[:DETAIL_MAX_CHARS], topic=record.topic,
        partition=record.partition, offset=record.offset, failed_at=failed_at,
    )
    value = letter.model_dump_json().encode()
    budget = max_bytes - len(key or b"")
    if len(value) > budget and payload:
        # A character takes 1 to 6 bytes of JSON (a control character is escaped as \u00XX): keep the share of
        # the payload that fits at the bytes per character of what is kept, one character less at least.
        cut = letter.model_copy(update={"payload": "", "payload_truncated": True})
        room = budget - len(cut.model_dump_json().encode())
        kept = len(payload)
        while len(value) > budget and kept > 0:
            used = len(value) - (budget - room)
            kept = max(0, min(kept - 1, int(kept * room / used)))
            value = cut.model_copy(update={"payload": payload[:kept]}).model_dump_json().encode()
    return topic, key, value


def next_offsets(records: list[InputRecord]) -> dict[tuple[str, int], int]:
    """Per (topic, partition): the offset after the last record of the batch, i.e. what to commit."""
    offsets: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        offsets[key] = max(offsets.get(key, 0), record.offset + 1)
    return offsets


def first_offsets(records: list[InputRecord]) -> dict[tuple[str, int], int]:
    """Per (topic, partition): the offset of the batch's first record, i.e. where to rewind to read it again."""
    offsets: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic, record.partition)
        offsets[key] = min(offsets.get(key, record.offset), record.offset)
    return offsets


def split_stale(valid: list[tuple[InputRecord, PurchaseEvent]], newest_s: dict[str, float], max_past_skew_s: float
                ) -> tuple[list[tuple[InputRecord, PurchaseEvent]], list[tuple[InputRecord, Rejection]]]:
    """The events at most `max_past_skew_s` behind the newest event time of their input partition, and the others
    as past_timestamp rejections. A partition's newest time is the later of `newest_s` (what earlier batches
    saw, by partition_ref; updated here) and this batch's newest there, so that one ancient event is refused in
    a first batch too. Judged against the stream, not the clock, so that a historical log can be replayed."""
    for partition, ts_s in newest_event_times(valid).items():
        if ts_s > newest_s.get(partition, float("-inf")):
            newest_s[partition] = ts_s
    kept, stale = [], []
    for record, event in valid:
        newest = newest_s[record.partition_ref]
        if newest - event.ts_s > max_past_skew_s:
            stale.append((record, Rejection(RejectReason.PAST_TIMESTAMP, f"ts: {event.ts.isoformat()} is "
                          f"{(newest - event.ts_s) / 86400:.1f} days behind the newest event of input partition "
                          f"{record.partition_ref}, more than the limit of {max_past_skew_s:g} s")))
        else:
            kept.append((record, event))
    return kept, stale


# How far before the first batch's median an event may be and still date the stream's history.
FIRST_BATCH_SPAN_S = 30 * 86400


def first_event_time(events: list[PurchaseEvent]) -> float:
    """The event time from which the first batch ever dates the stream's history (the `log_days_observed`
    feature): its oldest event, leaving out events more than FIRST_BATCH_SPAN_S before its median, so that one
    stale event among the others does not date it. Deterministic for a given stream, as pretraining's first
    event is: the same stream gives the same predictions however it is polled."""
    if not events:
        return 0.0
    times = [event.ts_s for event in events]
    floor = float(np.median(times)) - FIRST_BATCH_SPAN_S
    return min(ts_s for ts_s in times if ts_s >= floor)


def newest_event_times(fresh: list[tuple[InputRecord, PurchaseEvent]]) -> dict[str, float]:
    """Per input partition (as `partition_ref` names it): the newest event time among these events."""
    newest: dict[tuple[str, int], float] = {}
    for record, event in fresh:
        key, ts_s = (record.topic, record.partition), event.ts_s
        if ts_s > newest.get(key, float("-inf")):
            newest[key] = ts_s
    return {partition_ref(topic, partition): ts_s for (topic, partition), ts_s in newest.items()}
