"""`python -m benchmarks adaptation --through-worker`: the same log through the real worker, Kafka and Redis.

The offline bench (benchmarks.adaptation) replays the trainer's rounds in the stream's own time; the worker
runs them in wall time, and paces a log that is years behind the clock so that its rounds keep up with the
stream (streamadapt.core.pacing). This runs `streamadapt run` twice on topics and a Redis prefix of its own:
static (`--no-finetune`) and adapted (`--role all`, its trainer a child process). Each gets the whole log
replayed into its input topic, at full speed or at `--replay-rate`; every prediction is read back from its
predictions topic and scored on the events after the split whose label the log settles, as the offline bench
scores them.

The static run must serve what the offline replay's static contender serves: the same features from the same
states, by the same model. The result says how far apart the two are (`static_agreement`), so that the replay
and the worker cannot disagree unnoticed.

A multiclass prediction carries its top classes only: a true class outside them gets the rest of the probability
spread evenly over the classes not shown, so its log-loss is an estimate (accuracy is exact).
"""
from __future__ import annotations

import re
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from benchmarks.adaptation import Outcome, Stream, build_stream, summarise
from benchmarks.throughput import (
    _wait_ready,
    deleted_when_done,
    topics_of,
    worker_process,
)
from streamadapt.core.features import CategoryFeatures
from streamadapt.core.plugin import encode_stream
from streamadapt.kafka.kafka_python import client_options
from streamadapt.model.checkpoint import ModelMeta, ServingModel
from streamadapt.ops.replay import replay
from streamadapt.schemas import Prediction, PurchaseEvent
from streamadapt.settings import Settings
from streamadapt.state.keys import KeyLayout
from streamadapt.state.store import connect

READ_STALL_S = 120.0  # reading predictions gives up after this long without a new one
AGREEMENT_TOLERANCE = 1e-4  # static served by the worker and by the replay: the same probabilities, to this


def run_through_worker(settings: Settings, events: list[PurchaseEvent], checkpoint: Path, split_at: int,
                       rate_per_s: float | None, echo=print) -> dict:
    """Static, then adapted serving of `events` (any order; replayed in event-time order) through real workers;
    their quality over the spans of the offline bench, and how far static serving is from the replay's."""
    model = ServingModel.from_checkpoint(checkpoint)
    stream = build_stream(events, model.meta, split_at, settings.training.allowed_lateness_s)
    run = uuid.uuid4().hex[:8]
    rows, served, observed_since_s = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="streamadapt-e2e-") as scratch, deleted_when_done(settings.kafka) as made:
        ordered = Path(scratch) / "events.jsonl"
        ordered.write_text("".join(e.model_dump_json() + "\n" for e in stream.events))
        for mode in ("static", "adapted"):
            input_topic = f"bench-adaptation-{run}-{mode}"
            made.extend(topics_of(input_topic))
            echo(f"{mode}: replaying {len(stream.events):,} events through `streamadapt run "
                 f"{'--no-finetune' if mode == 'static' else '--role all'}`"
                 + (f" at {rate_per_s:g} events/s" if rate_per_s else ""))
            started = time.monotonic()
            served[mode], observed_since_s[mode] = _serve(settings, checkpoint, ordered, input_topic, mode, rate_per_s,
                                                          Path(scratch), stream)
            outcome = Outcome(f"worker-{mode}", _probabilities(served[mode], stream, model.meta),
                              seconds=time.monotonic() - started)
            rows.append(summarise(outcome, stream))
            rows[-1]["model_versions"] = sorted({p.model_version for p in served[mode].values()})
            echo(f"{mode}: {len(served[mode]):,} predictions in {outcome.seconds:.0f} s, versions "
                 f"{', '.join(rows[-1]['model_versions'])}")
            for line in _trainer_decisions(Path(scratch) / f"worker-{mode}.log"):
                echo(f"worker-{mode}: {line}")
    # The worker keeps states from the oldest event of its first batch, which need not be the log's first
    # event (that batch may hold only some partitions); the replay it is compared with keeps them from the same.
    offline = Outcome("replay-static", model.predict_many(
        encode_stream(stream.events, CategoryFeatures(model.meta.feature_spec), observed_since_s["static"])))
    agreement = _agreement(served["static"], offline, stream, model.meta)
    return {"through_worker": rows, "static_agreement": agreement, "replay_rate_per_s": rate_per_s}


def _serve(settings: Settings, checkpoint: Path, ordered: Path, input_topic: str, mode: str,
           rate_per_s: float | None, scratch: Path, stream: Stream) -> tuple[dict[str, Prediction], float | None]:
    """The worker's predictions by event id, and the event time from which it kept user states."""
    key_prefix = f"bench-e2e-{uuid.uuid4().hex[:8]}"  # named here, to read observed_since before the keys go
    extra = ({"STREAMADAPT_NO_FINETUNE": "true", "STREAMADAPT_ROLE": "worker"} if mode == "static"
             else {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "all"})
    extra["STREAMADAPT_REDIS_KEY_PREFIX"] = key_prefix
    log_path = scratch / f"worker-{mode}.log"
    kafka = settings.kafka.model_copy(update={"input_topic": input_topic})
    with worker_process(settings, checkpoint, input_topic, log_path, extra) as (process, port):
        _wait_ready(process, port, log_path, timeout_s=180)
        if mode == "adapted":
            _wait_ready(process, port + 1, log_path, timeout_s=180)  # the trainer child, once TensorFlow is loaded
        replay(ordered, kafka, rate_per_s)
        predictions = _read_predictions(settings, topics_of(input_topic)[1], len(stream.events), process, log_path)
        with closing(connect(settings.redis)) as client:
            observed_since = client.get(KeyLayout(key_prefix).meta("observed_since"))
    return predictions, None if observed_since is None else float(observed_since)


