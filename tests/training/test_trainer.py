"""The trainer's announcements against the real Redis of the dev stack, with a producer that plays a broker
that is away: a model version Kafka does not take stays due, and is announced once Kafka takes it, by the
same trainer or by the next leader."""
import dataclasses
import hashlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import redis
from kafka.errors import KafkaTimeoutError

from streamadapt.core.examples import Example
from streamadapt.metrics import WorkerMetrics
from streamadapt.model.checkpoint import load_checkpoint
from streamadapt.ops.operator import models_command
from streamadapt.schemas import ModelVersion
from streamadapt.settings import load_settings
from streamadapt.state.registry import Registry
from streamadapt.state.store import StateStore, StateWrites
from streamadapt.training import trainer as trainer_module
from streamadapt.training.trainer import Trainer


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


def test_a_repurchase_horizon_as_long_as_the_windows_max_age_leaves_the_trainer_its_examples(stack, names, checkpoint,
                                                                                            caplog):
    """Windows age from when their labels are all known: for repurchase, a horizon behind the watermark. Aged
    from the watermark itself, a 30-day horizon and 30-day windows left a round one day of examples."""
    day = 86400.0
    settings = load_settings({**names.env(stack), "STREAMADAPT_TRAINING_MIN_EXAMPLES": "100000"})
    client = redis.Redis.from_url(stack.redis_url)
    store, registry = StateStore(client, settings.redis), Registry(client, names.key_prefix, settings.model_name)
    model, meta = load_checkpoint(checkpoint)
    meta = dataclasses.replace(meta, task="repurchase", horizon_days=30.0)
    lateness_s = settings.training.allowed_lateness_s
    n_features, n_classes = meta.feature_spec.n_features, len(meta.classes)
    stored = [Example(f"e{d}", d * day, "v1", np.zeros(n_features, np.float32), np.full(n_classes, 1 / n_classes,
                                                                                       np.float32), 0,
                      (d + 30) * day) for d in range(71)]
    stored.append(stored[-1]._replace(event_id="newer", ts_s=70 * day + lateness_s / 2))  # past the watermark
    # examples made for another checkpoint's features (an earlier source, or feature code): never trained on
    stored += [e._replace(event_id=f"other-{e.event_id}", features=np.zeros(3, np.float32)) for e in stored[30:45]]
    store.save(StateWrites(examples=[(f"u{i}", e) for i, e in enumerate(stored)], newest_by_partition={"in/0": 70 * day + lateness_s}))
    lease = SimpleNamespace(token=registry.acquire_lease(ttl_s=60))
    trainer = Trainer(settings, store, registry, AwayBroker(back=True), model, meta, WorkerMetrics(), lease)
    with caplog.at_level("INFO", logger="streamadapt.training.trainer"):
        assert trainer.run_once(lease.token, "test") is None  # skipped: fewer than min_examples
    # labels known up to day 40; the windows that ended 30 days or more before that (days 0 to 9) went
    assert sorted(store.window_sizes()) == [int(d * day) for d in range(10, 71)]
    assert "fine-tune skipped (test): 30 examples" in caplog.text  # days 10 to 39: day 40's deadline is the watermark
    # of the others, days 30 to 40 are read (the rest are newer than a round may take)
    assert "11 of 42 stored examples were made for another checkpoint's features" in caplog.text

    # next_category labels carry no deadline: a round takes examples newer than the watermark too, and
    # windows age from the watermark itself (days 40 to 70 and the newer one are left)
    caplog.clear()
    next_category = Trainer(settings, store, registry, AwayBroker(back=True), model, load_checkpoint(checkpoint)[1],
                            WorkerMetrics(), lease)
    with caplog.at_level("INFO", logger="streamadapt.training.trainer"):
        assert next_category.run_once(lease.token, "test") is None
    assert "fine-tune skipped (test): 32 examples" in caplog.text
    registry.release_lease(lease.token)
    client.close()


