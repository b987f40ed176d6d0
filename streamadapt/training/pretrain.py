"""`streamadapt pretrain`: train the source checkpoint on an event file.

Features come from streamadapt.core.features and labels from streamadapt.core.labels, exactly as the worker computes
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

from streamadapt.core.event_time import utc_datetime
from streamadapt.core.features import (
    OBSERVED_CAP_DAYS,
    USER_MEMORY_DAYS,
    CategoryFeatures,
    FeatureSpec,
)
from streamadapt.core.labels import BINARY_CLASSES, Task, file_labels, settled
from streamadapt.core.parsing import InputLimits, Rejection, parse_event
from streamadapt.core.plugin import BUILT_IN, Features, encode_stream, load_features
from streamadapt.core.promotion import example_losses
from streamadapt.core.quality import log_loss, scores
from streamadapt.model.builder import build, load_builder
from streamadapt.model.checkpoint import (
    FeaturesUsed,
    ModelMeta,
    build_model,
    class_probabilities,
    import_tensorflow,
    save_checkpoint,
)
from streamadapt.schemas import PurchaseEvent

log = logging.getLogger(__name__)

MAX_CATEGORIES = 64
MIN_CATEGORY_SHARE = 0.001
VALIDATION_SHARE = 0.1
MIN_EXAMPLES = 100  # valid events, and settled examples among them
MIN_VALIDATION_EXAMPLES = 200  # in the validation part ...
MIN_VALIDATION_PER_CLASS = 20  # ... and of each class, for a binary task
NEAR_PERFECT_LOG_LOSS = 0.01  # a validation log-loss below this is suspect, whatever the training loss
IMPLAUSIBLE_SHARE = 0.25  # a validation log-loss this share below the training one is suspect
RESTARTS = 4  # readings of the training part: from its start, and from 1/4, 2/4 and 3/4 of its time span
RESTART_WEIGHT = 0.25  # sample weight of a later reading's examples


@dataclass(frozen=True)
class Examples:
    features: np.ndarray  # (n, n_features) float32
    labels: np.ndarray  # (n,) int class indices
    ts_s: np.ndarray  # (n,) event time of the example's purchase


def read_events(path: Path, *, max_payload_bytes: int = 1 << 20) -> tuple[list[PurchaseEvent], int]:
    """Valid events of a JSONL file, by the worker's own parser; also how many lines it refused."""
    now = datetime.now(timezone.utc)
    limits = InputLimits(max_payload_bytes=max_payload_bytes, max_future_skew_s=3600)
    events, refused = [], 0
    with path.open("rb") as lines:
        for line in lines:
            line = line.strip()
            if not line:
                continue
            parsed = parse_event(line, now=now, limits=limits)
            if isinstance(parsed, Rejection):
                refused += 1
            else:
                events.append(parsed)
    return events, refused


def category_spec(events: list[PurchaseEvent], user_memory_days: float = USER_MEMORY_DAYS) -> FeatureSpec:
    """The categories worth a class of their own: frequent ones, most frequent first, and how often each
    class (OTHER for the rest) is bought, add-one smoothed; users idle for more than `user_memory_days` are
    forgotten. History watched for longer than the file spans counts as complete (FeatureSpec.observed_cap_days)."""
    counts = Counter(e.category for e in events)
    floor = MIN_CATEGORY_SHARE * len(events)
    categories = tuple(c for c, n in counts.most_common(MAX_CATEGORIES) if n >= floor)
    per_class = [counts[c] for c in categories] + [len(events) - sum(counts[c] for c in categories)]
    total = sum(per_class) + len(per_class)
    span_days = (max(e.ts_s for e in events) - min(e.ts_s for e in events)) / 86400.0 if events else 0.0
    return FeatureSpec(categories, tuple((n + 1) / total for n in per_class), user_memory_days,
                       observed_cap_days=max(1.0, min(OBSERVED_CAP_DAYS, span_days)))


def classes_for(task: Task, spec: FeatureSpec) -> tuple[str, ...]:
    return spec.vocabulary if task == "next_category" else BINARY_CLASSES


