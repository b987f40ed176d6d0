"""Offline scoring of served predictions against labels from the event file, by the worker's label rules.

Used by the adaptation tests and benchmarks: it needs only the predictions topic and the event file, so
static and adapted runs are judged the same way, from outside the worker.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from streamadapt.core.labels import Task, file_labels
from streamadapt.core.quality import scores
from streamadapt.schemas import Prediction, PurchaseEvent


def stream_labels(events: Iterable[PurchaseEvent], task: Task, horizon_days: float = 7.0) -> dict[str, str]:
    """event_id -> label (category name, or "0"/"1"), for events whose label resolves within the file."""
    ordered = sorted(events, key=lambda e: e.ts)
    return {e.event_id: label for e, label in zip(ordered, file_labels(ordered, task, horizon_days)) if label is not None}


def score_predictions(predictions: Iterable[Prediction], labels: dict[str, str], task: Task) -> dict[str, float]:
    """Quality of predictions whose label is known: binary log-loss, Brier, AUC, accuracy; multiclass accuracy
    (and log-loss where the true class is among the published top classes, else it counts as missing)."""
    chosen = [p for p in predictions if p.event_id in labels]
    if not chosen:
        return {"examples": 0.0}
    if task == "repurchase":
        p1 = np.array([p.score for p in chosen])
        y = np.array([int(labels[p.event_id]) for p in chosen])
        result = scores(task, np.stack([1 - p1, p1], axis=1), y)
    else:
        result = {"accuracy": float(np.mean([p.label == labels[p.event_id] for p in chosen]))}
    result["examples"] = float(len(chosen))
    return result