def test_a_champion_the_source_beats_on_the_newest_holdout_hands_the_fleet_back_to_the_source(stack, names, checkpoint,
                                                                                               tmp_path):
    """A promoted version gone bad, and a round whose candidate is no better: the trainer makes the source
    checkpoint champion again and announces it, as an operator's rollback would."""
    from streamadapt.model.checkpoint import Parameters
    from streamadapt.ops.generate import write_events
    from streamadapt.state.registry import encode_parameters
    from streamadapt.training.finetune import head_layers
    from streamadapt.training.pretrain import build_examples, read_events

    settings = load_settings({**names.env(stack), "STREAMADAPT_TRAINING_EPOCHS": "2"})
    client = redis.Redis.from_url(stack.redis_url)
    store, registry = StateStore(client, settings.redis), Registry(client, names.key_prefix, settings.model_name)
    model, meta = load_checkpoint(checkpoint)
    write_events(tmp_path / "target.jsonl", events=3000, market="target", seed=8)
    examples = build_examples(read_events(tmp_path / "target.jsonl")[0], meta.feature_spec, "next_category", 7.0)
    n = len(examples.labels)
    # the older 80 % (what the candidate trains on) all labelled with one class: the candidate learns nonsense
    store.save(StateWrites(examples=[(f"u{i}", Example(f"e{i}", float(examples.ts_s[i]), "v1", examples.features[i],
                                                       np.zeros(len(meta.classes), np.float32),
                                                       0 if i < int(n * 0.8) else int(examples.labels[i]),
                                                       float(examples.ts_s[i])))
                                     for i in range(n)]))
    lease = SimpleNamespace(token=registry.acquire_lease(ttl_s=60))
    broker = AwayBroker(back=True)
    trainer = Trainer(settings, store, registry, broker, model, meta, WorkerMetrics(), lease)
    trainer._register_source(lease.token)
    head = {id(w) for name in head_layers(model) for w in model.get_layer(name).weights}
    bad = [np.random.default_rng(1).normal(0.0, 1.0, w.shape).astype(np.float32) if id(v) in head else w
           for v, w in zip(model.weights, model.get_weights())]
    artifact, version = encode_parameters(Parameters(bad)), f"v{registry.next_version_number()}"  # v1; the round's: v2
    gone_bad = registry.get(meta.version).model_copy(update={
        "version": version, "parent_version": meta.version, "artifact_ref": registry.artifact_ref(version),
        "artifact_sha256": hashlib.sha256(artifact).hexdigest()})
    registry.put(gone_bad, artifact)
    assert registry.promote_if_leader(lease.token, gone_bad) and registry.champion() == "v1"

    record = trainer.run_once(lease.token, "test")
    assert record.version == "v2" and not record.promoted and record.decision.startswith("back to the source checkpoint")
    assert registry.champion() == meta.version
    source = registry.get(meta.version)
    assert source.promoted and "(was v1)" in source.decision
    trainer._announce()
    announced = {v.version: v for v in (ModelVersion.model_validate_json(value) for _, _, value in broker.delivered)}
    assert announced[meta.version].promoted and "(was v1)" in announced[meta.version].decision  # replicas swap back
    registry.release_lease(lease.token)
    client.close()


def test_a_champion_whose_artifact_fails_its_checks_is_refused_once_and_the_source_is_champion_again(stack, names,
                                                                                                     checkpoint):
    settings = load_settings({**names.env(stack), "STREAMADAPT_TRAINING_EPOCHS": "1"})
    client = redis.Redis.from_url(stack.redis_url)
    store, registry = StateStore(client, settings.redis), Registry(client, names.key_prefix, settings.model_name)
    model, meta = load_checkpoint(checkpoint)
    lease = SimpleNamespace(token=registry.acquire_lease(ttl_s=60))
    metrics = WorkerMetrics()
    trainer = Trainer(settings, store, registry, AwayBroker(back=True), model, meta, metrics, lease)
    trainer._register_source(lease.token)
    corrupt = registry.get(meta.version).model_copy(update={
        "version": "v1", "parent_version": meta.version, "artifact_ref": registry.artifact_ref("v1"),
        "artifact_sha256": "0" * 64})  # the bytes stored do not match it
    registry.put(corrupt, b"not the artifact the record names")
    assert registry.promote_if_leader(lease.token, corrupt) and registry.champion() == "v1"

    assert trainer._champion(lease.token) == (meta.version, None)
    assert trainer._champion(lease.token) == (meta.version, None)  # refused once, not at every round
    assert metrics.total("streamadapt_model_swaps_refused_total") == 1
    assert registry.champion() == meta.version and "v1" in registry.get(meta.version).decision
    registry.release_lease(lease.token)
    client.close()
