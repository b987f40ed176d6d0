"""The trainer's announcements against the real Redis of the dev stack, with a producer that plays a broker
that is away: a model version Kafka does not take stays due, and is announced once Kafka takes it, by the
same trainer or by the next leader."""
import threading
import time
from types import SimpleNamespace

import redis
from kafka.errors import KafkaTimeoutError

from worker import trainer as trainer_module
from worker.metrics import WorkerMetrics
from worker.model import load_checkpoint
from worker.operator import models_command
from worker.registry import Registry
from worker.settings import load_settings
from worker.state import StateStore
from worker.trainer import Trainer


class AwayBroker:
    """A producer whose flushes time out, as kafka-python's do while the broker is away, until `back` is set."""

    def __init__(self, back: bool = False):
        self.back = back
        self.refused = 0
        self.delivered: list[tuple[str, bytes, bytes]] = []
        self._buffered: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes):
        self._buffered.append((topic, key, value))
        return SimpleNamespace(get=lambda timeout: None)

    def flush(self, timeout: float) -> None:
        if not self.back:
            self.refused += 1
            self._buffered.clear()
            raise KafkaTimeoutError(f"Failed to flush buffered records within {timeout} secs")
        self.delivered += self._buffered
        self._buffered.clear()


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def announced_column(listing: str, version: str) -> str:
    """The `announced` column of `streamadapt models list` for `version`."""
    header, *rows = listing.splitlines()
    column = header.split().index("announced")
    return next(row[1:].split()[column] for row in rows if row[1:].split()[0] == version)


def test_a_version_kafka_refuses_is_announced_once_kafka_takes_it(stack, names, checkpoint, monkeypatch):
    monkeypatch.setattr(trainer_module, "KAFKA_RETRY_S", 0.2)
    monkeypatch.setattr(trainer_module, "TICK_S", 0.05)
    settings = load_settings(names.env(stack))
    client = redis.Redis.from_url(stack.redis_url)
    registry = Registry(client, names.key_prefix, settings.model_name)
    model, meta = load_checkpoint(checkpoint)
    lease = SimpleNamespace(token=registry.acquire_lease(ttl_s=60))
    metrics, producer, stop = WorkerMetrics(), AwayBroker(), threading.Event()
    trainer = Trainer(settings, StateStore(client, settings.redis), registry, producer, model, meta, metrics, lease)
    thread = threading.Thread(target=trainer.run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: producer.refused >= 3, 10, "three refused announcements")
        assert thread.is_alive(), "the trainer ended on a Kafka error"
        assert registry.champion() == meta.version  # the source checkpoint was registered all the same
        assert [r.version for r in registry.unannounced()] == [meta.version]
        assert metrics.registry.get_sample_value("streamadapt_dependency_errors_total", {"dependency": "kafka"}) >= 3
        assert announced_column(models_command(settings, "list", None), meta.version) == "no"
        producer.back = True
        wait_until(lambda: producer.delivered, 10, "the announcement once Kafka takes it")
        assert announced_column(models_command(settings, "list", None), meta.version) == "yes"
    finally:
        stop.set()
        thread.join(timeout=10)
    topic, key, value = producer.delivered[0]
    announced = registry.get(meta.version)
    assert (topic, key, value) == (names.model_versions_topic, b"purchases", announced.model_dump_json().encode())
    assert announced.promoted and registry.unannounced() == []
    assert len(producer.delivered) == 1, "a version acknowledged once is announced once"

    # A version stored by a leader that died before Kafka took it is announced by the next leader.
    stored = announced.model_copy(update={"version": "v1", "promoted": False})
    registry.put(stored, b"weights")
    successor = AwayBroker(back=True)
    stop.clear()
    thread = threading.Thread(target=Trainer(settings, StateStore(client, settings.redis), registry, successor, model,
                                             meta, WorkerMetrics(), lease).run, args=(stop,))
    thread.start()
    try:
        wait_until(lambda: successor.delivered, 10, "the next leader's announcement")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [value for _, _, value in successor.delivered] == [stored.model_dump_json().encode()]
    registry.release_lease(lease.token)
    client.close()
