"""`streamadapt run`: open every client in one ExitStack, serve until SIGTERM, close in reverse order."""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager

import redis
from kafka.errors import KafkaError

from worker import kafka_io
from worker.metrics import HealthServer, WorkerMetrics
from worker.model import ServingModel
from worker.serving import ServingLoop
from worker.settings import Settings, SettingsError
from worker.state import StateStore, connect

log = logging.getLogger(__name__)

READY_POLL_AGE_S = 30.0  # a serving loop that has not polled for this long is not ready


class StartupError(RuntimeError):
    """A dependency the worker needs at start-up is unreachable; worded for the operator in one line."""


def run(settings: Settings, *, stop: threading.Event | None = None, handle_signals: bool = True) -> None:
    """Serve until `stop` is set (SIGTERM and SIGINT set it when `handle_signals`).

    The batch in flight when the signal arrives is finished and committed before the process exits.
    """
    if settings.role == "trainer":
        raise SettingsError("--role trainer is not available yet: fine-tuning is not implemented in this version")
    if settings.source_checkpoint is None:
        raise SettingsError("--source-checkpoint (STREAMADAPT_SOURCE_CHECKPOINT) is required: "
                            "create one with `streamadapt pretrain`")
    if not settings.no_finetune:
        log.warning("fine-tuning is not implemented yet: serving the source checkpoint unchanged (as --no-finetune)")
    stop = stop or threading.Event()
    log.info("starting with\n%s", settings.describe())
    holder: dict[str, ServingLoop] = {}

    with ExitStack() as stack:
        metrics = WorkerMetrics()
        redis_client = stack.enter_context(closing(connect(settings.redis)))
        store = StateStore(redis_client, settings.redis)

        def is_ready() -> bool:
            loop = holder.get("loop")
            if loop is None or loop.last_poll_ok_monotonic is None:
                return False
            if time.monotonic() - loop.last_poll_ok_monotonic > READY_POLL_AGE_S:
                return False
            try:
                return store.ping()
            except redis.RedisError:
                return False

        server = stack.enter_context(HealthServer(metrics, settings.metrics.host, settings.metrics.port, is_ready))
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", settings.metrics.host, server.port)
        model = ServingModel.from_checkpoint(settings.source_checkpoint)
        log.info("serving model %s (%s, %d classes)", model.version, model.meta.task, len(model.meta.classes))
        try:
            store.ping()
        except redis.RedisError as error:
            raise StartupError(f"cannot reach Redis at {settings.redis.masked_url()}: {error}") from error
        k = settings.kafka
        try:
            kafka_io.ensure_topics(k, [k.input_topic, k.predictions_topic, k.dlq_topic])
            producer = kafka_io.open_producer(k)
            stack.callback(producer.close, timeout=30)
            consumer = kafka_io.open_consumer(k)
            stack.callback(consumer.close)
        except KafkaError as error:
            raise StartupError(f"cannot reach Kafka at {k.bootstrap}: {error}") from error
        if handle_signals:
            stack.enter_context(_stop_on_signals(stop))
        holder["loop"] = loop = ServingLoop(settings, consumer, producer, store, model, metrics)
        metrics.ready.set_function(lambda: 1.0 if is_ready() else 0.0)
        log.info("consuming %s as group %s", k.input_topic, k.group_id)
        loop.run(stop)
        log.info("stopping: last batch committed, closing clients")


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
