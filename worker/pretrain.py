"""`streamadapt pretrain`: train the source checkpoint on an event file.

Features come from worker.features and labels from worker.labels, exactly as the worker computes
them on the stream. The split is by event time: the newest 10 % of examples is the validation set.

A worker starts with no user state, so for a while every returning customer looks new to it. The
features say how long the states have been kept (`log_days_observed`), and pretraining shows the model
what that means: besides the file read from its start, it reads the file's training part again from
`RESTARTS - 1` later points with no state, as a worker started there would have seen it.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from schemas import PurchaseEvent
from worker.features import USER_MEMORY_DAYS, FeatureSpec, encode_stream
from worker.labels import BINARY_CLASSES, Task, file_labels
from worker.model import ModelMeta, build_model, class_probabilities, save_checkpoint
from worker.parsing import Rejection, parse_event
from worker.quality import scores

log = logging.getLogger(__name__)

MAX_CATEGORIES = 64
MIN_CATEGORY_SHARE = 0.001
VALIDATION_SHARE = 0.1
MIN_EXAMPLES = 100  # valid events, and labelled examples among them
RESTARTS = 4  # readings of the training part: from its start, and from 1/4, 2/4 and 3/4 of its time span


@dataclass(frozen=True)
class Examples:
    features: np.ndarray  # (n, n_features) float32
    labels: np.ndarray  # (n,) int class indices
    ts_s: np.ndarray  # (n,) event time of the example's purchase


def read_events(path: Path, *, max_payload_bytes: int = 1 << 20) -> tuple[list[PurchaseEvent], int]:
    """Valid events of a JSONL file, by the worker's own parser; also how many lines it refused."""
    now = datetime.now(timezone.utc)
    events, refused = [], 0
    with path.open("rb") as lines:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            parsed = parse_event(line, now=now, max_payload_bytes=max_payload_bytes, max_future_skew_s=3600)
            if isinstance(parsed, Rejection):
                refused += 1
            else:
                events.append(parsed)
    return events, refused


def category_spec(events: list[PurchaseEvent], user_memory_days: float = USER_MEMORY_DAYS) -> FeatureSpec:
    """The categories worth a class of their own: frequent ones, most frequent first; users idle for more
    than `user_memory_days` are forgotten."""
    counts = Counter(e.category for e in events)
    floor = MIN_CATEGORY_SHARE * len(events)
    return FeatureSpec(tuple(c for c, n in counts.most_common(MAX_CATEGORIES) if n >= floor), user_memory_days)


def classes_for(task: Task, spec: FeatureSpec) -> tuple[str, ...]:
    return spec.vocabulary if task == "next_category" else BINARY_CLASSES


def build_examples(events: list[PurchaseEvent], spec: FeatureSpec, task: Task, horizon_days: float) -> Examples:
    """Labelled examples: each purchase, its features before it, and its label once resolved in the file."""
    ordered = sorted(events, key=lambda e: e.ts)
    binary_index = {c: i for i, c in enumerate(BINARY_CLASSES)}
    class_of = spec.index_of if task == "next_category" else binary_index.__getitem__  # unknown categories: OTHER
    labels = np.array([class_of(label) if label is not None else -1
                       for label in file_labels(ordered, task, horizon_days)], dtype=np.int64)
    keep = labels >= 0
    ts_s = np.array([e.ts_s for e in ordered])
    return Examples(encode_stream(ordered, spec)[keep], labels[keep], ts_s[keep])


def restarted(ordered: list[PurchaseEvent], examples: Examples, split: int, spec: FeatureSpec, task: Task,
              horizon_days: float) -> tuple[np.ndarray, np.ndarray]:
    """The training part (the first `split` examples) and its readings from later starts, stacked."""
    end_s = examples.ts_s[split - 1]
    features, labels = [examples.features[:split]], [examples.labels[:split]]
    for k in range(1, RESTARTS):
        start_s = ordered[0].ts_s + (end_s - ordered[0].ts_s) * k / RESTARTS
        again = build_examples([e for e in ordered if e.ts_s >= start_s], spec, task, horizon_days)
        keep = again.ts_s <= end_s
        features.append(again.features[keep])
        labels.append(again.labels[keep])
    return np.concatenate(features), np.concatenate(labels)


def pretrain(events_path: Path, out: Path, *, task: Task, horizon_days: float, epochs: int = 12,
             seed: int = 0, user_memory_days: float = USER_MEMORY_DAYS) -> tuple[ModelMeta, dict[str, float]]:
    """Train and save the source checkpoint; returns its metadata and validation metrics."""
    import tensorflow as tf

    events, refused = read_events(events_path)
    if len(events) < MIN_EXAMPLES:
        raise ValueError(f"{events_path} has {len(events)} valid events; pretraining needs at least {MIN_EXAMPLES}")
    spec = category_spec(events, user_memory_days)
    classes = classes_for(task, spec)
    ordered = sorted(events, key=lambda e: e.ts)
    examples = build_examples(ordered, spec, task, horizon_days)
    if len(examples.labels) < MIN_EXAMPLES:
        raise ValueError(f"{events_path} gives {len(examples.labels)} labelled examples for {task} (purchases whose "
                         f"label the file settles); pretraining needs at least {MIN_EXAMPLES}")
    split = int(len(examples.labels) * (1 - VALIDATION_SHARE))
    train_x, train_y = restarted(ordered, examples, split, spec, task, horizon_days)
    val_x, val_y = examples.features[split:], examples.labels[split:]
    log.info("pretraining %s on %d examples (%d of them read again from later starts; %d held out) from %d events, "
             "%d refused lines", task, len(train_y), len(train_y) - split, len(val_y), len(events), refused)

    tf.config.experimental.enable_op_determinism()
    model = build_model(train_x.mean(axis=0), train_x.var(axis=0), task, len(classes), seed=seed)
    binary = task == "repurchase"
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy")
    model.fit(train_x, train_y.astype("float32") if binary else train_y, batch_size=256, epochs=epochs,
              validation_data=(val_x, val_y.astype("float32") if binary else val_y), shuffle=True, verbose=0,
              callbacks=[tf.keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)])
    probabilities = class_probabilities(model.predict(val_x, batch_size=4096, verbose=0), task)
    metrics = {k: v for k, v in scores(task, probabilities, val_y).items() if np.isfinite(v)}
    metrics["examples"] = float(len(val_y))
    meta = save_checkpoint(model, out, task=task, classes=classes, feature_spec=spec,
                           horizon_days=horizon_days if binary else None,
                           extra={"trained_on": {"events_file": events_path.name, "events": len(events),
                                                 "examples": int(split), "refused_lines": refused,
                                                 "event_time_from": _iso(examples.ts_s[0]),
                                                 "event_time_to": _iso(examples.ts_s[split - 1])},
                                  "validation": metrics, "seed": seed})
    return meta, metrics


def _iso(ts_s: float) -> str:
    return datetime.fromtimestamp(float(ts_s), tz=timezone.utc).isoformat()