def build_examples(events: list[PurchaseEvent], spec: FeatureSpec, task: Task, horizon_days: float,
                   features: Features | None = None) -> Examples:
    """Labelled examples: each purchase, its features before it (by the `features` plug-in; default: the
    built-in one), and its label, for the purchases whose label the file settles (streamadapt.core.labels.settled,
    with the file's last event time as the watermark): for repurchase, not the last horizon of the file, where
    only the positives are known."""
    ordered = sorted(events, key=lambda e: e.ts)
    binary_index = {c: i for i, c in enumerate(BINARY_CLASSES)}
    class_of = spec.index_of if task == "next_category" else binary_index.__getitem__  # unknown categories: OTHER
    labels = np.array([class_of(label) if label is not None else -1
                       for label in file_labels(ordered, task, horizon_days)], dtype=np.int64)
    ts_s = np.array([e.ts_s for e in ordered])
    keep = (labels >= 0) & settled(ts_s, horizon_days if task == "repurchase" else None, ts_s[-1] if len(ts_s) else 0.0)
    encoded = encode_stream(ordered, features or CategoryFeatures(spec))
    return Examples(encoded[keep], labels[keep], ts_s[keep])


def restarted(ordered: list[PurchaseEvent], examples: Examples, split: int, spec: FeatureSpec, task: Task,
              horizon_days: float, features: Features | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training part (the first `split` examples) and its readings from later starts, stacked, with each
    row's sample weight: 1 for the first reading, RESTART_WEIGHT for the later ones. They show the model what a
    worker started there sees while its states warm up; at full weight they would outnumber the long histories
    of the first reading, and a model fed mostly short histories learns to trust a user's history less than a
    long one deserves."""
    end_s = examples.ts_s[split - 1]
    rows, labels, weights = [examples.features[:split]], [examples.labels[:split]], [np.ones(split, np.float32)]
    for k in range(1, RESTARTS):
        start_s = ordered[0].ts_s + (end_s - ordered[0].ts_s) * k / RESTARTS
        again = build_examples([e for e in ordered if e.ts_s >= start_s], spec, task, horizon_days, features)
        keep = again.ts_s <= end_s
        rows.append(again.features[keep])
        labels.append(again.labels[keep])
        weights.append(np.full(int(keep.sum()), RESTART_WEIGHT, np.float32))
    return np.concatenate(rows), np.concatenate(labels), np.concatenate(weights)


@dataclass(frozen=True)
class Pretrained:
    meta: ModelMeta
    validation: dict[str, float]  # the task's measures on the held-out newest examples, and "examples"
    training_log_loss: float  # on the training part (read from the start), by the same model
    warnings: list[str]  # figures the user should not take at face value, one line each


def pretrain(events_path: Path, out: Path, *, task: Task, horizon_days: float, epochs: int = 12,
             seed: int = 0, user_memory_days: float = USER_MEMORY_DAYS, model_builder: str | None = None,
             features_plugin: str = BUILT_IN) -> Pretrained:
    """Train and save the source checkpoint: the built-in network, or the one `model_builder` ("MODULE:FUNCTION",
    streamadapt.model.builder) returns. Raises ValueError, in one line, when the file cannot give a model whose
    validation figures mean anything (too few settled examples, or a validation part too small or of a single
    class), or when the builder's model is not one the worker can serve. Features come from the plug-in
    `features_plugin` names (MODULE:NAME, streamadapt.core.plugin), which the checkpoint records."""
    tf = import_tensorflow()
    build_custom = load_builder(model_builder) if model_builder is not None else None
    plugin = load_features(features_plugin)

    events, refused = read_events(events_path)
    if len(events) < MIN_EXAMPLES:
        raise ValueError(f"{events_path} has {len(events)} valid events; pretraining needs at least {MIN_EXAMPLES}")
    spec = category_spec(events, user_memory_days)
    classes = classes_for(task, spec)
    ordered = sorted(events, key=lambda e: e.ts)
    features = plugin(spec)
    examples = build_examples(ordered, spec, task, horizon_days, features)
    if len(examples.labels) < MIN_EXAMPLES:
        raise ValueError(f"{events_path} settles the {task} label of {len(examples.labels)} purchases"
                         + (f" (those more than {horizon_days:g} days before its last event, "
                            f"{_iso(ordered[-1].ts_s)[:10]})" if task == "repurchase" else " (those followed by "
                            "another purchase of the same user)")
                         + f"; pretraining needs at least {MIN_EXAMPLES}: a longer file"
                         + (" or a shorter --horizon-days" if task == "repurchase" else ""))
    split = int(len(examples.labels) * (1 - VALIDATION_SHARE))
    val_x, val_y = examples.features[split:], examples.labels[split:]
    problem = validation_problem(val_y, len(classes))
    if problem:
        raise ValueError(f"{events_path}: {problem}; pretraining cannot measure the model it would write"
                         + (" (a longer file, or a shorter --horizon-days)" if task == "repurchase" else " (a longer file)"))
    train_x, train_y, train_w = restarted(ordered, examples, split, spec, task, horizon_days, features)
    log.info("pretraining %s on %d examples (%d of them read again from later starts; %d held out) from %d events, "
             "%d refused lines", task, len(train_y), len(train_y) - split, len(val_y), len(events), refused)

    tf.config.experimental.enable_op_determinism()
    binary = task == "repurchase"
    if build_custom is None:
        model = build_model(spec, train_x, task, len(classes), seed=seed, class_block_width=features.class_block_width)
    else:
        tf.keras.utils.set_random_seed(seed)
        model = build(build_custom, model_builder, n_features=features.n_features,
                      n_outputs=1 if binary else len(classes), task=task)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                  loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy")
    # Epochs are chosen on a random tenth of the training part, so that the validation part, the newest
    # examples, judges a model that never saw it in any way.
    fit_rows, stop_rows = _early_stopping_split(len(train_y), seed)
    target = train_y.astype("float32") if binary else train_y
    model.fit(train_x[fit_rows], target[fit_rows], sample_weight=train_w[fit_rows], batch_size=256, epochs=epochs,
              validation_data=(train_x[stop_rows], target[stop_rows], train_w[stop_rows]), shuffle=True, verbose=0,
              callbacks=[tf.keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)])

    def predict(x: np.ndarray) -> np.ndarray:
        return class_probabilities(model.predict(x, batch_size=4096, verbose=0), task)

    val_probabilities = predict(val_x)
    metrics = {k: v for k, v in scores(task, val_probabilities, val_y).items() if np.isfinite(v)}
    metrics["examples"] = float(len(val_y))
    training_loss = log_loss(predict(examples.features[:split]), examples.labels[:split])
    warnings = implausible_validation(training_loss, example_losses(val_probabilities, val_y))
    meta = save_checkpoint(model, out, task=task, classes=classes, feature_spec=spec,
                           features=FeaturesUsed.of(features_plugin, features),
                           horizon_days=horizon_days if binary else None,
                           extra={"trained_on": {"events_file": events_path.name, "events": len(events),
                                                 "examples": int(split), "refused_lines": refused,
                                                 "event_time_from": _iso(examples.ts_s[0]),
                                                 "event_time_to": _iso(examples.ts_s[split - 1])},
                                  "validation": metrics, "training_log_loss": training_loss, "seed": seed,
                                  "model_builder": model_builder or "built-in"})
    return Pretrained(meta, metrics, training_loss, warnings)


def validation_problem(labels: np.ndarray, n_classes: int) -> str | None:
    """Why a validation part of these labels cannot measure a model, in a few words; None when it can. It
    needs MIN_VALIDATION_EXAMPLES examples and, for a binary task, MIN_VALIDATION_PER_CLASS of each class:
    with fewer, one lucky guess moves the figures more than any real difference between two models."""
    counts = np.bincount(labels, minlength=n_classes)
    if len(labels) < MIN_VALIDATION_EXAMPLES:
        return f"its validation part (the newest tenth of the settled examples) has {len(labels)} examples, under {MIN_VALIDATION_EXAMPLES}"
    if np.count_nonzero(counts) < 2:
        return "every example of its validation part (the newest tenth of the settled examples) has one label"
    if n_classes == 2 and counts.min() < MIN_VALIDATION_PER_CLASS:
        return (f"its validation part (the newest tenth of the settled examples) has {counts[0]} negatives and "
                f"{counts[1]} positives; it needs {MIN_VALIDATION_PER_CLASS} of each")
    return None


def implausible_validation(training_log_loss: float, validation_losses: np.ndarray) -> list[str]:
    """Warnings when the validation part is predicted better than a model can be expected to predict data it
    never saw: markedly better than its own training data (by more than IMPLAUSIBLE_SHARE of the training
    log-loss, and more than four standard errors), or almost perfectly. Such figures come from a validation
    part that differs from the training part (labels that leak, a stretch of time where the answer is
    obvious), not from a good model."""
    mean = float(np.mean(validation_losses))
    standard_error = float(np.std(validation_losses) / np.sqrt(len(validation_losses)))
    warnings = []
    if mean < NEAR_PERFECT_LOG_LOSS:
        warnings.append(f"validation log-loss {mean:.4f} is near perfect: real purchases are not that predictable; "
                        "check the labels of the file's newest part before trusting this checkpoint")
    elif training_log_loss - mean > max(IMPLAUSIBLE_SHARE * training_log_loss, 4 * standard_error):
        warnings.append(f"validation log-loss {mean:.4f} is far better than on the training part ({training_log_loss:.4f}): "
                        "the newest part of the file is unlike the rest; the validation figures say little about "
                        "the stream ahead")
    return warnings


def _early_stopping_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, n // 10)
    return np.sort(order[held:]), np.sort(order[:held])


def _iso(ts_s: float) -> str:
    return utc_datetime(ts_s).isoformat()
