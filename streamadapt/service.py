"""`streamadapt run`: open every client in one ExitStack, serve until SIGTERM, close in reverse order.

Roles: `worker` serves; `trainer` fine-tunes and promotes (one leads across the fleet); `all` serves and
runs a trainer in a child process of its own, so training never stalls the serving loop. With
`--no-finetune` only the serving path runs, on the source model, and model versions are not followed.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager

import redis
from kafka.errors import KafkaError
from redis.exceptions import RedisClusterException

from streamadapt.core.features import FeatureSpec
from streamadapt.kafka.admin import ensure_topics, max_message_bytes
from streamadapt.kafka.kafka_python import open_producer
from streamadapt.kafka.protocol import KafkaClientError
from streamadapt.kafka.serving_clients import open_serving_clients
from streamadapt.metrics import HealthServer, WorkerMetrics
from streamadapt.model.checkpoint import (
    ServingModel,
    features_for,
    limit_cpu_threads,
    load_checkpoint,
    read_metadata,
)
from streamadapt.serving.batch import BatchBuilder
from streamadapt.serving.hotswap import ModelFollower
from streamadapt.serving.loop import ServingLoop
from streamadapt.serving.pacing import Pacer
from streamadapt.serving.plan import DLQ_MIN_BYTES
from streamadapt.settings import Settings, SettingsError
from streamadapt.state.registry import Registry
from streamadapt.state.store import LayoutError, StateStore, WindowPolicy, connect

log = logging.getLogger(__name__)

READY_POLL_AGE_S = 30.0  # a serving loop that has not polled for this long is not ready
CHILD_RESTART_S = 10.0
TRAINER_NICENESS = 10  # added to the trainer process's niceness
# With --role all, how long serving counts its trainer child as there before it holds the lease (it loads
# TensorFlow first): a replay waits for it rather than running through before the trainer can look.
TRAINER_START_S = 120.0


class StartupError(RuntimeError):
    """A dependency the worker needs at start-up is unreachable; worded for the operator in one line."""


def run(settings: Settings, *, stop: threading.Event | None = None, handle_signals: bool = True) -> None:
    """Run the configured role until `stop` is set (SIGTERM and SIGINT set it when `handle_signals`)."""
    if settings.source_checkpoint is None:
        raise SettingsError("--source-checkpoint (STREAMADAPT_SOURCE_CHECKPOINT) is required: "
                            "create one with `streamadapt pretrain`")
    if settings.role == "trainer" and settings.no_finetune:
        raise SettingsError("--role trainer with --no-finetune has nothing to do")
    stop = stop or threading.Event()
    log.info("starting role %s with %s", settings.role, settings.describe())
    with ExitStack() as stack:
        if handle_signals:
            stack.enter_context(_stop_on_signals(stop))
        metrics = WorkerMetrics()
        # the plug-in first: a checkpoint pretrained with other features stops start-up before any client opens
        features = features_for(read_metadata(settings.source_checkpoint), settings.features)
        redis_client = stack.enter_context(closing(_connect_redis(settings)))
        store = StateStore(redis_client, settings.redis, WindowPolicy.of(settings.training), features)
        registry = Registry(redis_client, settings.redis.key_prefix, settings.model_name)
        ready = _Readiness(store)
        server = stack.enter_context(HealthServer(metrics, settings.metrics.host, settings.metrics.port, ready))
        metrics.ready.set_function(lambda: 1.0 if ready() else 0.0)
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", settings.metrics.host, server.port)
        if settings.role == "trainer":
            # Fine-tuning yields the CPU to serving on a shared host: fewer threads, and a lower priority.
            limit_cpu_threads(settings.training.threads)
            os.nice(TRAINER_NICENESS)
            source_model, meta = load_checkpoint(settings.source_checkpoint)  # Keras, to fine-tune
        else:
            model = ServingModel.from_checkpoint(settings.source_checkpoint)  # NumPy: no TensorFlow to import
            meta = model.meta
        log.info("source model %s (%s, %d classes)", meta.version, meta.task, len(meta.classes))
        if settings.role != "trainer" and (warning := user_state_ttl_warning(settings.redis.user_state_ttl_s,
                                                                                meta.feature_spec)):
            log.warning("%s", warning)
        _check_redis(store, settings)
        k = settings.kafka
        with _kafka_client_warnings() as client_trouble:
            try:
                ensure_topics(k, [k.input_topic, k.predictions_topic, k.dlq_topic, k.model_versions_topic],
                                       single_partition=(k.model_versions_topic,))
                if settings.role == "trainer":  # publishes model versions only: never transactional
                    trainer_producer = open_producer(k)
                    stack.callback(trainer_producer.close, timeout=30)
                else:
                    limits = max_message_bytes(k, [k.predictions_topic, k.dlq_topic])
                    dlq_max_bytes = _dead_letter_bound(settings, limits.get(k.dlq_topic))
                    transactional_id = k.effective_transactional_id(socket.gethostname()) if k.exactly_once else None
                    # the broker's limit is on a batch of records: the producer's batches must fit every output topic
                    smallest = min(limits.values(), default=None)
                    consumer, producer = open_serving_clients(
                        k, transactional_id, None if smallest is None else smallest - RECORD_OVERHEAD_BYTES)
                    stack.callback(producer.close)
                    stack.callback(consumer.close)
                    log.info("serving clients on %s%s", k.client, f"; exactly-once, each batch one transaction of "
                             f"transactional id {transactional_id}" if transactional_id is not None else "")
            except (KafkaError, KafkaClientError) as error:
                raise StartupError(f"cannot reach Kafka at {k.bootstrap}: {error}{_cause(client_trouble)}") from error
        if settings.role == "trainer":
            _run_trainer(settings, stack, store, registry, trainer_producer, source_model, meta, metrics, ready, stop)
            return
        follower = None
        if not settings.no_finetune:
            follower = stack.enter_context(ModelFollower(k, registry, model.version, metrics))
            if settings.role == "all":
                stack.enter_context(_child(settings, "trainer", {"STREAMADAPT_ROLE": "trainer",
                                                                 "STREAMADAPT_METRICS_PORT": _child_metrics_port(settings, 1)},
                                           stop))
        else:
            log.info("--no-finetune: serving the source model unchanged and not following model versions")
        for index in range(1, settings.processes):  # more members of the consumer group, one serving thread each
            stack.enter_context(_child(settings, f"serving-{index}", {
                "STREAMADAPT_ROLE": "worker", "STREAMADAPT_PROCESSES": "1",
                "STREAMADAPT_METRICS_PORT": _child_metrics_port(settings, 1 + index),
                "STREAMADAPT_KAFKA_TRANSACTIONAL_ID": f"{transactional_id}-{index}" if transactional_id else ""}, stop))
        builder = BatchBuilder(settings, store, model, features, dlq_max_bytes)
        pacer = None
        if not settings.no_finetune and settings.training.max_lag_s > 0:
            t = settings.training
            pacer = Pacer(store, registry, t.max_lag_s, t.idle_partition_timeout_s, t.every_examples, metrics,
                          trainer_starting_s=TRAINER_START_S if settings.role == "all" else 0.0,
                          rounds_on_drift=t.on_drift)
        loop = ServingLoop(settings, consumer, producer, builder, model, metrics, follower, store.raise_drift_alarm,
                           pacer)
        ready.polled = lambda: loop.last_poll_ok_monotonic
        ready.paused = lambda: loop.paused
        ready.stalled = lambda: loop.stalled
        # What start-up created lives as long as the process: frozen, the collector never walks it again,
        # and objects created from here on are collected as usual. The loop's objects are freed by reference
        # counting, so frequent young collections would find next to nothing at a cost on every event;
        # 50k net allocations between them keeps memory bounded all the same.
        gc.freeze()
        gc.set_threshold(50_000)
        log.info("consuming %s as group %s", k.input_topic, k.group_id)
        loop.run(stop)
        log.info("stopping: last batch committed, closing clients")


# What kafka-python only logs while it retries (then it reports a bare timeout): worth the error line.
_KAFKA_CAUSE = re.compile(r"(\w*(?:Authentication|Authorization|SSL|Certificate)\w*Error: .*?)(?: \(backoff [^)]*\))?$",
                          re.IGNORECASE)
_REPEATED_ERROR_NAME = re.compile(r"\b(\w+Error: )\1+")  # kafka-python names some errors twice


@contextmanager
def _kafka_client_warnings() -> Iterator[list[str]]:
    """Collect the warnings kafka-python logs while the clients start (it retries a failed SASL or TLS
    handshake until it times out, and the timeout alone does not say why)."""
    seen: list[str] = []

    class Remember(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING and len(seen) < 100:
                seen.append(record.getMessage())

    handler, kafka_logger = Remember(), logging.getLogger("kafka")
    kafka_logger.addHandler(handler)
    try:
        yield seen
    finally:
        kafka_logger.removeHandler(handler)


def _cause(warnings: list[str]) -> str:
    """The last handshake error among kafka-python's warnings, as " (Error: why)", or "" when none was logged."""
    for message in reversed(warnings):
        found = _KAFKA_CAUSE.search(message)
        if found:
            return " (" + _REPEATED_ERROR_NAME.sub(r"\1", found.group(1)) + ")"
    return ""


