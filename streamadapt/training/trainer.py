"""The trainer role: one active across the fleet (Redis lease with fencing).

Triggered by new resolved examples, by time and by drift alarms, each run fine-tunes a copy of the
source checkpoint on the newest examples of the current regime (since the last drift alarm's estimated
change point; time-ordered split: train on the older part, hold out the newest), scores candidate and
champion on the same holdout, records the run as a model version, and promotes the candidate only when
the gate says so and this trainer still holds the lease.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import datetime, timezone

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamadapt.core.event_time import utc_datetime
from streamadapt.core.examples import Example, labels_known_until
from streamadapt.core.pacing import TrainerProgress
from streamadapt.metrics import WorkerMetrics
from streamadapt.model.checkpoint import ModelMeta, Parameters
from streamadapt.schemas import ModelVersion, TrainedOn
from streamadapt.settings import Settings
from streamadapt.state.registry import (
    ArtifactError,
    Registry,
    encode_parameters,
    versions_to_drop,
)
from streamadapt.state.store import REDIS_OUTAGE_ERRORS, StateStore
from streamadapt.training.candidate import (
    Scorer,
    examples_before_next_round,
    fine_tune_round,
    newest_trainable_ts,
    round_examples,
)
from streamadapt.training.finetune import FineTuneError

log = logging.getLogger(__name__)

TICK_S = 0.25  # also how soon a replay that waits for a due round sees it start
REDIS_RETRY_S = 5.0  # after Redis failed the trainer, on top of the tick
KAFKA_RETRY_S = 5.0  # after Kafka refused a model version, on top of the tick
ANNOUNCE_TIMEOUT_S = 30.0  # for Kafka to acknowledge one model version


class LeaseKeeper:
    """Holds the trainer lease in the background: acquires when free, renews every third of its TTL."""

    def __init__(self, registry: Registry, ttl_s: float, metrics: WorkerMetrics):
        self._registry, self._ttl_s, self._metrics = registry, ttl_s, metrics
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainer-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.token is not None:
            self._registry.release_lease(self.token)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.token is None:
                    self.token = self._registry.acquire_lease(self._ttl_s)
                    if self.token:
                        log.info("trainer lease acquired (fence %s)", self.token.split(":")[0])
                elif not self._registry.renew_lease(self.token, self._ttl_s):
                    log.warning("trainer lease lost; another trainer leads now")
                    self.token = None
            except Exception as error:  # Redis unreachable: we cannot prove leadership, so give it up
                log.warning("trainer lease: %s", error)
                self.token = None
            self._metrics.trainer_leader.set(1 if self.token else 0)
            self._stop.wait(self._ttl_s / 3)


class Trainer:
    def __init__(self, settings: Settings, store: StateStore, registry: Registry, producer: KafkaProducer,
                 source_model, meta: ModelMeta, metrics: WorkerMetrics, lease: LeaseKeeper):
        self._settings = settings
        self._t = settings.training
        self._store, self._registry, self._producer = store, registry, producer
        self._source, self._meta, self._metrics, self._lease = source_model, meta, metrics, lease
        self._scorer = Scorer(source_model, meta)
        self._last_examples = store.examples_total()
        self._wanted_examples = settings.training.every_examples  # new examples that make the next round due
        self._last_run = time.monotonic()
        self._source_registered = False
        self._refused: set[str] = set()  # champions whose artifacts failed their checks
        self._progress_published = False  # since this trainer started: at its first look it says where it stands

    def run(self, stop: threading.Event) -> None:
        """Lead when the lease says so: a round whenever one is due, and every stored version announced.

        While Redis cannot answer, the round in hand is dropped and is due again once it does (the lease
        keeper gives the lease up meanwhile); a drift alarm it had already taken is not raised again, but the
        regime start it set stays in Redis. While Kafka refuses a version, the version stays in the registry's
        unannounced set, and the leader (this trainer, or the next one) announces it once Kafka takes it."""
        while not stop.is_set():
            token = self._lease.token
            if token is not None:
                last_round = self._last_run, self._last_examples, self._wanted_examples
                try:
                    if not self._source_registered:
                        self._register_source(token)
                    reason = self._due()
                    if reason:
                        slowest_s = self._slowest_s()
                        self._publish_progress(slowest_s, running=True)
                        self.run_once(token, reason)
                        self._announce()
                        self._publish_progress(slowest_s, running=False)
                    else:
                        self._announce()
                        if not self._progress_published:
                            self._publish_progress(self._slowest_s(), running=False)
                except REDIS_OUTAGE_ERRORS as error:
                    self._last_run, self._last_examples, self._wanted_examples = last_round
                    self._metrics.dependency_errors.labels("redis").inc()
                    log.warning("Redis cannot answer the trainer (%s: %s); trying again in %.0f s",
                                type(error).__name__, error, REDIS_RETRY_S)
                    stop.wait(REDIS_RETRY_S)
                except KafkaError as error:
                    self._metrics.dependency_errors.labels("kafka").inc()
                    log.warning("Kafka did not take a model version (%s: %s); announcing it again in %.0f s",
                                type(error).__name__, error, KAFKA_RETRY_S)
                    stop.wait(KAFKA_RETRY_S)
            stop.wait(TICK_S)

    def _slowest_s(self) -> float:
        slowest = self._store.slowest_partition_s(self._t.idle_partition_timeout_s)
        return float("-inf") if slowest is None else slowest

    def _publish_progress(self, through_s: float, running: bool) -> None:
        """Tell serving where this trainer began its last round (the stream's slowest partition, in event time),
        whether one runs, and when the next is due (streamadapt.core.pacing); after a round, its champion is
        announced by then."""
        self._registry.publish_progress(TrainerProgress(through_s, self._last_examples + self._wanted_examples, running))
        self._progress_published = True

    def _register_source(self, token: str) -> None:
        """The source checkpoint is version zero: in the registry, and champion when there is none."""
        if self._registry.get(self._meta.version) is None:
            artifact = encode_parameters(Parameters(self._source.get_weights()))
            record = self._record(self._meta.version, None, artifact, TrainedOn(examples=0), {}, True, None,
                                  "source checkpoint")
            self._registry.put(record, artifact)
        if self._registry.champion() is None:
            record = self._registry.get(self._meta.version)
            if self._registry.promote_if_leader(token, record):
                self._registry.mark_unannounced(record.version)  # champion now: announced again if it was before
        self._source_registered = True

    def _due(self) -> str | None:
        total = self._store.examples_total()
        if self._t.on_drift and self._store.take_drift_alarm():
            return "drift alarm"
        if total - self._last_examples >= self._wanted_examples:
            return f"{total - self._last_examples} new examples"
        if time.monotonic() - self._last_run >= self._t.every_s and total > self._last_examples:
            return f"{self._t.every_s:.0f} s elapsed"
        return None

    def run_once(self, token: str, reason: str) -> ModelVersion | None:
        """One fine-tune run; returns its model version, or None when it was skipped or failed."""
        with self._metrics.finetune_running.track_inprogress():
            return self._run_once(token, reason)

    def _fitting(self, stored: list[Example]) -> list[Example]:
        """The examples made for the source checkpoint's features and classes. Those of another (a deployment
        that changed its checkpoint, or its version's feature code, over the same Redis) are left out, with a
        warning, until their windows age out: they cannot be trained or judged on."""
        n_features, n_classes = self._meta.n_features, len(self._meta.classes)
        fitting = [e for e in stored if len(e.features) == n_features and len(e.probabilities) == n_classes]
        if len(fitting) < len(stored):
            log.warning("%d of %d stored examples were made for another checkpoint's features or classes (not %d "
                        "features and %d classes): left out", len(stored) - len(fitting), len(stored), n_features,
                        n_classes)
        return fitting

    def _run_once(self, token: str, reason: str) -> ModelVersion | None:
        started = time.monotonic()
        self._last_run, self._last_examples = started, self._store.examples_total()
        # repurchase: a negative is known once its partition's consumer settled it, not when the watermark passed
        now_watermark = (self._store.labels_watermark if self._meta.task == "repurchase" else self._store.watermark)(
            self._t.allowed_lateness_s, self._t.idle_partition_timeout_s)
        known_until = labels_known_until(self._meta.task, self._meta.horizon_days, now_watermark)
        self._expire_windows(known_until)
        regime_since_ts = self._store.regime_since_ts() if self._t.on_drift else None
        stored = self._fitting(self._store.recent_examples(
            self._t.max_examples, newest_trainable_ts(self._meta.task, self._meta.horizon_days, now_watermark)))
        examples = round_examples(stored, regime_since_ts, self._meta.task, self._meta.horizon_days, now_watermark,
                                  self._t.max_examples, self._t.min_examples)
        self._wanted_examples = examples_before_next_round(len(examples), self._t)
        if len(examples) < self._t.min_examples:
            log.info("fine-tune skipped (%s): %d examples%s < %d; next round after %d new ones", reason, len(examples),
                     f" since the drift estimated at {_utc(regime_since_ts).isoformat()}" if regime_since_ts is not None else "",
                     self._t.min_examples, self._wanted_examples)
            self._metrics.finetune_runs.labels("skipped").inc()
            return None
        champion_version, champion = self._champion(token)
        log.info("fine-tune (%s): %s on %d settled examples, champion %s", reason, self._t.strategy, len(examples),
                 champion_version)
        recent = (self._fitting(self._store.unsettled_examples(known_until, self._t.max_examples))
                  if self._meta.task == "repurchase" and known_until is not None else [])
        try:
            round_ = fine_tune_round(self._source, champion, examples, self._meta.task, len(self._meta.classes),
                                     self._t, self._scorer, recent=recent, watermark_s=now_watermark,
                                     horizon_days=self._meta.horizon_days)
        except FineTuneError as error:
            log.error("fine-tune failed: %s", error)
            self._metrics.finetune_runs.labels("failed").inc()
            return None
        decision = round_.decision
        artifact = encode_parameters(round_.parameters)
        version = f"v{self._registry.next_version_number()}"
        trained_on = TrainedOn(examples=round_.trained_examples, event_time_from=_utc(round_.trained_ts_s[0]),
                               event_time_to=_utc(round_.trained_ts_s[1]))
        strategy = self._t.strategy if round_.contender == "fine-tuned" else "recalibrate"
        record = self._record(version, champion_version, artifact, trained_on, round_.scores, False, strategy,
                              decision.reason)
        self._registry.put(record, artifact)
        if decision.promote:
            promoted = record.model_copy(update={"promoted": True})
            if self._registry.promote_if_leader(token, promoted):
                record = promoted
            else:
                log.warning("%s passed the gate but this trainer no longer holds the lease: not promoted", version)
        outcome = "promoted" if record.promoted else "rejected"
        self._metrics.finetune_runs.labels(outcome).inc()
        self._metrics.finetune_duration.observe(time.monotonic() - started)
        log.info("%s %s: %s", version, outcome, decision.reason)
        if round_.back_to_source:
            self._back_to_source(token, champion_version, decision.reason)
        self._prune_registry()
        return record

    def _prune_registry(self) -> None:
        """Keep the registry bounded: the champion, the source, the newest promoted versions and the rejected
        candidates of the last day (settings); a version not announced yet is kept until it is."""
        keep = {self._meta.version, self._registry.champion() or self._meta.version} | self._registry.unannounced_versions()
        dropped = versions_to_drop(self._registry.all(), keep, self._t.registry_keep_promoted,
                                   self._t.registry_keep_rejected_s, datetime.now(timezone.utc))
        if dropped:
            self._registry.drop(dropped)
            log.info("registry: dropped %d old versions (%s)", len(dropped), ", ".join(dropped))

    def _champion(self, token: str) -> tuple[str, Parameters | None]:
        """The champion's version and parameters (None: the source checkpoint). A champion whose artifact fails
        its checks is refused once, with the alert of a refused model, and the source becomes champion again:
        the fleet then serves a model it can verify, and the trainer does not stop on stored bytes."""
        version = self._registry.champion() or self._meta.version
        if version == self._meta.version or version in self._refused:
            return self._meta.version, None
        try:
            record = self._registry.get(version)
            if record is None:
                raise ArtifactError(f"champion {version} has no registry record")
            return version, self._registry.parameters(record)
        except ArtifactError as error:
            self._refused.add(version)
            self._metrics.swaps_refused.inc()
            log.error("champion %s cannot be used (%s): the source checkpoint is champion again", version, error)
            self._back_to_source(token, version, f"the artifact of {version} failed its checks")
            return self._meta.version, None

    def _back_to_source(self, token: str, champion_version: str, reason: str) -> None:
        """Make the source checkpoint champion again and announce it, as an operator's rollback would."""
        source = self._registry.get(self._meta.version)
        back = source.model_copy(update={"promoted": True, "decision": f"{reason} (was {champion_version})"})
        if self._registry.promote_if_leader(token, back):
            self._registry.mark_unannounced(back.version)
            log.warning("%s is champion again instead of %s: %s", back.version, champion_version, reason)
        else:
            log.warning("the source beat %s, but this trainer no longer holds the lease: not promoted", champion_version)

    def _expire_windows(self, known_until: float | None) -> None:
        """Drop the windows whose labels have all been known for longer than window_max_age_s. Aged from when
        their labels are known, not from the watermark: a repurchase horizon as long as the maximum age
        would otherwise drop every window before a round could use it."""
        sizes = self._store.expire_windows(known_until)
        self._metrics.windows.set(len(sizes))
        self._metrics.window_examples.set(sum(sizes.values()))

    def _record(self, version: str, parent: str | None, artifact: bytes, trained_on: TrainedOn,
                metrics: dict, promoted: bool, strategy: str | None, decision: str) -> ModelVersion:
        return ModelVersion(model=self._settings.model_name, version=version, parent_version=parent,
                            task=self._meta.task, source_checkpoint_sha256=self._meta.sha256,
                            created_at=datetime.now(timezone.utc), trained_on=trained_on, metrics=metrics,
                            promoted=promoted, artifact_sha256=hashlib.sha256(artifact).hexdigest(),
                            artifact_ref=self._registry.artifact_ref(version), strategy=strategy, decision=decision)

    def _announce(self) -> None:
        """Publish every stored version not yet on the model-versions topic, oldest first, each as the registry
        holds it now; a version leaves the unannounced set only once Kafka has acknowledged it."""
        for record in self._registry.unannounced():
            future = self._producer.send(self._settings.kafka.model_versions_topic, key=record.model.encode(),
                                         value=record.model_dump_json().encode())
            self._producer.flush(timeout=ANNOUNCE_TIMEOUT_S)
            future.get(timeout=ANNOUNCE_TIMEOUT_S)
            self._registry.mark_announced(record.version)


def _utc(ts_s: float) -> datetime:
    return utc_datetime(ts_s)