TRAINER_DECISION = re.compile(r"streamadapt\.training\.trainer: (.*(?:promoted|rejected|skipped|champion again).*)")


def _trainer_decisions(log_path: Path) -> list[str]:
    """What the worker's trainer decided at each round, in order, from its log (as the replay prints its own)."""
    return [found.group(1) for line in log_path.read_text(errors="replace").splitlines()
            if (found := TRAINER_DECISION.search(line))]


def _read_predictions(settings: Settings, topic: str, expected: int, process, log_path: Path) -> dict[str, Prediction]:
    """Every prediction on `topic`, by event id (a replayed record's is the same message again)."""
    consumer = KafkaConsumer(**client_options(settings.kafka, "bench-reader"), enable_auto_commit=False,
                             group_id=None, auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        predictions: dict[str, Prediction] = {}
        last_new = time.monotonic()
        while len(predictions) < expected and time.monotonic() - last_new < READ_STALL_S:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}: see its log line "
                                   f"{log_path.read_text(errors='replace').strip().splitlines()[-1:]}")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    prediction = Prediction.model_validate_json(record.value)
                    if prediction.event_id not in predictions:
                        predictions[prediction.event_id] = prediction
                        last_new = time.monotonic()
        return predictions
    finally:
        consumer.close()


def _probabilities(predictions: dict[str, Prediction], stream: Stream, meta: ModelMeta) -> np.ndarray:
    """The served class probabilities of each event of the stream (uniform where no prediction came)."""
    n_classes = len(meta.classes)
    out = np.full((len(stream.events), n_classes), 1.0 / n_classes, dtype=np.float32)
    index = {name: k for k, name in enumerate(meta.classes)}
    for i, event in enumerate(stream.events):
        prediction = predictions.get(event.event_id)
        if prediction is None:
            continue
        if meta.task == "repurchase":
            out[i] = (1.0 - prediction.score, prediction.score)
            continue
        shown = {index[p.label]: p.probability for p in prediction.probabilities or ()}
        rest = max(0.0, 1.0 - sum(shown.values())) / max(1, n_classes - len(shown))
        out[i] = rest
        for k, p in shown.items():
            out[i, k] = p
    return out


def _agreement(static: dict[str, Prediction], offline: Outcome, stream: Stream, meta: ModelMeta) -> dict:
    """How far the worker's static predictions are from the replay's: the largest difference in the score each
    carries (P(positive), or P(predicted class)), and the share of predicted classes that differ."""
    differences, labels_differ, compared = [], 0, 0
    for i, event in enumerate(stream.events):
        prediction = static.get(event.event_id)
        if prediction is None:
            continue
        compared += 1
        row = offline.probabilities[i]
        if meta.task == "repurchase":
            differences.append(abs(prediction.score - float(row[1])))
        else:
            predicted = int(np.argmax(row))
            labels_differ += meta.classes[predicted] != prediction.label
            differences.append(abs(prediction.score - float(row[meta.classes.index(prediction.label)])))
    largest = float(max(differences, default=float("nan")))
    return {"compared": compared, "missing": len(stream.events) - compared, "largest_score_difference": largest,
            "predicted_class_differs_share": labels_differ / compared if compared else float("nan"),
            "agree": bool(compared == len(stream.events) and largest <= AGREEMENT_TOLERANCE and not labels_differ)}


def print_through_worker(result: dict, measure: str, echo=print) -> None:
    """The through-worker rows and the agreement line. Pure."""
    echo(f"{'through the real worker':32}{measure + ' after':>14}{'log-loss after':>16}  model versions")
    for row in result["through_worker"]:
        echo(f"{row['name']:32}{row['after']:>14.3f}{row['after_log_loss']:>16.4f}  {len(row['model_versions'])}")
    agreement = result["static_agreement"]
    verdict = "agree" if agreement["agree"] else "DISAGREE"
    echo(f"static through the worker and in the replay {verdict}: {agreement['compared']:,} predictions compared, "
         f"{agreement['missing']:,} missing, largest score difference {agreement['largest_score_difference']:.2e}, "
         f"predicted class differs on {agreement['predicted_class_differs_share']:.2%}")
    adapted = next((row for row in result["through_worker"] if row["name"] == "worker-adapted"), None)
    if adapted is not None and len(adapted["model_versions"]) < 2:
        echo("note: the adapted worker served the source model alone: its trainer promoted nothing")
