"""One fine-tune round on a window of labelled examples, and the gate's decision on it.

Shared by the trainer (which adds Redis, the registry and Kafka around it) and by the adaptation
benchmark (which replays a stream offline), so both choose examples and judge candidates the same way:
- a round takes the newest examples of the current regime: those labelled since the change point the
  last drift alarm estimated (older ones taught the model the regime that ended); for repurchase, only
  those the watermark has left fully resolved;
- the examples are split in time order (repurchase: of the purchase; next_category: of the label, see
  `_label_time`): the newest `holdout_share` is held out;
- the candidate is fine-tuned from the source weights on the rest, with recency weights, and (by default)
  calibrated on them; by default the champion's own network, recalibrated on them, is a second candidate;
- candidate, champion and the label prior are scored on the same holdout, and promotion.decide rules
  (for a binary task, with the candidate's and the champion's scores: it must not rank significantly
  worse); while a promoted version is champion, the source checkpoint is judged against it the same way,
  and wins the fleet back when it beats it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streamadapt.core import calibration
from streamadapt.core.calibration import CalibrationError, exposed_losses
from streamadapt.core.censoring import MIN_POSITIVES, exposure, repurchase_delays
from streamadapt.core.examples import Example, labels_known_until, recency_weights
from streamadapt.core.labels import settled
from streamadapt.core.promotion import (
    Decision,
    Ranking,
    decide,
    example_losses,
    paired_gain,
    prior_probabilities,
)
from streamadapt.core.quality import scores
from streamadapt.model.checkpoint import ModelMeta, Parameters, ServingModel
from streamadapt.settings import TrainingSettings
from streamadapt.training.finetune import FineTuneConfig, FineTuneError, fine_tune


@dataclass(frozen=True)
class Round:
    parameters: Parameters  # the chosen candidate: its weights and calibration
    decision: Decision
    scores: dict[str, dict[str, float]]  # "candidate" (the chosen one), each candidate by name, "champion",
    # "label_prior" (and "source") -> holdout measures
    trained_examples: int  # settled examples the weights learnt from
    trained_ts_s: tuple[float, float]  # their event-time range
    back_to_source: bool = False  # the source checkpoint beat the champion (and the candidates): serve it again
    contender: str = "fine-tuned"  # which candidate `parameters` is: "fine-tuned" or "recalibrated"
    unsettled_examples: int = 0  # of the round's, purchases whose horizon was still running (repurchase)


class Scorer:
    """Class probabilities of any parameters of one architecture, by the forward pass that serves them
    (a private ServingModel), so the gate judges exactly what replicas would serve."""

    def __init__(self, model, meta: ModelMeta):
        self._serving = ServingModel.of_keras(model, meta)

    def __call__(self, parameters: Parameters, features: np.ndarray) -> np.ndarray:
        self._serving.swap(parameters, "scored")
        return self._serving.predict_many(features)

    def uncalibrated(self, weights: list[np.ndarray], features: np.ndarray) -> np.ndarray:
        self._serving.swap(Parameters(weights), "scored")
        return self._serving.predict_uncalibrated(features)


def regime_examples(examples: list[Example], regime_since_ts: float | None, task: str) -> list[Example]:
    """The examples of the current regime (all when no drift alarmed yet).

    next_category: those whose labels became known from the start of the regime on. By the label's time,
    not the prediction's: a prediction served just before the change is labelled by a purchase made under
    the new regime, and those are the first examples of it.
    repurchase: those of purchases made from the start of the regime on, whose whole horizon lies in it. A
    label's time says what the label is here (a positive is known at the next purchase, a negative only at
    the deadline), so choosing by it would choose negatives."""
    if regime_since_ts is None:
        return examples
    if task == "repurchase":
        return [e for e in examples if e.ts_s >= regime_since_ts]
    return [e for e in examples if e.resolved_ts_s >= regime_since_ts]


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
    """The examples a round may train and judge on: those whose label is settled (streamadapt.core.labels.settled)."""
    if task != "repurchase":
        return examples
    if watermark_s is None:
        return []
    return [e for e in examples if settled(e.ts_s, horizon_days or 0.0, watermark_s)]


def round_examples(examples: list[Example], regime_since_ts: float | None, task: str, horizon_days: float | None,
                   watermark_s: float | None, max_examples: int, min_examples: int = 0) -> list[Example]:
    """The examples a round takes, oldest first: of the current regime's (`regime_examples`), and for
    repurchase of those the watermark has fully resolved (`resolved_period`), the newest `max_examples`.
    The trainer and the bench both call this.

    A repurchase regime settles its first labels a whole horizon after the change began, so until it holds
    `min_examples` settled ones the round takes the settled examples of before it: a round that an alarm
    starts then still runs, and its calibration follows the new base rate from the unsettled purchases of the
    last horizon (fine_tune_round's `recent`), instead of every round being skipped for a horizon."""
    resolved = resolved_period(examples, task, horizon_days, watermark_s)
    regime = regime_examples(resolved, regime_since_ts, task)
    if task == "repurchase" and len(regime) < min_examples:
        regime = resolved
    return regime[-max_examples:]


def examples_before_next_round(used: int, training: TrainingSettings) -> int:
    """New examples to wait for before the next round: after a round skipped for want of examples (just
    after a drift, say), only the shortfall, so the first round on a new regime runs as soon as it can."""
    return training.min_examples - used if used < training.min_examples else training.every_examples


def by_label_time(examples: list[Example]) -> list[Example]:
    """next_category examples in the order a round splits and weights them: by when their labels became known.

    The newest purchases whose next purchase is known already are those of customers who came back soon, and
    what a customer buys depends on how soon they come back (a top-up trip is not a weekly shop). Held out by
    purchase time, the gate would judge candidates on quick returners alone, and promote what suits them. The
    examples whose labels became known most recently have the mix of return times the stream has."""
    return sorted(examples, key=_label_time)


def _label_time(example: Example) -> float:
    return example.resolved_ts_s if example.resolved_ts_s is not None else example.ts_s


def fine_tune_round(source_model, champion: Parameters | None, examples: list[Example], task: str,
                    n_classes: int, training: TrainingSettings, scorer: Scorer, from_scratch: bool = False,
                    recent: list[Example] = (), watermark_s: float | None = None,
                    horizon_days: float | None = None) -> Round:
    """Fine-tune on `examples` (settled) and decide on the candidates. Raises FineTuneError.

    The candidates, each judged by the gate against the champion on the same holdout, the better one taken:
    - "fine-tuned": the strategy's weights, and with `training.recalibrate` (always for the `calibrate`
      strategy) a calibration fitted to them on the training part with recency weights;
    - "recalibrated" (with `training.recalibrate`): the champion's own network, its calibration fitted anew on
      the training part. When only the base rate moved, this wins without touching how the champion ranks:
      when both pass, the fine-tuned one is taken only if it beats the recalibrated one by the gate's margin too.
    `recent` (repurchase): purchases whose horizon is still running at `watermark_s`, labelled 1 when the
    repurchase came already, else 0 ("not yet"). Weights never learn from them; calibrations and the gate count
    each for what is known of it (streamadapt.core.censoring), so a round sees the base rate of the last horizon too,
    and its holdout is the newest purchases, settled or not.
    `champion` is None while the source checkpoint is champion. Otherwise the source is a contender too: when
    it passes the gate against the champion, and no candidate does or scores better than it, the round sends
    the fleet back to the source (`Round.back_to_source`). A promoted champion that the stream has left behind
    is so replaced at the next round, not kept until a fine-tune happens to beat it."""
    settled_count = len(examples)
    recent = known_at(recent, watermark_s)
    exposed = _exposure(examples, recent, watermark_s, horizon_days)
    if exposed is not None:
        examples = sorted([*examples, *recent], key=lambda e: e.ts_s)
    elif task != "repurchase":
        examples = by_label_time(examples)
    features = np.stack([e.features for e in examples])
    labels = np.array([max(e.label, 0) for e in examples], dtype=np.int64)
    purchase_ts_s = np.array([e.ts_s for e in examples])
    ts_s = purchase_ts_s if task == "repurchase" else np.array([_label_time(e) for e in examples])
    exposures = (np.ones(len(examples)) if exposed is None
                 else np.array([exposed.get(e.event_id, 1.0) for e in examples]))
    settled_rows = exposures >= 1.0
    holdout = max(1, int(len(examples) * training.holdout_share))
    train, held = np.arange(len(examples) - holdout), np.arange(len(examples) - holdout, len(examples))
    trainable = train[settled_rows[train]]
    if len(trainable) == 0:
        raise FineTuneError("no settled examples to train on")
    config = FineTuneConfig(strategy=training.strategy, epochs=training.epochs, patience=training.patience,
                            learning_rate=training.learning_rate,
                            l2sp_weight=training.l2sp_weight, from_scratch=from_scratch)
    sample_weights = recency_weights(ts_s[train], training.recency_half_life_s)

    def calibrated(weights: list[np.ndarray]) -> Parameters:
        try:
            return Parameters(weights, calibration.fit(scorer.uncalibrated(weights, features[train]), labels[train],
                                                       sample_weights, None if exposed is None else exposures[train]))
        except CalibrationError as error:
            raise FineTuneError(str(error)) from error

    source = Parameters(source_model.get_weights())
    serving = source if champion is None else champion
    weights = fine_tune(source_model, features[trainable], labels[trainable],
                        recency_weights(ts_s[trainable], training.recency_half_life_s), task, config)
    candidates = {"fine-tuned": calibrated(weights) if training.recalibrate or training.strategy == "calibrate"
                  else Parameters(weights)}
    if training.recalibrate and not from_scratch:
        candidates["recalibrated"] = calibrated(serving.weights)
    held_x, held_y, held_exposure = features[held], labels[held], exposures[held]
    probabilities = {name: scorer(parameters, held_x) for name, parameters in candidates.items()}
    probabilities["champion"] = scorer(serving, held_x)
    probabilities["label_prior"] = _prior(labels[train], exposures[train], n_classes, holdout)
    if champion is not None:
        probabilities["source"] = scorer(source, held_x)
    held_settled = settled_rows[held]
    measured = {name: _measures(task, p, held_y, held_exposure, held_settled) for name, p in probabilities.items()}
    losses = {name: (example_losses(p, held_y) if exposed is None else exposed_losses(p, held_y, held_exposure))
              for name, p in probabilities.items()}

    def gate(contender: str) -> Decision:
        ranking = (Ranking(probabilities[contender][held_settled, 1], probabilities["champion"][held_settled, 1],
                           held_y[held_settled]) if task == "repurchase" else None)
        # a recalibrated network is one already trusted: only a network learnt anew must beat the label prior
        prior = None if contender == "recalibrated" else losses["label_prior"]
        return decide(losses[contender], losses["champion"], prior, training.promotion_z,
                      training.promotion_min_gain, ranking, training.promotion_ranking_z)

    decisions = {name: gate(name) for name in candidates}
    passed = [name for name, decision in decisions.items() if decision.promote]
    chosen = passed[0] if passed else "fine-tuned"
    if len(passed) == 2:  # the fine-tuned candidate changes how the model ranks: it must beat the recalibrated one
        gain, standard_error = paired_gain(losses["fine-tuned"], losses["recalibrated"])
        chosen = "fine-tuned" if gain > training.promotion_z * standard_error else "recalibrated"
    decision = Decision(decisions[chosen].promote, "; ".join(f"{name}: {decisions[name].reason}"
                                                             for name in sorted(decisions, key=lambda n: n != chosen)))
    back_to_source = False
    if champion is not None:
        source_decision = gate("source")
        if source_decision.promote and (not passed or np.mean(losses["source"]) <= np.mean(losses[chosen])):
            decision = Decision(False, f"back to the source checkpoint: its {source_decision.reason}")
            back_to_source = True
    measured["candidate"] = measured[chosen]  # what a model version reports as "candidate"
    return Round(candidates[chosen], decision, measured, int(len(trainable)),
                 (float(purchase_ts_s[trainable].min()), float(purchase_ts_s[trainable].max())), back_to_source, chosen,
                 len(examples) - settled_count)


def known_at(recent: list[Example], watermark_s: float | None) -> list[Example]:
    """The unsettled purchases as the stream stood at `watermark_s`: those made by then, with a repurchase that
    came after it still pending. Serving runs ahead of the watermark (its slowest partition, or where the labels
    of every partition are settled), and each purchase's exposure is reckoned at the watermark: a purchase made
    after it, or a label seen as known before it was, would count as evidence from beyond it."""
    if watermark_s is None:
        return []
    return [e if e.label < 0 or (e.resolved_ts_s is not None and e.resolved_ts_s <= watermark_s)
            else e._replace(label=-1, resolved_ts_s=None)
            for e in recent if e.ts_s <= watermark_s]


def _exposure(settled: list[Example], recent: list[Example], watermark_s: float | None,
              horizon_days: float | None) -> dict[str, float] | None:
    """event_id -> exposure of each recent example (streamadapt.core.censoring); None when there is nothing to expose or
    too few settled positives to tell how repurchases spread over the horizon."""
    if not recent or watermark_s is None or not horizon_days:
        return None
    delays = repurchase_delays(np.array([e.ts_s for e in settled]),
                               np.array([e.resolved_ts_s or e.ts_s for e in settled]),
                               np.array([e.label for e in settled]))
    if len(delays) < MIN_POSITIVES:
        return None
    values = exposure(np.array([e.ts_s for e in recent]), delays, watermark_s, horizon_days)
    return {e.event_id: float(v) for e, v in zip(recent, values)}


def _prior(labels: np.ndarray, exposures: np.ndarray, n_classes: int, rows: int) -> np.ndarray:
    """The label-prior baseline: the training labels' class frequencies; for a binary task with unsettled labels,
    the constant rate that best explains what was seen of them."""
    if np.all(exposures >= 1.0) or n_classes != 2:
        return prior_probabilities(labels, n_classes, rows)
    constant = np.tile([0.5, 0.5], (len(labels), 1))
    fitted = calibration.fit(constant, labels, exposure=exposures)  # a bias alone moves a constant
    return np.tile(calibration.apply(constant[:1].astype(np.float32), fitted)[0], (rows, 1))


def _measures(task: str, probabilities: np.ndarray, labels: np.ndarray, exposures: np.ndarray,
              settled: np.ndarray) -> dict[str, float]:
    """The holdout's measures: the log-loss of what is known of every label (the gate's figure), the others
    over the settled labels."""
    measured = _finite(scores(task, probabilities[settled], labels[settled])) if settled.any() else {}
    if not settled.all():
        measured["log_loss"] = float(np.mean(exposed_losses(probabilities, labels, exposures)))
    return measured


def _finite(measures: dict[str, float]) -> dict[str, float]:
    """Drop measures that are undefined on this holdout (e.g. AUC with one class): JSON has no NaN."""
    return {k: float(v) for k, v in measures.items() if np.isfinite(v)}