def _run_trainer(settings, stack, store, registry, producer, source_model, meta, metrics, ready, stop) -> None:
    from streamadapt.training.trainer import LeaseKeeper, Trainer

    lease = stack.enter_context(LeaseKeeper(registry, settings.training.lease_ttl_s, metrics))
    trainer = Trainer(settings, store, registry, producer, source_model, meta, metrics, lease)
    ready.polled = time.monotonic  # the trainer reads no topic; it is ready once Redis answers
    log.info("trainer running (strategy %s); one trainer leads across the fleet", settings.training.strategy)
    trainer.run(stop)


class _Readiness:
    """Ready = model loaded, Redis answers and (for the serving role) Kafka was polled recently, the loop
    is not paused by an outage of Redis or Kafka, and its consumer has not stalled."""

    def __init__(self, store: StateStore):
        self._store = store
        self.polled: Callable[[], float | None] = lambda: None
        self.paused: Callable[[], bool] = lambda: False
        self.stalled: Callable[[], bool] = lambda: False

    def __call__(self) -> bool:
        last = self.polled()
        if last is None or time.monotonic() - last > READY_POLL_AGE_S or self.paused() or self.stalled():
            return False
        try:
            return self._store.ping()
        except redis.RedisError:
            return False


def user_state_ttl_warning(ttl_s: int, spec: FeatureSpec) -> str | None:
    """What to tell the operator when user states expire (in wall-clock time) before the model forgets an idle
    user (in event time): in real time, a customer who comes back in between looks new to the model, which
    pretraining remembered. None when the TTL covers the memory."""
    if math.isinf(spec.memory_s) or ttl_s >= spec.memory_s:
        return None
    return (f"--redis-user-state-ttl-s is {ttl_s / 86400:g} days, shorter than the model's memory of an idle user "
            f"({spec.user_memory_days:g} days): a customer who comes back in between will look new to the model, "
            f"which pretraining remembered; raise it to {math.ceil(spec.memory_s)} or more")


