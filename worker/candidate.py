"""One fine-tune round on a window of labelled examples, and the gate's decision on it.

Shared by the trainer (which adds Redis, the registry and Kafka around it) and by the adaptation
benchmark (which replays a stream offline), so both choose examples and judge candidates the same way:
- a round takes the newest examples of the current regime: those labelled since the change point the
  last drift alarm estimated (older ones taught the model the regime that ended); for repurchase, only
  those the watermark has left fully resolved;
- the examples are split in event-time order: the newest `holdout_share` is held out;
- the candidate is fine-tuned from the source weights on the rest, with recency weights;
- candidate, champion and the label prior are scored on the same holdout, and promotion.decide rules
  (for a binary task, with the candidate's and the champion's AUC: it must not rank worse); while a
  promoted version is champion, the source checkpoint is judged against it the same way, and wins the
  fleet back when it beats it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from worker.examples import Example, recency_weights
from worker.finetune import FineTuneConfig, fine_tune
from worker.model import ModelMeta, ServingModel
from worker.promotion import Decision, decide, example_losses, prior_probabilities
from worker.quality import scores
from worker.settings import TrainingSettings


@dataclass(frozen=True)
class Round:
    weights: list[np.ndarray]
    decision: Decision
    scores: dict[str, dict[str, float]]  # "candidate", "champion", "label_prior" (and "source") -> holdout measures
    trained_examples: int
    trained_ts_s: tuple[float, float]  # event-time range of the training part
    back_to_source: bool = False  # the source checkpoint beat the champion (and the candidate): serve it again


class Scorer:
    """Class probabilities of any weights of one architecture, by the forward pass that serves them
    (a private ServingModel), so the gate judges exactly what replicas would serve."""

    def __init__(self, model, meta: ModelMeta):
        self._serving = ServingModel.of_keras(model, meta)

    def __call__(self, weights: list[np.ndarray], features: np.ndarray) -> np.ndarray:
        self._serving.swap(weights, "scored")
        return self._serving.predict_many(features)


def regime_examples(examples: list[Example], regime_since_ts: float | None) -> list[Example]:
    """The examples whose labels became known from the start of the current regime on (all when no drift
    alarmed yet). By the label's time, not the prediction's: a prediction served just before the change
    is labelled by a purchase made under the new regime, and those are the first examples of it."""
    if regime_since_ts is None:
        return examples
    return [e for e in examples if e.resolved_ts_s >= regime_since_ts]


def labels_known_until(task: str, horizon_days: float | None, watermark_s: float | None) -> float | None:
    """The event time up to which every purchase's label is as known as it will be: the watermark, and for
    repurchase the watermark less the horizon (a negative resolves only at its deadline). None before any
    event time was seen. Windows age from it."""
    if watermark_s is None:
        return None
    return watermark_s - (horizon_days or 0.0) * 86400.0 if task == "repurchase" else watermark_s


def newest_trainable_ts(task: str, horizon_days: float | None, watermark_s: float | None) -> float:
    """The newest event time a round may train on. Repurchase labels resolve late for negatives (at the
    deadline) and early for positives, so the newest examples over-represent positives: only event time
    the watermark has left fully resolved (`labels_known_until`; nothing before any event time was seen).
    Other tasks' labels carry no such bias: no limit."""
    if task != "repurchase":
        return math.inf
    known_until = labels_known_until(task, horizon_days, watermark_s)
    return -math.inf if known_until is None else known_until


def resolved_period(examples: list[Example], task: str, horizon_days: float | None,
                    watermark_s: float | None) -> list[Example]:
    """The examples a round may train on (`newest_trainable_ts`)."""
    newest = newest_trainable_ts(task, horizon_days, watermark_s)
    return examples if newest == math.inf else [e for e in examples if e.ts_s <= newest]


def round_examples(examples: list[Example], regime_since_ts: float | None, task: str, horizon_days: float | None,
                   watermark_s: float | None, max_examples: int) -> list[Example]:
    """The examples a round takes, oldest first: of the current regime's (`regime_examples`), and for
    repurchase of those the watermark has fully resolved (`resolved_period`), the newest `max_examples`.
    The trainer and the bench both call this."""
    return resolved_period(regime_examples(examples, regime_since_ts), task, horizon_days, watermark_s)[-max_examples:]


def examples_before_next_round(used: int, training: TrainingSettings) -> int:
    """New examples to wait for before the next round: after a round skipped for want of examples (just
    after a drift, say), only the shortfall, so the first round on a new regime runs as soon as it can."""
    return training.min_examples - used if used < training.min_examples else training.every_examples


def fine_tune_round(source_model, champion_weights: list[np.ndarray] | None, examples: list[Example], task: str,
                    n_classes: int, training: TrainingSettings, scorer: Scorer, from_scratch: bool = False) -> Round:
    """Fine-tune on `examples` (oldest first) and decide on the candidate. Raises FineTuneError.

    `champion_weights` is None while the source checkpoint is champion. Otherwise the source is a contender
    too: when it passes the gate against the champion on the same holdout, and the candidate does not or
    scores worse than it, the round sends the fleet back to the source (`Round.back_to_source`). A promoted
    champion that the stream has left behind is so replaced at the next round, not kept until a fine-tune
    happens to beat it."""
    features = np.stack([e.features for e in examples])
    labels = np.array([e.label for e in examples], dtype=np.int64)
    ts_s = np.array([e.ts_s for e in examples])
    holdout = max(1, int(len(examples) * training.holdout_share))
    train, held = slice(0, len(examples) - holdout), slice(len(examples) - holdout, None)
    config = FineTuneConfig(strategy=training.strategy, epochs=training.epochs, patience=training.patience,
                            learning_rate=training.learning_rate,
                            l2sp_weight=training.l2sp_weight, from_scratch=from_scratch)
    weights = fine_tune(source_model, features[train], labels[train],
                        recency_weights(ts_s[train], training.recency_half_life_s), task, config)
    held_x, held_y = features[held], labels[held]
    source_weights = source_model.get_weights()
    probabilities = {"candidate": scorer(weights, held_x),
                     "champion": scorer(source_weights if champion_weights is None else champion_weights, held_x),
                     "label_prior": prior_probabilities(labels[train], n_classes, holdout)}
    if champion_weights is not None:
        probabilities["source"] = scorer(source_weights, held_x)
    measured = {name: _finite(scores(task, p, held_y)) for name, p in probabilities.items()}
    losses = {name: example_losses(p, held_y) for name, p in probabilities.items()}

    def gate(contender: str) -> Decision:
        aucs = measured[contender].get("auc"), measured["champion"].get("auc")  # binary tasks, both classes held out
        return decide(losses[contender], losses["champion"], losses["label_prior"], training.promotion_margin,
                      z=training.promotion_z, ranking=aucs if None not in aucs else None)

    decision, back_to_source = gate("candidate"), False
    if champion_weights is not None:
        source = gate("source")
        if source.promote and (not decision.promote or np.mean(losses["source"]) <= np.mean(losses["candidate"])):
            decision, back_to_source = Decision(False, f"back to the source checkpoint: its {source.reason}"), True
    return Round(weights, decision, measured, len(examples) - holdout, (float(ts_s[0]), float(ts_s[train.stop - 1])),
                 back_to_source)


def _finite(measures: dict[str, float]) -> dict[str, float]:
    """Drop measures that are undefined on this holdout (e.g. AUC with one class): JSON has no NaN."""
    return {k: float(v) for k, v in measures.items() if np.isfinite(v)}
