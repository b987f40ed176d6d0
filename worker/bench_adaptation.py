"""`streamadapt bench adaptation`: prequential quality on a drifting stream, against static, scratch,
River's online learners and an oracle, for the task of the source checkpoint.

Offline and deterministic: the stream is replayed in event-time order through the worker's own feature
code, label rule and fine-tune rounds (worker.candidate, as the trainer runs them). Every contender
predicts each event before its label exists, and learns a label only when the stream reveals it, as in
the worker: next_category, at the user's next purchase; repurchase, at the next purchase when it comes
within the horizon, else when the watermark (event time less the allowed lateness) passes the deadline
or a later purchase comes, whichever is first. Quality is accuracy for next_category and AUC for
repurchase, with log-loss for both.

Contenders:
- static: the source model, unchanged;
- adapted-<strategy>: the trainer's loop: every `every_examples` new labels, a round on the newest
  `max_examples` its windows still hold (they age as the trainer's do), promoted only through the gate,
  and back to the source when the source beats the champion;
- scratch: the same loop and gate, each round from random weights (no transfer);
- River: adaptive random forest, Hoeffding adaptive tree, and softmax (next_category) or logistic
  (repurchase) regression, learning label by label (when River is installed: pip install 'streamadapt[bench]');
- oracle: models trained offline on the labelled events after the drift, each event predicted by one
  that did not train on it (cross-fitted): the ceiling the others are measured against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas import PurchaseEvent
from worker.bench_json import cell, goal_line, write_json
from worker.candidate import (Round, Scorer, examples_before_next_round, fine_tune_round, labels_known_until,
                              round_examples)
from worker.examples import Example, expired_windows, window_start
from worker.features import OTHER, encode_stream
from worker.finetune import FineTuneConfig, FineTuneError, fine_tune
from worker.labels import file_labels, next_of_same_user, repurchase_label, resolve_on_purchase
from worker.model import ModelMeta, ServingModel, load_checkpoint
from worker.quality import QualityMonitor, auc, scores
from worker.settings import TrainingSettings

ROLLING_LABELS = 1000  # labelled events in the rolling quality of the plot
AFTER_DRIFT_LABELS = 5000  # the goal: within 2 points of the oracle within this many labels after a drift
MEASURE = {"next_category": "accuracy", "repurchase": "auc"}  # each task's quality measure; log-loss for both too
SPANS = ("before_drift", "first_5k_after_drift", "later_after_drift")
_MEASURE_NAME = {"accuracy": "accuracy", "auc": "AUC"}
UNKNOWN_LABELS_WARNING_SHARE = 0.2  # above this share of labels outside the checkpoint's categories, say so
TOO_FEW_LABELS = f"the stream has no more than {AFTER_DRIFT_LABELS:,} labels after the drift"
CURVE_SIZES = (250, 500, 1000, 2000, 5000)
ORACLE_FOLDS = 5
MIN_LABELS_AFTER_DRIFT = 100  # the oracle trains on them in ORACLE_FOLDS folds; fewer cannot judge anything
ORACLE_MAX_EPOCHS = 60  # early stopping ends it sooner


@dataclass
class Stream:
    """A stream turned into what every contender sees: features before each event, its label's class
    index (-1 if never revealed) and the index of the event at which the label is revealed (-1 if none).

    `scored` marks the events every contender is judged on: those whose label the stream settles either way.
    A repurchase label of the stream's last horizon is revealed only when it is positive (the negatives'
    deadlines fall after the end), so scoring those would judge on positives alone."""

    task: str
    events: list[PurchaseEvent]
    features: np.ndarray
    labels: np.ndarray
    revealed_at: np.ndarray
    drift_at: int
    scored: np.ndarray

    @property
    def ts_s(self) -> np.ndarray:
        return np.array([e.ts_s for e in self.events])

    @property
    def measure(self) -> str:
        return MEASURE[self.task]


def build_stream(events: list[PurchaseEvent], meta: ModelMeta, drift_at: int | None,
                 allowed_lateness_s: float = 3600.0) -> Stream:
    """The events in event-time order, labelled for the checkpoint's task as the worker labels them."""
    ordered = sorted(events, key=lambda e: e.ts_s)
    following = np.array(next_of_same_user([e.user_id for e in ordered]), dtype=np.int64)
    if meta.task == "next_category":
        labels = np.array([meta.feature_spec.index_of(label) if label is not None else -1
                           for label in file_labels(ordered, "next_category", 0.0)], dtype=np.int64)
        revealed_at, settled = following, following >= 0
    else:
        labels, revealed_at, settled = _repurchase_labels(np.array([e.ts_s for e in ordered]), following,
                                                          meta.horizon_days or 0.0, allowed_lateness_s)
    return Stream(meta.task, ordered, encode_stream(ordered, meta.feature_spec), labels, revealed_at,
                  drift_at if drift_at is not None else len(ordered) // 2, settled & (labels >= 0))


def _repurchase_labels(ts_s: np.ndarray, following: np.ndarray, horizon_days: float, allowed_lateness_s: float
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each purchase's repurchase label (worker.labels' rule), the index of the event at which the worker
    learns it: the user's next purchase, or, if that is not within the horizon, the first event that takes
    the watermark past the deadline, whichever comes first (-1 where the stream ends before either), and
    whether the stream settles it either way: whether the watermark passes its deadline before the end."""
    deadlines = ts_s + horizon_days * 86400.0
    watermark_passes = np.searchsorted(ts_s, deadlines + allowed_lateness_s, side="right")
    within = (following >= 0) & (ts_s[np.maximum(following, 0)] <= deadlines)
    revealed_at = np.where(within | ((following >= 0) & (following < watermark_passes)), following, watermark_passes)
    revealed_at = np.where(revealed_at < len(ts_s), revealed_at, -1)
    labels = [-1 if k < 0 else
              resolve_on_purchase("repurchase", ts_s[i], ts_s[k], 1, horizon_days) if k == following[i] else
              int(repurchase_label(ts_s[i], None, ts_s[k] - allowed_lateness_s, horizon_days) == "1")
              for i, k in enumerate(revealed_at.tolist())]
    return np.array(labels, dtype=np.int64), revealed_at, watermark_passes < len(ts_s)


@dataclass
class Outcome:
    name: str
    probabilities: np.ndarray  # (n, C) what was served for each event
    promotions: list[int] = field(default_factory=list)  # event indices at which another version took over
    seconds: float = 0.0


def run_static(name: str, model: ServingModel, stream: Stream) -> Outcome:
    started = time.perf_counter()
    return Outcome(name, model.predict_many(stream.features), seconds=time.perf_counter() - started)


def run_fine_tuned(name: str, source_model, meta, stream: Stream, training: TrainingSettings,
                   from_scratch: bool = False, progress=None) -> Outcome:
    """The trainer's loop, replayed: serve, collect revealed labels, and run a round when enough new
    labels came in or when the drift detector alarms on the served predictions' log-loss, on the examples
    the trainer would take (worker.candidate: the current regime's; for repurchase, those the watermark has
    fully resolved; the `every_s` trigger has no meaning offline)."""
    started = time.perf_counter()
    serving = ServingModel.of_keras(source_model, meta)
    scorer = Scorer(source_model, meta)
    champion = None  # the source's weights serve
    window: list[Example] = []  # as the trainer's windows hold them: dropped by age at each round
    reveals = _reveals(stream)
    served = np.zeros((len(stream.events), len(meta.classes)), dtype=np.float32)
    monitor = QualityMonitor(meta.task, training.quality_window)
    promotions, since_round, alarmed, regime_since_ts = [], 0, False, None
    wanted = training.every_examples
    for i in range(len(stream.events)):
        for j in reveals.get(i, ()):
            window.append(Example(stream.events[j].event_id, stream.events[j].ts_s, "", stream.features[j],
                                  served[j], int(stream.labels[j]), stream.events[i].ts_s))
            since_round += 1
            change = monitor.observe(serving.version, served[j], int(stream.labels[j]), stream.events[i].ts_s)
            if training.on_drift and change is not None:
                alarmed, regime_since_ts = True, change
        if since_round >= wanted or alarmed:
            since_round, alarmed = 0, False
            watermark_s = stream.events[i].ts_s - training.allowed_lateness_s
            window = _unexpired(window, labels_known_until(meta.task, meta.horizon_days, watermark_s), training)
            examples = round_examples(sorted(window, key=lambda e: e.ts_s), regime_since_ts, meta.task, meta.horizon_days,
                                      watermark_s, training.max_examples)  # the trainer's order
            wanted = examples_before_next_round(len(examples), training)
            if len(examples) >= training.min_examples:
                round_ = _round(source_model, champion, examples, meta, training, scorer, from_scratch)
                took_over = round_ is not None and (round_.back_to_source or round_.decision.promote)
                if took_over:
                    champion = None if round_.back_to_source else round_.weights
                    serving.swap(source_model.get_weights() if champion is None else champion,
                                 f"{name}-{len(promotions) + 1}")
                    promotions.append(i)
                if progress:
                    outcome = ("kept the champion" if not took_over else
                               "back to the source" if round_.back_to_source else "promoted")
                    progress(f"{name}: round at event {i:,}/{len(stream.events):,} on {len(examples):,} examples, {outcome}")
        served[i] = serving.predict_many(stream.features[i:i + 1])[0]
    return Outcome(name, served, promotions, time.perf_counter() - started)


def _unexpired(window: list[Example], known_until_s: float, training: TrainingSettings) -> list[Example]:
    """The examples whose event-time window the trainer would not have dropped for age yet."""
    expired = set(expired_windows(sorted({window_start(e.ts_s, training.window_s) for e in window}), known_until_s,
                                  training.window_s, training.window_max_age_s))
    return [e for e in window if window_start(e.ts_s, training.window_s) not in expired] if expired else window


def _round(source_model, champion, examples, meta, training, scorer, from_scratch) -> Round | None:
    """One replayed round (None when the fine-tune failed, which changes nothing)."""
    try:
        return fine_tune_round(source_model, champion, examples, meta.task, len(meta.classes), training, scorer,
                               from_scratch=from_scratch)
    except FineTuneError:
        return None


def run_river(name: str, model, stream: Stream, n_classes: int, feature_names: list[str]) -> Outcome:
    """A River classifier, label by label: predict each event, learn each label when it is revealed."""
    started = time.perf_counter()
    reveals = _reveals(stream)
    rows = [dict(zip(feature_names, row)) for row in stream.features.astype(float).tolist()]
    served = np.full((len(rows), n_classes), 1.0 / n_classes, dtype=np.float32)
    for i, x in enumerate(rows):
        for j in reveals.get(i, ()):
            model.learn_one(rows[j], int(stream.labels[j]))
        for label, p in model.predict_proba_one(x).items():  # class index, or False/True for a binary model
            served[i, int(label)] = p
    return Outcome(name, served, seconds=time.perf_counter() - started)


def run_oracle(source_model, meta, stream: Stream, folds: int = ORACLE_FOLDS) -> Outcome:
    """A model of the same architecture trained offline on the labelled events after the drift: the
    answers, but never the answer to the event it predicts. Those events are cut into `folds` stretches
    of event time, and each stretch is predicted by a model trained on all the others (cross-fitting).
    A model scored on the very events it was trained on would measure memory, not what the new regime
    allows: on the bench's stream that in-sample score is about 4 points higher. Every other event is
    predicted by a model trained on all of them."""
    started = time.perf_counter()
    after = np.flatnonzero((np.arange(len(stream.events)) >= stream.drift_at) & stream.scored)
    scorer = Scorer(source_model, meta)

    def trained_on(rows: np.ndarray) -> list[np.ndarray]:
        config = FineTuneConfig(strategy="full", epochs=ORACLE_MAX_EPOCHS, from_scratch=True)
        return fine_tune(source_model, stream.features[rows], stream.labels[rows], np.ones(len(rows), np.float32),
                         meta.task, config)

    served = scorer(trained_on(after), stream.features)
    for held in np.array_split(after, folds):
        served[held] = scorer(trained_on(np.setdiff1d(after, held)), stream.features[held])
    return Outcome("oracle", served, seconds=time.perf_counter() - started)


def transfer_curve(source_model, meta, stream: Stream, sizes=CURVE_SIZES, seeds=(0, 1, 2)) -> list[dict]:
    """Quality (the task's measure) on a fixed later holdout after fine-tuning on the first N labelled events of a span: from
    the source (l2sp) against the same fine-tuning from random weights. Two spans: the target market
    before the drift (a source checkpoint from another market, the product's case) and the regime after
    it (where part of what the source knew has become wrong)."""
    index = np.arange(len(stream.events))
    scorer = Scorer(source_model, meta)
    rows = []
    for span, rows_of_span in (("before_drift", np.flatnonzero(stream.scored & (index < stream.drift_at))),
                               ("after_drift", np.flatnonzero(stream.scored & (index >= stream.drift_at)))):
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
                    p = scorer(weights, stream.features[holdout])
                    measured[name].append(scores(stream.task, p, stream.labels[holdout])[stream.measure])
            transfer, scratch = float(np.mean(measured["transfer"])), float(np.mean(measured["scratch"]))
            rows.append({"span": span, "examples": size, f"transfer_{stream.measure}": transfer,
                         f"scratch_{stream.measure}": scratch, "transfer_minus_scratch": transfer - scratch,
                         "seeds": len(seeds), "holdout": int(len(holdout))})
    return rows


def summarise(outcome: Outcome, stream: Stream) -> dict:
    """Prequential quality before the drift, in the first AFTER_DRIFT_LABELS labels after it, and after that:
    the task's measure under each span's name, its log-loss under `<span>_log_loss`. On the scored events only."""
    index = np.arange(len(stream.events))
    after = np.flatnonzero(stream.scored & (index >= stream.drift_at))
    spans = dict(zip(SPANS, (np.flatnonzero(stream.scored & (index < stream.drift_at)), after[:AFTER_DRIFT_LABELS],
                             after[AFTER_DRIFT_LABELS:])))
    result = {"name": outcome.name, "promotions": len(outcome.promotions), "seconds": round(outcome.seconds, 1)}
    for span, rows in spans.items():
        measured = scores(stream.task, outcome.probabilities[rows], stream.labels[rows]) if len(rows) else {}
        result[span] = measured.get(stream.measure, float("nan"))
        result[f"{span}_log_loss"] = measured.get("log_loss", float("nan"))
    return result


def goals(table: list[dict], curve: list[dict], strategy: str, task: str = "next_category") -> list[dict]:
    """The issue's adaptation goals, and adapted against static, each with its figures and whether it is met.
    For repurchase, "beats" means a higher AUC *and* a lower log-loss; for next_category, a higher accuracy."""
    by_name = {row["name"]: row for row in table}
    adapted, oracle, static = by_name.get(f"adapted-{strategy}"), by_name.get("oracle"), by_name.get("static")
    river = [row for row in table if row["name"].startswith("river-")]
    checked = []
    later_labels = bool(adapted) and not np.isnan(adapted["later_after_drift"])
    after_spans = ("first_5k_after_drift", "later_after_drift") if later_labels else ("first_5k_after_drift",)
    both = task == "repurchase"

    def beats(row: dict, other: dict, span: str) -> bool:
        return row[span] > other[span] and (not both or row[f"{span}_log_loss"] < other[f"{span}_log_loss"])

    def verdict(pairs: list[tuple[dict, dict, str]]) -> bool | None:
        """Whether each row beats the other in its span; None when a figure it needs is undefined (an AUC over
        a span whose labels are all one class)."""
        keys = (lambda span: (span, f"{span}_log_loss")) if both else (lambda span: (span,))
        needed = [row[key] for first, second, span in pairs for row in (first, second) for key in keys(span)]
        if any(np.isnan(value) for value in needed):
            return None
        return all(beats(*pair) for pair in pairs)

    def figures(row: dict, other: dict, span: str) -> str:
        measured = f"{row[span]:.3f} against {other[span]:.3f}"
        if both:
            measured = (f"AUC {measured}, log-loss {row[f'{span}_log_loss']:.4f} against "
                        f"{other[f'{span}_log_loss']:.4f}")
        return f"{span.replace('_', ' ')} {measured} ({other['name']})"

    if adapted and static:
        checked.append({"goal": f"adapted-{strategy} beats static serving after the drift",
                        "figures": "; ".join(figures(adapted, static, span) for span in after_spans),
                        "met": verdict([(adapted, static, span) for span in after_spans])})
    if adapted and oracle:
        goal = (f"adapted-{strategy} within 2 points of the oracle from the {AFTER_DRIFT_LABELS:,}th label after the "
                "drift on")
        if later_labels:
            gap = oracle["later_after_drift"] - adapted["later_after_drift"]
            checked.append({"goal": goal, "figures": f"{adapted['later_after_drift']:.3f} against "
                                                     f"{oracle['later_after_drift']:.3f} ({-gap * 100:+.1f} points)",
                            "met": bool(gap <= 0.02)})
        else:
            checked.append({"goal": goal, "figures": TOO_FEW_LABELS, "met": None})
    if adapted and river:
        strongest = {span: max(river, key=lambda row: row[span]) for span in after_spans}
        checked.append({"goal": f"adapted-{strategy} beats every River contender after the drift",
                        "figures": "; ".join(figures(adapted, strongest[span], span) for span in after_spans),
                        "met": verdict([(adapted, row, span) for span in after_spans for row in river])})
    for span in ("before_drift", "after_drift"):
        small = [row for row in curve if row["span"] == span and row["examples"] <= 2000]
        if small:
            checked.append({"goal": f"transfer beats scratch by 3 points at 2,000 examples or fewer, {span.replace('_', ' ')}",
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


def plot(outcomes: list[Outcome], stream: Stream, path: Path) -> bool:
    """Rolling quality over event time, with the drift and the adapted model's promotions marked.
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
        style = {"linewidth": 2.2} if outcome.name.startswith("adapted-l2sp") else {"linewidth": 1.2}
        axes.plot(when(ts_s), rolling, label=outcome.name, **style)
        if outcome.name.startswith("adapted-l2sp") and outcome.promotions:
            marks = [stream.ts_s[i] for i in outcome.promotions]
            axes.scatter(when(marks), [axes.get_ylim()[0]] * len(marks), marker="^", s=40, color="black",
                         label="promotion (adapted-l2sp)", zorder=5)
    axes.axvline(when([stream.ts_s[stream.drift_at]])[0], color="red", linestyle="--", label="drift")
    axes.set_xlabel("event time")
    axes.set_ylabel(f"prequential {_MEASURE_NAME[stream.measure]} (last {ROLLING_LABELS} labels)")
    axes.set_title(f"{stream.task}: rolling prequential quality")
    axes.legend(loc="lower left", fontsize=8, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def river_contenders(task: str = "next_category", seed: int = 0) -> list[tuple[str, object]]:
    """River's online learners for the task, or none when River is not installed."""
    try:
        from river import forest, linear_model, preprocessing, tree
    except ImportError:
        return []
    linear = (("river-softmax-regression", preprocessing.StandardScaler() | linear_model.SoftmaxRegression())
              if task == "next_category" else
              ("river-logistic-regression", preprocessing.StandardScaler() | linear_model.LogisticRegression()))
    return [("river-adaptive-random-forest", forest.ARFClassifier(n_models=10, seed=seed)),
            ("river-hoeffding-adaptive-tree", tree.HoeffdingAdaptiveTreeClassifier(seed=seed)), linear]


def run_adaptation_bench(events: list[PurchaseEvent], checkpoint: Path, drift_at: int | None, training: TrainingSettings,
                         out: Path | None = None, plot_path: Path | None = None, strategies=("l2sp", "head", "full"),
                         with_river: bool = True, curve_sizes=CURVE_SIZES, curve_seeds=(0, 1, 2), echo=print) -> dict:
    source_model, meta = load_checkpoint(checkpoint)
    stream = build_stream(events, meta, drift_at, training.allowed_lateness_s)
    _check_judgeable(stream)
    labelled = int(stream.scored.sum())
    echo(f"{len(stream.events):,} events, {labelled:,} labelled for {meta.task} and scored, drift at event {stream.drift_at:,}")
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
    outcomes.append(run_fine_tuned("scratch", source_model, meta, stream, training.model_copy(update={"strategy": "full"}),
                                   from_scratch=True, progress=echo))
    river = river_contenders(meta.task) if with_river else []
    if with_river and not river:
        echo("River is not installed (pip install 'streamadapt[bench]'): its contenders are skipped")
    for name, model in river:
        echo(f"replaying {name}")
        outcomes.append(run_river(name, model, stream, len(meta.classes), meta.feature_spec.feature_names()))
    echo(f"training the oracle on the labelled events after the drift ({ORACLE_FOLDS} cross-fitted folds)")
    outcomes.append(run_oracle(source_model, meta, stream))
    echo("transfer against scratch over window sizes")
    curve = transfer_curve(source_model, meta, stream, curve_sizes, curve_seeds)
    table = [summarise(o, stream) for o in outcomes]
    checked = goals(table, curve, training.strategy, meta.task)
    result = {"events": len(stream.events), "labelled": labelled, "drift_at": stream.drift_at,
              "source_checkpoint_sha256": meta.sha256, "contenders": table, "transfer_curve": curve,
              "goals": checked, "training": training.model_dump()}
    for title, suffix, digits in ((f"prequential {_MEASURE_NAME[stream.measure]}", "", ".3f"),
                                  ("prequential log-loss", "_log_loss", ".4f")):
        echo(f"{title:32}{'before drift':>14}{'first 5k after':>16}{'later after':>13}{'promotions':>12}")
        for row in table:
            echo(f"{row['name']:32}" + "".join(f"{cell(row[span + suffix], digits):>{width}}"
                                               for span, width in zip(SPANS, (14, 16, 13))) + f"{row['promotions']:>12}")
    echo(f"{'transfer curve':16}{'examples':>10}{'transfer':>10}{'scratch':>10}{'difference':>12}  ({_MEASURE_NAME[stream.measure]})")
    for row in curve:
        echo(f"{row['span'].replace('_', ' '):16}{row['examples']:>10,}{row[f'transfer_{stream.measure}']:>10.3f}"
             f"{row[f'scratch_{stream.measure}']:>10.3f}{row['transfer_minus_scratch']:>+12.3f}")
    for goal in checked:
        echo(goal_line(goal))
    if plot_path is not None:
        shown = [o for o in outcomes if o.name in {"static", "adapted-l2sp", "scratch", "oracle"} or o.name.startswith("river")]
        if plot(shown, stream, plot_path):
            result["plot"] = str(plot_path)
            echo(f"wrote {plot_path}")
        else:
            echo("matplotlib is not installed (pip install 'streamadapt[bench]'): no plot")
    if out is not None:
        write_json(out, result)
        echo(f"wrote {out}")
    return result


def _check_judgeable(stream: Stream) -> None:
    """Refuse, before any replay, a stream the bench cannot judge: ValueError with what to change."""
    if not 0 <= stream.drift_at < len(stream.events):
        raise ValueError(f"--drift-at {stream.drift_at:,} is outside the stream's {len(stream.events):,} events")
    after = int(np.sum(stream.scored[stream.drift_at:]))
    if after < MIN_LABELS_AFTER_DRIFT:
        raise ValueError(f"only {after:,} events from the drift at event {stream.drift_at:,} on get a {stream.task} label "
                         f"the stream settles; the bench needs at least {MIN_LABELS_AFTER_DRIFT} (a longer stream, or an "
                         "earlier --drift-at)")


def _reveals(stream: Stream) -> dict[int, list[int]]:
    """event index -> indices of earlier events whose label it reveals."""
    reveals: dict[int, list[int]] = {}
    for j, i in enumerate(stream.revealed_at.tolist()):
        if i >= 0:
            reveals.setdefault(i, []).append(j)
    return reveals
