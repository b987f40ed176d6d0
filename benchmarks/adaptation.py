"""`python -m benchmarks adaptation`: prequential quality of adapted serving on a stream, against static serving,
scratch, River's online learners, naive frequency baselines and an oracle, for the source checkpoint's task.

Offline and deterministic: the stream is replayed in event-time order through the worker's own feature
code, label rule and fine-tune rounds (streamadapt.training.candidate, as the trainer runs them). Every contender predicts
each event before its label exists, and learns a label only when the stream reveals it, as in the worker:
next_category, at the user's next purchase; repurchase, at the next purchase when it comes within the
horizon, else when the watermark (event time less the allowed lateness) passes the deadline or a later
purchase comes, whichever is first. Quality is accuracy for next_category and AUC for repurchase, with
log-loss for both, on the events whose label the stream settles (streamadapt.core.labels.settled).

The stream is split at one event (`split_at`): on a real log, where the source checkpoint's part of it ends
(`--source-until`); on a generated one, where its regime drifts. Spans: before the split, the first
AFTER_SPLIT_LABELS labels after it, the rest, and everything after it.

Contenders:
- static: the source model, unchanged;
- adapted-<strategy>: the trainer's loop: every `every_examples` new labels (or a drift alarm), a round on
  the examples its windows still hold, promoted only through the gate, and back to the source when the
  source beats the champion;
- scratch: the same loop and gate, each round from random weights (no transfer);
- per-user frequency and global frequency: next_category, each user's own category frequencies so far
  smoothed toward everybody's, and everybody's alone; repurchase, each user's own share of purchases
  followed by another within the horizon smoothed toward the settled base rate so far, and that rate alone;
- River: adaptive random forest, Hoeffding adaptive tree, and softmax (next_category) or logistic
  (repurchase) regression, learning label by label (when River is installed: pip install 'streamadapt[bench]');
- oracle: models trained offline on the labelled events after the split, each event predicted by one that
  did not train on it (cross-fitted): the ceiling the others are measured against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.results import cell, goal_line, write_json
from streamadapt.core.examples import (
    Example,
    expired_windows,
    labels_known_until,
    window_start,
)
from streamadapt.core.features import FREQUENCY_PRIOR, OTHER, CategoryFeatures
from streamadapt.core.labels import (
    file_labels,
    next_of_same_user,
    repurchase_label,
    resolve_on_purchase,
    settled,
)
from streamadapt.core.plugin import encode_stream
from streamadapt.core.quality import QualityMonitor, auc, scores
from streamadapt.model.checkpoint import (
    ModelMeta,
    Parameters,
    ServingModel,
    load_checkpoint,
)
from streamadapt.schemas import PurchaseEvent
from streamadapt.settings import TrainingSettings
from streamadapt.training.candidate import (
    Round,
    Scorer,
    examples_before_next_round,
    fine_tune_round,
    round_examples,
)
from streamadapt.training.finetune import FineTuneConfig, FineTuneError, fine_tune

ROLLING_LABELS = 1000  # labelled events in the rolling quality of the plot
AFTER_SPLIT_LABELS = 5000  # the first span after the split; the oracle goal starts after it
MEASURE = {"next_category": "accuracy", "repurchase": "auc"}  # each task's quality measure; log-loss for both too
SPANS = ("before", "after", "after_first_5k", "after_later")
_MEASURE_NAME = {"accuracy": "accuracy", "auc": "AUC"}
UNKNOWN_LABELS_WARNING_SHARE = 0.2  # above this share of labels outside the checkpoint's categories, say so
CURVE_SIZES = (250, 500, 1000, 2000)
ORACLE_FOLDS = 5
MIN_LABELS_AFTER_SPLIT = 100  # the oracle trains on them in ORACLE_FOLDS folds; fewer cannot judge anything
ORACLE_MAX_EPOCHS = 60  # early stopping ends it sooner
FREQUENCY_SMOOTHING = {"next_category": FREQUENCY_PRIOR, "repurchase": 2.0}  # purchases' worth of everybody's rates
TIE = 0.005  # adapted "is at least static" on accuracy or AUC within this


@dataclass
class Stream:
    """A stream turned into what every contender sees: features before each event, its label's class
    index (-1 if never revealed) and the index of the event at which the label is revealed (-1 if none).

    `scored` marks the events every contender is judged on: those whose label the stream settles either way.
    A repurchase label of the stream's last horizon is revealed only when it is positive (the negatives'
    deadlines fall after the end), so scoring those would judge on positives alone."""

    task: str
    horizon_days: float | None
    events: list[PurchaseEvent]
    features: np.ndarray
    labels: np.ndarray
    revealed_at: np.ndarray
    split_at: int
    scored: np.ndarray
    purchase_classes: np.ndarray  # the class of each event's own category (OTHER for those the model does not know)

    @property
    def ts_s(self) -> np.ndarray:
        return np.array([e.ts_s for e in self.events])

    @property
    def measure(self) -> str:
        return MEASURE[self.task]


def build_stream(events: list[PurchaseEvent], meta: ModelMeta, split_at: int | None,
                 allowed_lateness_s: float = 3600.0) -> Stream:
    """The events in event-time order, labelled for the checkpoint's task as the worker labels them."""
    ordered = sorted(events, key=lambda e: e.ts_s)
    ts_s = np.array([e.ts_s for e in ordered])
    following = np.array(next_of_same_user([e.user_id for e in ordered]), dtype=np.int64)
    if meta.task == "next_category":
        labels = np.array([meta.feature_spec.index_of(label) if label is not None else -1
                           for label in file_labels(ordered, "next_category", 0.0)], dtype=np.int64)
        revealed_at = following
    else:
        labels, revealed_at = _repurchase_labels(ts_s, following, meta.horizon_days or 0.0, allowed_lateness_s)
    horizon = meta.horizon_days if meta.task == "repurchase" else None
    end_watermark = (ts_s[-1] - allowed_lateness_s) if len(ts_s) else 0.0
    scored = (labels >= 0) & settled(ts_s, horizon, end_watermark)
    purchase_classes = np.array([meta.feature_spec.index_of(e.category) for e in ordered], dtype=np.int64)
    return Stream(meta.task, horizon, ordered, encode_stream(ordered, CategoryFeatures(meta.feature_spec)), labels, revealed_at,
                  split_at if split_at is not None else len(ordered) // 2, scored, purchase_classes)


def _repurchase_labels(ts_s: np.ndarray, following: np.ndarray, horizon_days: float, allowed_lateness_s: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Each purchase's repurchase label (streamadapt.core.labels' rule) and the index of the event at which the worker
    learns it: the user's next purchase, or, if that is not within the horizon, the first event that takes
    the watermark past the deadline, whichever comes first (-1 where the stream ends before either)."""
    deadlines = ts_s + horizon_days * 86400.0
    watermark_passes = np.searchsorted(ts_s, deadlines + allowed_lateness_s, side="right")
    within = (following >= 0) & (ts_s[np.maximum(following, 0)] <= deadlines)
    revealed_at = np.where(within | ((following >= 0) & (following < watermark_passes)), following, watermark_passes)
    revealed_at = np.where(revealed_at < len(ts_s), revealed_at, -1)
    labels = [-1 if k < 0 else
              resolve_on_purchase("repurchase", ts_s[i], ts_s[k], 1, horizon_days) if k == following[i] else
              int(repurchase_label(ts_s[i], None, ts_s[k] - allowed_lateness_s, horizon_days) == "1")
              for i, k in enumerate(revealed_at.tolist())]
    return np.array(labels, dtype=np.int64), revealed_at


@dataclass
class Outcome:
    name: str
    probabilities: np.ndarray  # (n, C) what was served for each event
    promotions: list[int] = field(default_factory=list)  # event indices at which another version took over
    seconds: float = 0.0
    alarms: list[int] = field(default_factory=list)  # event indices of drift alarms
    alarm_rounds: list[str] = field(default_factory=list)  # what each round an alarm started came to


def run_static(name: str, model: ServingModel, stream: Stream) -> Outcome:
    started = time.perf_counter()
    return Outcome(name, model.predict_many(stream.features), seconds=time.perf_counter() - started)


def run_fine_tuned(name: str, source_model, meta, stream: Stream, training: TrainingSettings,
                   from_scratch: bool = False, progress=None) -> Outcome:
    """The trainer's loop, replayed: serve, collect revealed labels, and run a round when enough new
    labels came in or when the drift detector alarms on the served predictions' log-loss, on the examples
    the trainer would take (streamadapt.training.candidate: the current regime's; for repurchase, the settled ones; the
    `every_s` trigger has no meaning offline)."""
    started = time.perf_counter()
    serving = ServingModel.of_keras(source_model, meta)
    scorer = Scorer(source_model, meta)
    source = Parameters(source_model.get_weights())
    champion: Parameters | None = None  # the source serves
    window: list[Example] = []  # as the trainer's windows hold them: dropped by age at each round
    reveals = _reveals(stream)
    served = np.zeros((len(stream.events), len(meta.classes)), dtype=np.float32)
    monitor = QualityMonitor(meta.task, training.quality_window)
    promotions, since_round, alarmed, regime_since_ts, alarms, alarm_rounds = [], 0, False, None, [], []
    wanted = training.every_examples
    for i in range(len(stream.events)):
        for j in reveals.get(i, ()):
            window.append(Example(stream.events[j].event_id, stream.events[j].ts_s, "", stream.features[j],
                                  served[j], int(stream.labels[j]), stream.events[i].ts_s))
            since_round += 1
            change = monitor.observe(serving.version, served[j], int(stream.labels[j]), stream.events[i].ts_s)
            if training.on_drift and change is not None:
                alarmed, regime_since_ts = True, change
                alarms.append(i)
        if since_round >= wanted or alarmed:
            trigger = "a drift alarm" if alarmed else f"{since_round:,} new labels"
            since_round, alarmed = 0, False
            watermark_s = stream.events[i].ts_s - training.allowed_lateness_s
            window = _unexpired(window, labels_known_until(meta.task, meta.horizon_days, watermark_s), training)
            examples = round_examples(sorted(window, key=lambda e: e.ts_s), regime_since_ts, meta.task, meta.horizon_days,
                                      watermark_s, training.max_examples, training.min_examples)  # the trainer's order
            wanted = examples_before_next_round(len(examples), training)
            if len(examples) < training.min_examples:
                outcome = f"skipped ({len(examples):,} examples)"
            else:
                recent = _unsettled(stream, served, i, watermark_s, training.max_examples)
                round_ = _round(source_model, champion, examples, meta, training, scorer, from_scratch, recent,
                                watermark_s)
                took_over = round_ is not None and (round_.back_to_source or round_.decision.promote)
                if took_over:
                    champion = None if round_.back_to_source else round_.parameters
                    serving.swap(source if champion is None else champion, f"{name}-{len(promotions) + 1}")
                    promotions.append(i)
                outcome = ("failed" if round_ is None else "kept the champion" if not took_over else
                           "back to the source" if round_.back_to_source else f"promoted ({round_.contender})")
                if progress:
                    reason = f": {round_.decision.reason}" if round_ is not None else ""
                    progress(f"{name}: round at event {i:,}/{len(stream.events):,} after {trigger}, on "
                             f"{len(examples):,} examples, {outcome}{reason}")
            if trigger == "a drift alarm":
                alarm_rounds.append(outcome.split(":")[0])
        served[i] = serving.predict_many(stream.features[i:i + 1])[0]
    return Outcome(name, served, promotions, time.perf_counter() - started, alarms, alarm_rounds)


def _unexpired(window: list[Example], known_until_s: float, training: TrainingSettings) -> list[Example]:
    """The examples whose event-time window the trainer would not have dropped for age yet."""
    expired = set(expired_windows(sorted({window_start(e.ts_s, training.window_s) for e in window}), known_until_s,
                                  training.window_s, training.window_max_age_s))
    return [e for e in window if window_start(e.ts_s, training.window_s) not in expired] if expired else window


def _round(source_model, champion, examples, meta, training, scorer, from_scratch, recent, watermark_s
           ) -> Round | None:
    """One replayed round (None when the fine-tune failed, which changes nothing)."""
    try:
        return fine_tune_round(source_model, champion, examples, meta.task, len(meta.classes), training, scorer,
                               from_scratch=from_scratch, recent=recent, watermark_s=watermark_s,
                               horizon_days=meta.horizon_days)
    except FineTuneError:
        return None


def _unsettled(stream: Stream, served: np.ndarray, now: int, watermark_s: float, limit: int) -> list[Example]:
    """Repurchase: the newest `limit` purchases before event `now` whose horizon is still running at the
    watermark, as the trainer finds them: labelled 1 if the repurchase came already, else pending (-1)."""
    if stream.task != "repurchase" or not stream.horizon_days:
        return []
    ts_s = stream.ts_s
    first = max(int(np.searchsorted(ts_s, watermark_s - stream.horizon_days * 86400.0, side="left")), now - limit)
    recent = []
    for j in range(max(first, 0), now):
        k = int(stream.revealed_at[j])
        seen = 0 <= k <= now and stream.labels[j] == 1
        recent.append(Example(stream.events[j].event_id, float(ts_s[j]), "", stream.features[j], served[j],
                              1 if seen else -1, float(ts_s[k]) if seen else None))
    return recent


def run_frequency_baselines(stream: Stream, n_classes: int, allowed_lateness_s: float) -> list[Outcome]:
    """The naive contenders a model must beat (see the module's docstring): per-user frequency, global frequency."""
    started = time.perf_counter()
    n = len(stream.events)
    per_user, overall = np.zeros((n, n_classes)), np.zeros((n, n_classes))
    alpha = FREQUENCY_SMOOTHING[stream.task]
    if stream.task == "next_category":
        everybody = np.ones(n_classes)  # add-one: no class is impossible
        users: dict[str, np.ndarray] = {}
        for i, (event, k) in enumerate(zip(stream.events, stream.purchase_classes.tolist())):
            everybody[k] += 1.0
            own = users.setdefault(event.user_id, np.zeros(n_classes))
            own[k] += 1.0
            prior = everybody / everybody.sum()
            overall[i] = prior
            per_user[i] = (own + alpha * prior) / (own.sum() + alpha)
    else:
        horizon_s = (stream.horizon_days or 0.0) * 86400.0
        ts_s = stream.ts_s
        order = np.argsort(ts_s + horizon_s, kind="stable")  # purchases by deadline: settled in this order
        settled_positive = settled_total = 0
        pointer = 0
        previous: dict[str, float] = {}
        history: dict[str, tuple[int, int]] = {}  # user -> (purchases followed within the horizon, purchases)
        for i, event in enumerate(stream.events):
            watermark = ts_s[i] - allowed_lateness_s
            while pointer < n and ts_s[order[pointer]] + horizon_s < watermark:
                j = order[pointer]
                if stream.labels[j] >= 0:
                    settled_positive += int(stream.labels[j])
                    settled_total += 1
                pointer += 1
            rate = (settled_positive + 1.0) / (settled_total + 2.0)
            positives, purchases = history.get(event.user_id, (0, 0))
            if event.user_id in previous:  # this purchase settles the user's previous one
                positives += int(event.ts_s - previous[event.user_id] <= horizon_s)
                purchases += 1
            history[event.user_id] = (positives, purchases)
            previous[event.user_id] = event.ts_s
            p = (positives + alpha * rate) / (purchases + alpha)
            overall[i] = (1.0 - rate, rate)
            per_user[i] = (1.0 - p, p)
    seconds = time.perf_counter() - started
    return [Outcome("per-user-frequency", per_user.astype(np.float32), seconds=seconds),
            Outcome("global-frequency", overall.astype(np.float32), seconds=seconds)]


RIVER_FLOOR = 1e-3  # share of a River learner's answer spread over every class: no class is impossible


def run_river(name: str, model, stream: Stream, n_classes: int, feature_names: list[str]) -> Outcome:
    """A River classifier, label by label: predict each event, learn each label when it is revealed."""
    started = time.perf_counter()
    reveals = _reveals(stream)
    rows = [dict(zip(feature_names, row)) for row in stream.features.astype(float).tolist()]
    served = np.zeros((len(rows), n_classes), dtype=np.float64)
    for i, x in enumerate(rows):
        for j in reveals.get(i, ()):
            model.learn_one(rows[j], int(stream.labels[j]))
        # River answers for the classes it has seen (class index, or False/True for a binary model); a class
        # it has not seen gets the floor's share, and the row is made a distribution.
        for label, p in model.predict_proba_one(x).items():
            served[i, int(label)] = p
    total = served.sum(axis=1, keepdims=True)
    answered = (total > 0.0) & np.isfinite(total)  # before its first label River answers nothing: uniform
    served = np.where(answered, (1.0 - RIVER_FLOOR) * served / np.where(answered, total, 1.0) + RIVER_FLOOR / n_classes,
                      1.0 / n_classes)
    return Outcome(name, served.astype(np.float32), seconds=time.perf_counter() - started)


def run_oracle(source_model, meta, stream: Stream, folds: int = ORACLE_FOLDS) -> Outcome:
    """A model of the same architecture trained offline on the labelled events after the split: the
    answers, but never the answer to the event it predicts. Those events are cut into `folds` stretches
    of event time, and each stretch is predicted by a model trained on all the others (cross-fitting).
    A model scored on the very events it was trained on would measure memory, not what the stream
    allows. Every other event is predicted by a model trained on all of them."""
    started = time.perf_counter()
    after = np.flatnonzero((np.arange(len(stream.events)) >= stream.split_at) & stream.scored)
    scorer = Scorer(source_model, meta)

    def trained_on(rows: np.ndarray) -> Parameters:
        config = FineTuneConfig(strategy="full", epochs=ORACLE_MAX_EPOCHS, from_scratch=True)
        return Parameters(fine_tune(source_model, stream.features[rows], stream.labels[rows],
                                    np.ones(len(rows), np.float32), meta.task, config))

    served = scorer(trained_on(after), stream.features)
    for held in np.array_split(after, folds):
        served[held] = scorer(trained_on(np.setdiff1d(after, held)), stream.features[held])
    return Outcome("oracle", served, seconds=time.perf_counter() - started)


def transfer_curve(source_model, meta, stream: Stream, sizes=CURVE_SIZES, seeds=(0, 1, 2)) -> list[dict]:
    """Quality (the task's measure) on a fixed later holdout after fine-tuning on the first N scored events
    of a span: from the source (l2sp) against the same fine-tuning from random weights. Two spans: before
    the split and after it."""
    index = np.arange(len(stream.events))
    scorer = Scorer(source_model, meta)
    rows = []
    for span, rows_of_span in (("before", np.flatnonzero(stream.scored & (index < stream.split_at))),
                               ("after", np.flatnonzero(stream.scored & (index >= stream.split_at)))):
        train_pool, holdout = rows_of_span[: int(len(rows_of_span) * 0.7)], rows_of_span[int(len(rows_of_span) * 0.7):]
        for size in sizes:
            if size > len(train_pool):
                break
            chosen = train_pool[:size]
            measured = {"transfer": [], "scratch": []}
            for seed in seeds:
                for name, config in (("transfer", FineTuneConfig(strategy="l2sp", seed=seed)),
                                     ("scratch", FineTuneConfig(strategy="full", seed=seed, from_scratch=True))):
                    weights = fine_tune(source_model, stream.features[chosen], stream.labels[chosen],
                                        np.ones(size, np.float32), meta.task, config)
                    p = scorer(Parameters(weights), stream.features[holdout])
                    measured[name].append(scores(stream.task, p, stream.labels[holdout])[stream.measure])
            transfer, scratch = float(np.mean(measured["transfer"])), float(np.mean(measured["scratch"]))
            rows.append({"span": span, "examples": size, f"transfer_{stream.measure}": transfer,
                         f"scratch_{stream.measure}": scratch, "transfer_minus_scratch": transfer - scratch,
                         "seeds": len(seeds), "holdout": int(len(holdout))})
    return rows


def span_rows(stream: Stream) -> dict[str, np.ndarray]:
    """The scored events of each span (SPANS), by index."""
    index = np.arange(len(stream.events))
    after = np.flatnonzero(stream.scored & (index >= stream.split_at))
    return dict(zip(SPANS, (np.flatnonzero(stream.scored & (index < stream.split_at)), after,
                            after[:AFTER_SPLIT_LABELS], after[AFTER_SPLIT_LABELS:])))


def summarise(outcome: Outcome, stream: Stream) -> dict:
    """Prequential quality in each span: the task's measure under the span's name, its log-loss under
    `<span>_log_loss`. On the scored events only."""
    result = {"name": outcome.name, "promotions": len(outcome.promotions), "seconds": round(outcome.seconds, 1)}
    if outcome.alarms or outcome.alarm_rounds:
        result["drift_alarms"] = len(outcome.alarms)
        result["rounds_after_alarms"] = outcome.alarm_rounds
    for span, rows in span_rows(stream).items():
        measured = scores(stream.task, outcome.probabilities[rows], stream.labels[rows]) if len(rows) else {}
        result[span] = measured.get(stream.measure, float("nan"))
        result[f"{span}_log_loss"] = measured.get("log_loss", float("nan"))
    return result


def goals(table: list[dict], curve: list[dict], strategy: str, task: str, with_oracle_goal: bool) -> list[dict]:
    """The adaptation goals, judged on every scored event after the split ("after"): each with its figures and
    whether it is met (None when a figure it needs is undefined, e.g. an AUC over a span of one class).
    "Beats" means a higher measure (accuracy or AUC) *and* a lower log-loss."""
    by_name = {row["name"]: row for row in table}
    adapted, static, oracle = by_name.get(f"adapted-{strategy}"), by_name.get("static"), by_name.get("oracle")
    measure = _MEASURE_NAME[MEASURE[task]]
    checked = []

    def figures(row: dict, other: dict, span: str = "after") -> str:
        return (f"{measure} {row[span]:.3f} against {other[span]:.3f}, log-loss {row[f'{span}_log_loss']:.4f} against "
                f"{other[f'{span}_log_loss']:.4f} ({other['name']})")

    def undefined(*rows: dict, span: str = "after") -> bool:
        return any(np.isnan(row[key]) for row in rows for key in (span, f"{span}_log_loss"))

    def beats(row: dict, other: dict, span: str = "after") -> bool:
        return row[span] > other[span] and row[f"{span}_log_loss"] < other[f"{span}_log_loss"]

    if adapted and static:
        checked.append({"goal": f"adapted-{strategy} is at least static serving after the split ({measure} within "
                                f"{TIE}, log-loss no worse)", "figures": figures(adapted, static),
                        "met": None if undefined(adapted, static) else bool(
                            adapted["after"] >= static["after"] - TIE
                            and adapted["after_log_loss"] <= static["after_log_loss"])})
    for group, names in (("the naive frequency baselines", ("per-user-frequency", "global-frequency")),
                         ("every River learner", tuple(n for n in by_name if n.startswith("river-")))):
        others = [by_name[name] for name in names if name in by_name]
        if adapted and others:
            checked.append({"goal": f"adapted-{strategy} beats {group} after the split on {measure} and log-loss",
                            "figures": "; ".join(figures(adapted, other) for other in others),
                            "met": None if undefined(adapted, *others) else all(beats(adapted, o) for o in others)})
    if adapted and oracle and with_oracle_goal:
        goal = f"adapted-{strategy} within 2 points of the oracle from the {AFTER_SPLIT_LABELS:,}th label after the drift on"
        if np.isnan(adapted["after_later"]) or np.isnan(oracle["after_later"]):
            checked.append({"goal": goal, "figures": f"the stream has no more than {AFTER_SPLIT_LABELS:,} labels after "
                                                     "the drift", "met": None})
        else:
            gap = oracle["after_later"] - adapted["after_later"]
            checked.append({"goal": goal, "figures": f"{adapted['after_later']:.3f} against {oracle['after_later']:.3f} "
                                                     f"({-gap * 100:+.1f} points)", "met": bool(gap <= 0.02)})
    for span in ("before", "after"):
        small = [row for row in curve if row["span"] == span and row["examples"] <= 2000]
        if small:
            checked.append({"goal": f"transfer beats scratch by 3 points at 2,000 examples or fewer, {span} the split",
                            "figures": ", ".join(f"{row['transfer_minus_scratch'] * 100:+.1f} at {row['examples']:,}"
                                                 for row in small),
                            "met": all(row["transfer_minus_scratch"] >= 0.03 for row in small)})
    return checked


def rolling_quality(outcome: Outcome, stream: Stream, window: int = ROLLING_LABELS) -> tuple[np.ndarray, np.ndarray]:
    """(event time, the task's measure over the `window` scored events up to it), from the first full window
    on: at every label for accuracy, every tenth of a window for AUC (a ranking per point)."""
    scored = np.flatnonzero(stream.scored)
    if stream.measure == "auc":
        ends = np.arange(window, len(scored) + 1, max(1, window // 10))
        p, y = outcome.probabilities[scored, 1], stream.labels[scored]
        return stream.ts_s[scored][ends - 1], np.array([auc(p[end - window:end], y[end - window:end]) for end in ends])
    correct = (np.argmax(outcome.probabilities[scored], axis=1) == stream.labels[scored]).astype(float)
    cumulative = np.concatenate([[0.0], np.cumsum(correct)])
    ends = np.arange(window, len(correct) + 1)  # full windows only
    return stream.ts_s[scored][ends - 1], (cumulative[ends] - cumulative[ends - window]) / window


def plot(outcomes: list[Outcome], stream: Stream, path: Path, highlighted: str) -> bool:
    """Rolling quality over event time, with the split and the adapted model's promotions marked.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from datetime import datetime, timezone

    def when(ts_s):
        return [datetime.fromtimestamp(t, tz=timezone.utc) for t in ts_s]

    figure, axes = plt.subplots(figsize=(11, 5.5))
    for outcome in outcomes:
        ts_s, rolling = rolling_quality(outcome, stream)
        axes.plot(when(ts_s), rolling, label=outcome.name, linewidth=2.2 if outcome.name == highlighted else 1.2)
        if outcome.name == highlighted and outcome.promotions:
            marks = [stream.ts_s[i] for i in outcome.promotions]
            axes.scatter(when(marks), [axes.get_ylim()[0]] * len(marks), marker="^", s=40, color="black",
                         label=f"promotion ({highlighted})", zorder=5)
    axes.axvline(when([stream.ts_s[stream.split_at]])[0], color="red", linestyle="--", label="split")
    axes.set_xlabel("event time")
    axes.set_ylabel(f"prequential {_MEASURE_NAME[stream.measure]} (last {ROLLING_LABELS} labels)")
    axes.set_title(f"{stream.task}: rolling prequential quality")
    axes.legend(loc="lower left", fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def river_contenders(task: str = "next_category", seed: int = 0, which: str = "all") -> list[tuple[str, object]]:
    """River's online learners for the task, or none when River is not installed. `which` (`--river`): "all",
    "linear" (the softmax or logistic regression only: the trees take hours on a multiclass log) or "none"."""
    if which == "none":
        return []
    try:
        from river import forest, linear_model, preprocessing, tree
    except ImportError:
        return []
    linear = (("river-softmax-regression", preprocessing.StandardScaler() | linear_model.SoftmaxRegression())
              if task == "next_category" else
              ("river-logistic-regression", preprocessing.StandardScaler() | linear_model.LogisticRegression()))
    if which == "linear":
        return [linear]
    return [("river-adaptive-random-forest", forest.ARFClassifier(n_models=10, seed=seed)),
            ("river-hoeffding-adaptive-tree", tree.HoeffdingAdaptiveTreeClassifier(seed=seed)), linear]


def run_adaptation_bench(events: list[PurchaseEvent], checkpoint: Path, split_at: int | None,
                         training: TrainingSettings, out: Path | None = None, plot_path: Path | None = None,
                         strategies=("l2sp",), river: str = "all", with_oracle: bool = True,
                         oracle_goal: bool = False, curve_sizes=CURVE_SIZES, curve_seeds=(0, 1, 2), echo=print) -> dict:
    """Replay every contender over `events`, split at event `split_at` (None: the middle); print the tables
    and goals, and return (and write to `out`) the figures. `oracle_goal`: judge the generated stream's goal
    of coming within 2 points of the oracle after its drift."""
    source_model, meta = load_checkpoint(checkpoint)
    stream = build_stream(events, meta, split_at, training.allowed_lateness_s)
    _check_judgeable(stream)
    labelled = int(stream.scored.sum())
    echo(f"{len(stream.events):,} events, {labelled:,} labelled for {meta.task} and scored, split at event "
         f"{stream.split_at:,} ({stream.events[stream.split_at].ts.isoformat()})")
    unknown = (float(np.mean(stream.labels[stream.scored] == len(meta.feature_spec.categories)))
               if labelled and meta.task == "next_category" else 0.0)
    if unknown > UNKNOWN_LABELS_WARNING_SHARE:
        echo(f"warning: {unknown:.0%} of the labels are categories the source checkpoint does not know; they all count "
             f"as one class, {OTHER!r}, so accuracy says little. Was the checkpoint pretrained on this market's categories?")
    outcomes = [run_static("static", ServingModel.of_keras(source_model, meta), stream)]
    for strategy in strategies:
        echo(f"replaying the trainer with strategy {strategy}")
        outcomes.append(run_fine_tuned(f"adapted-{strategy}", source_model, meta, stream,
                                       training.model_copy(update={"strategy": strategy}), progress=echo))
    echo("replaying the trainer from random weights (scratch)")
    outcomes.append(run_fine_tuned("scratch", source_model, meta, stream,
                                   training.model_copy(update={"strategy": "full", "recalibrate": False}),
                                   from_scratch=True, progress=echo))
    outcomes += run_frequency_baselines(stream, len(meta.classes), training.allowed_lateness_s)
    learners = river_contenders(meta.task, which=river)
    if river != "none" and not learners:
        echo("River is not installed (pip install 'streamadapt[bench]'): its contenders are skipped")
    for name, model in learners:
        echo(f"replaying {name}")
        outcomes.append(run_river(name, model, stream, len(meta.classes), meta.feature_spec.feature_names()))
    if with_oracle:
        echo(f"training the oracle on the labelled events after the split ({ORACLE_FOLDS} cross-fitted folds)")
        outcomes.append(run_oracle(source_model, meta, stream))
    echo("transfer against scratch over window sizes")
    curve = transfer_curve(source_model, meta, stream, curve_sizes, curve_seeds)
    table = [summarise(o, stream) for o in outcomes]
    checked = goals(table, curve, strategies[0], meta.task, oracle_goal)
    result = {"events": len(stream.events), "labelled": labelled, "split_at": stream.split_at,
              "task": meta.task, "horizon_days": meta.horizon_days, "source_checkpoint_sha256": meta.sha256,
              "contenders": table, "transfer_curve": curve, "goals": checked, "training": training.model_dump()}
    print_result(result, echo)
    if plot_path is not None:
        shown = [o for o in outcomes if not o.name.startswith("adapted-") or o.name == f"adapted-{strategies[0]}"]
        if plot(shown, stream, plot_path, highlighted=f"adapted-{strategies[0]}"):
            result["plot"] = str(plot_path)
            echo(f"wrote {plot_path}")
        else:
            echo("matplotlib is not installed (pip install 'streamadapt[bench]'): no plot")
    if out is not None:
        write_json(out, result)
        echo(f"wrote {out}")
    return result


def print_result(result: dict, echo=print) -> None:
    """The tables and goal verdicts of a result. Pure."""
    measure = MEASURE[result["task"]]
    widths = (10, 10, 16, 13)
    for title, suffix, digits in ((f"prequential {_MEASURE_NAME[measure]}", "", ".3f"),
                                  ("prequential log-loss", "_log_loss", ".4f")):
        echo(f"{title:32}{'before':>10}{'after':>10}{'after, first 5k':>16}{'after, rest':>13}{'promotions':>12}")
        for row in result["contenders"]:
            echo(f"{row['name']:32}" + "".join(f"{cell(row[span + suffix], digits):>{width}}"
                                               for span, width in zip(SPANS, widths)) + f"{row['promotions']:>12}")
    echo(f"{'transfer curve':16}{'examples':>10}{'transfer':>10}{'scratch':>10}{'difference':>12}  ({_MEASURE_NAME[measure]})")
    for row in result["transfer_curve"]:
        echo(f"{row['span']:16}{row['examples']:>10,}{row[f'transfer_{measure}']:>10.3f}"
             f"{row[f'scratch_{measure}']:>10.3f}{row['transfer_minus_scratch']:>+12.3f}")
    for row in result["contenders"]:
        if "drift_alarms" in row:
            echo(f"{row['name']}: {row['drift_alarms']} drift alarms; the rounds they started: "
                 + (", ".join(row["rounds_after_alarms"]) or "none"))
    for goal in result["goals"]:
        echo(goal_line(goal))


def _check_judgeable(stream: Stream) -> None:
    """Refuse, before any replay, a stream the bench cannot judge: ValueError with what to change."""
    if not 0 <= stream.split_at < len(stream.events):
        raise ValueError(f"the split at event {stream.split_at:,} is outside the stream's {len(stream.events):,} events")
    after = int(np.sum(stream.scored[stream.split_at:]))
    if after < MIN_LABELS_AFTER_SPLIT:
        raise ValueError(f"only {after:,} events from the split at event {stream.split_at:,} on get a {stream.task} "
                         f"label the stream settles; the bench needs at least {MIN_LABELS_AFTER_SPLIT} (a longer "
                         "stream, or an earlier split)")


def _reveals(stream: Stream) -> dict[int, list[int]]:
    """event index -> indices of earlier events whose label it reveals."""
    reveals: dict[int, list[int]] = {}
    for j, i in enumerate(stream.revealed_at.tolist()):
        if i >= 0:
            reveals.setdefault(i, []).append(j)
    return reveals
