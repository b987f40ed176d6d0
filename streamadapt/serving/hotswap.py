"""Follow the champion: every replica swaps to the version the registry names, without pausing serving.

A background thread listens on the model-versions topic (every replica reads every message) and also
checks the registry's champion pointer every few seconds, so a missed message or a rollback is caught
up. It fetches the artifact and verifies its sha256 off the serving thread; the serving loop calls
swap_ready() between batches, which swaps the weights in (ServingModel.swap refuses other shapes and
replaces the weight list its NumPy forward pass reads).
"""
from __future__ import annotations

import logging
import threading
import time

from kafka import KafkaConsumer, TopicPartition

from streamadapt.kafka.kafka_python import client_options
from streamadapt.metrics import WorkerMetrics
from streamadapt.model.checkpoint import Parameters, ServingModel
from streamadapt.settings import KafkaSettings
from streamadapt.state.registry import ArtifactError, Registry

log = logging.getLogger(__name__)

CHAMPION_CHECK_S = 5.0


class ModelFollower:
    def __init__(self, kafka: KafkaSettings, registry: Registry, current_version: str, metrics: WorkerMetrics):
        self._kafka = kafka
        self._registry = registry
        self._target = current_version
        self._metrics = metrics
        self._refused: set[str] = set()
        self._ready: tuple[str, Parameters] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-follower", daemon=True)

    def __enter__(self) -> ModelFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def take(self) -> tuple[str, Parameters] | None:
        """The verified parameters of a new champion, once; None when there is nothing new."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def swap_ready(self, model: ServingModel) -> None:
        """Serve the new champion with `model`, if one is ready (called by the serving thread, between batches).
        Parameters that do not fit the model are refused and counted; the current version keeps serving."""
        ready = self.take()
        if ready is None:
            return
        version, parameters = ready
        started = time.perf_counter()
        try:
            model.swap(parameters, version)
        except ValueError as error:
            self._metrics.swaps_refused.inc()
            log.error("refusing model %s, the current model keeps serving: %s", version, error)
            return
        self._metrics.swap_duration.observe(time.perf_counter() - started)
        self._metrics.model_swaps.inc()
        self._metrics.model_info.info({"model_version": version, "task": model.meta.task})
        log.info("now serving model %s (swap took %.2f ms)", version, (time.perf_counter() - started) * 1000)

    def _run(self) -> None:
        consumer = None
        next_check = 0.0
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._open_consumer()
                announced = bool(consumer.poll(timeout_ms=500)) if consumer is not None else False
                if consumer is None:
                    self._stop.wait(0.5)
                if announced or time.monotonic() >= next_check:
                    self._sync()
                    next_check = time.monotonic() + CHAMPION_CHECK_S
            except Exception as error:  # the follower must outlive broker or Redis hiccups
                log.warning("model follower: %s", error)
                self._stop.wait(1.0)
        if consumer is not None:
            consumer.close()

    def _open_consumer(self) -> KafkaConsumer | None:
        consumer = KafkaConsumer(**client_options(self._kafka, "follower"), enable_auto_commit=False,
                                 group_id=None)
        partitions = consumer.partitions_for_topic(self._kafka.model_versions_topic)
        if not partitions:
            consumer.close()
            return None
        assigned = [TopicPartition(self._kafka.model_versions_topic, p) for p in partitions]
        consumer.assign(assigned)
        consumer.seek_to_end(*assigned)  # the registry says where we stand; messages only wake us up
        return consumer

    def _sync(self) -> None:
        champion = self._registry.champion()
        if champion is None or champion == self._target or champion in self._refused:
            return
        record = self._registry.get(champion)
        try:
            if record is None:
                raise ArtifactError(f"champion {champion} has no registry record")
            parameters = self._registry.parameters(record)  # checks the sha256; ServingModel.swap checks the shapes
        except ArtifactError as error:
            self._refused.add(champion)
            self._metrics.swaps_refused.inc()
            log.error("refusing model %s, the current model keeps serving: %s", champion, error)
            return
        with self._lock:
            self._ready = (champion, parameters)
        self._target = champion
        log.info("model %s verified (sha256 %s…), swapping in", champion, record.artifact_sha256[:12])