# What a record batch of one record takes beyond its key and value (headers, lengths, CRC), with room to spare.
RECORD_OVERHEAD_BYTES = 512


def _dead_letter_bound(settings: Settings, topic_max_bytes: int | None) -> int:
    """How large a dead letter may be: --dlq-max-bytes, less if the dead-letter topic accepts less."""
    bound = settings.dlq_max_bytes
    if topic_max_bytes is not None and topic_max_bytes - RECORD_OVERHEAD_BYTES < bound:
        bound = topic_max_bytes - RECORD_OVERHEAD_BYTES
        if bound < DLQ_MIN_BYTES:
            raise SettingsError(f"topic {settings.kafka.dlq_topic} accepts records of at most {topic_max_bytes} bytes "
                                f"(max.message.bytes); a dead letter needs {DLQ_MIN_BYTES + RECORD_OVERHEAD_BYTES}")
        log.info("dead letters cut to %d bytes: topic %s accepts %d (max.message.bytes)", bound,
                 settings.kafka.dlq_topic, topic_max_bytes)
    return bound


def _connect_redis(settings: Settings) -> redis.Redis | redis.RedisCluster:
    """A Redis client; a cluster's is made by asking the node in the URL for the others."""
    try:
        return connect(settings.redis)
    except (redis.RedisError, RedisClusterException) as error:
        hint = " (is it a Redis Cluster? unset STREAMADAPT_REDIS_CLUSTER if not)" if settings.redis.cluster else ""
        raise StartupError(f"cannot reach Redis at {settings.redis.masked_url()}: {error}{hint}") from error


def _check_redis(store: StateStore, settings: Settings) -> None:
    """Redis answers, and holds data of the same key layout (or none yet)."""
    try:
        store.ping()
        store.check_layout()
    except redis.exceptions.MovedError as error:
        raise StartupError(f"Redis at {settings.redis.masked_url()} is a Redis Cluster: set STREAMADAPT_REDIS_CLUSTER=true "
                           f"({error})") from error
    except redis.RedisError as error:
        raise StartupError(f"cannot reach Redis at {settings.redis.masked_url()}: {error}") from error
    except LayoutError as error:
        raise StartupError(str(error)) from error


@contextmanager
def _child(settings: Settings, name: str, overrides: dict[str, str], stop: threading.Event) -> Iterator[None]:
    """`streamadapt run` with `overrides` as a child process, restarted if it dies, stopped with us."""
    env = {**os.environ, **settings.as_environment(), **overrides}
    command = [sys.executable, "-m", "streamadapt.cli", "run"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(command, env=env, preexec_fn=_terminate_with_parent)

    holder: dict[str, subprocess.Popen] = {"process": start()}
    log.info("%s child started (pid %d, metrics port %s)", name, holder["process"].pid, env["STREAMADAPT_METRICS_PORT"])
    done = threading.Event()

    def supervise() -> None:
        while not done.wait(1.0):
            if holder["process"].poll() is not None and not stop.is_set():
                log.error("%s child exited with %s; restarting in %.0f s", name, holder["process"].returncode,
                          CHILD_RESTART_S)
                if done.wait(CHILD_RESTART_S):
                    return
                holder["process"] = start()

    thread = threading.Thread(target=supervise, name=f"{name}-supervisor", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)
        process = holder["process"]
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _child_metrics_port(settings: Settings, offset: int) -> str:
    """A child's metrics port: the worker's plus `offset` (1 for the trainer, 2 and up for serving processes);
    0 (none) when the worker's is 0."""
    return str(settings.metrics.port + offset if settings.metrics.port else 0)


def _terminate_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the parent dies, even by SIGKILL, so no
    trainer outlives its worker unsupervised. Elsewhere this is a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    def request_stop(signum, _frame) -> None:
        log.info("received %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
