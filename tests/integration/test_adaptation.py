"""Adaptation end to end on the real stack: label join, trainer, gate, registry, hot-swap, rollback."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
import redis
from kafka import KafkaProducer

from benchmarks.evaluation import score_predictions, stream_labels
from streamadapt.model.checkpoint import Parameters, load_checkpoint
from streamadapt.ops.replay import replay
from streamadapt.schemas import ModelVersion, Prediction
from streamadapt.settings import KafkaSettings
from streamadapt.state.registry import Registry, encode_parameters
from streamadapt.state.store import StateStore
from streamadapt.training.pretrain import read_events
from tests.conftest import new_names
from tests.integration.conftest import (
    WorkerProcess,
    dumps,
    event,
    produce,
    put_version,
    read_topic,
)

pytestmark = pytest.mark.integration

ADAPTATION_MARGIN = 0.03  # accuracy points adapted serving must gain over static serving after the drift


def trainer_leads(worker: WorkerProcess) -> bool:
    """Whether the trainer child of a `--role all` worker (metrics on the next port) holds the lease."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.port + 1}/metrics", timeout=2) as response:
            return "streamadapt_trainer_leader 1.0" in response.read().decode()
    except OSError:
        return False


@pytest.mark.timeout(600)  # every round is waited for, on one trainer thread: minutes on a loaded machine
def test_a_drifting_stream_replayed_at_full_speed_is_served_adapted_after_the_drift(stack, checkpoint, tmp_path):
    """The whole stream goes into Kafka at once, as a replayed log or a backlog would. Its events are from
    2025, so the worker paces it (streamadapt.core.pacing): its partitions wait for the trainer's rounds,
    and served accuracy after the drift beats the source's. Without pacing the worker served the whole
    stream before its trainer's first round ended."""
    from streamadapt.ops.generate import write_events

    events_path, total, drift_at, settle = tmp_path / "target.jsonl", 24_000, 8_000, 5_000
    write_events(events_path, events=total, market="target", drift_at=drift_at, seed=12)
    events, _ = read_events(events_path)
    labels = stream_labels(events, "next_category")
    position = {e.event_id: i for i, e in enumerate(events)}
    quality = {}
    for mode in ("adapted", "static"):
        names = new_names()
        # a round every 4,000 labels, twice the default: half as many rounds to wait for
        env = {"STREAMADAPT_NO_FINETUNE": "true"} if mode == "static" else {
            "STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "all", "STREAMADAPT_TRAINING_EVERY_EXAMPLES": "4000"}
        kafka = KafkaSettings(bootstrap=stack.kafka_bootstrap, input_topic=names.input_topic)
        with WorkerProcess(stack, names, checkpoint, tmp_path / f"{mode}.log", **env) as worker:
            replay(events_path, kafka, None)
            records = read_topic(stack, names.predictions_topic, expect=total, timeout_s=450)
            if mode == "adapted":
                rounds_waited_for = worker.metric('streamadapt_pacing_pauses_total{reason="round"}')
                promoted = worker.metric("streamadapt_model_swaps_total")
            assert worker.stop() == 0
        predictions = [Prediction.model_validate_json(r.value) for r in records]
        assert len({p.event_id for p in predictions}) == total
        after = [p for p in predictions if position[p.event_id] >= drift_at + settle]
        quality[mode] = score_predictions(after, labels, "next_category")["accuracy"]
    print(f"accuracy from event {drift_at + settle} on: static {quality['static']:.4f}, adapted "
          f"{quality['adapted']:.4f}; partitions paused for a round {rounds_waited_for:.0f} times, {promoted:.0f} swaps")
    assert rounds_waited_for > 0 and promoted > 0
    assert quality["adapted"] >= quality["static"] + ADAPTATION_MARGIN, quality


def test_two_replicas_follow_promotions_refuse_a_tampered_artifact_and_roll_back(stack, checkpoint, tmp_path):
    names = new_names()
    model, meta = load_checkpoint(checkpoint)
    client = redis.Redis.from_url(stack.redis_url)
    registry = Registry(client, names.key_prefix, "purchases")
    source = meta.version
    put_version(registry, source, model.get_weights(), meta.sha256, promoted=True)
    registry.set_champion(source)
    env = {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "worker"}
    replicas = [WorkerProcess(stack, names, checkpoint, tmp_path / f"replica{i}.log", **env) for i in range(2)]
    try:
        for replica in replicas:
            replica.start()
        producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap)

        def announce(record: ModelVersion) -> None:
            producer.send(names.model_versions_topic, key=b"purchases", value=record.model_dump_json().encode()).get(30)

        # a promotion reaches both replicas
        v1 = put_version(registry, "v1", [w * 0.9 for w in model.get_weights()], meta.sha256, promoted=True)
        registry.set_champion("v1")
        announce(v1)
        for replica in replicas:
            replica.wait_until(lambda r=replica: r.serving_version() == "v1", 30, "replica serving v1")
        produce(stack, names.input_topic, [dumps(event(i)) for i in range(50)])
        served = {json.loads(r.value)["model_version"] for r in read_topic(stack, names.predictions_topic, expect=50)}
        assert served == {"v1"}

        # a tampered artifact is refused and v1 keeps serving
        good = encode_parameters(Parameters([w * 0.8 for w in model.get_weights()]))
        bad = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
        v2 = put_version(registry, "v2", [w * 0.8 for w in model.get_weights()], meta.sha256, promoted=True, artifact=bad)
        registry.set_champion("v2")
        announce(v2)
        for replica in replicas:
            replica.wait_until(lambda r=replica: r.metric("streamadapt_model_swaps_refused_total") >= 1, 30, "refusal")
            assert replica.serving_version() == "v1" and replica.http_status("/readyz") == 200

        # the operator rolls back to the source; both replicas follow
        result = subprocess.run([sys.executable, "-m", "streamadapt.cli", "models", "rollback", source],
                                env=replicas[0].env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert registry.champion() == source
        for replica in replicas:
            replica.wait_until(lambda r=replica: r.serving_version() == source, 30, "replica back on the source")
        listing = subprocess.run([sys.executable, "-m", "streamadapt.cli", "models", "list"], env=replicas[0].env,
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0 and f"*{source}" in listing.stdout and "v2" in listing.stdout
        for replica in replicas:
            assert replica.stop() == 0
        producer.close()
    finally:
        for replica in replicas:
            replica.__exit__(None, None, None)
        client.close()


def test_a_trainer_killed_mid_fine_tune_hands_over_and_nothing_half_written_is_served(stack, checkpoint, tmp_path):
    names = new_names()
    env = {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "trainer", "STREAMADAPT_TRAINING_LEASE_TTL_S": "2",
           "STREAMADAPT_TRAINING_MIN_EXAMPLES": "2500", "STREAMADAPT_TRAINING_EVERY_EXAMPLES": "500",
           "STREAMADAPT_TRAINING_EPOCHS": "100", "STREAMADAPT_TRAINING_PATIENCE": "100",
           "STREAMADAPT_TRAINING_ON_DRIFT": "false"}
    # ^ a fine-tune of 100 epochs, several seconds: long enough to be killed in; on all 3,000 examples,
    # whatever the drift detector makes of this synthetic stream
    trainers = [WorkerProcess(stack, names, checkpoint, tmp_path / f"trainer{i}.log", **env) for i in range(2)]
    bodies = [event(i, user=f"user-{i % 100}") for i in range(3000)]
    try:
        for trainer in trainers:  # both up before there is anything to train on
            trainer.start()
        with WorkerProcess(stack, names, checkpoint, tmp_path / "labeller.log", STREAMADAPT_ROLE="worker") as labeller:
            produce(stack, names.input_topic, [dumps(b) for b in bodies], keys=[b["user_id"].encode() for b in bodies])
            labeller.wait_metric("streamadapt_labels_resolved_total", len(bodies) - 100, timeout_s=120)
            assert labeller.stop() == 0

        def running():
            return [t for t in trainers if t.process.poll() is None and t.metric("streamadapt_finetune_running") == 1]

        trainers[0].wait_until(lambda: len(running()) == 1, 120, "a fine-tune in progress")
        leader = running()[0]
        survivor = next(t for t in trainers if t is not leader)
        assert leader.metric("streamadapt_trainer_leader") == 1 and survivor.metric("streamadapt_trainer_leader") == 0
        leader.process.send_signal(signal.SIGKILL)
        leader.process.wait(timeout=10)
        survivor.wait_until(lambda: survivor.metric("streamadapt_trainer_leader") == 1, 15, "the survivor leading")
        survivor.wait_until(lambda: survivor.metric("streamadapt_finetune_runs_total") >= 1, 180, "the survivor's fine-tune")
        assert survivor.stop() == 0

        # every version on record, and the champion, has its whole artifact: loading checks its sha256
        registry = Registry(redis.Redis.from_url(stack.redis_url), names.key_prefix, "purchases")
        records = registry.all()
        assert registry.champion() in {r.version for r in records}
        for record in records:
            assert len(registry.parameters(record).weights) > 0
        announced = [ModelVersion.model_validate_json(r.value)
                     for r in read_topic(stack, names.model_versions_topic, expect=1, timeout_s=30)]
        assert announced and {a.version for a in announced} <= {r.version for r in records}
        print(f"versions on record: {[(r.version, r.promoted) for r in records]}; champion {registry.champion()}")
    finally:
        for trainer in trainers:
            trainer.__exit__(None, None, None)


def test_label_join_survives_a_restart(stack, names, checkpoint, tmp_path):
    users = 40
    bodies = [event(i, user=f"user-{i % users}") for i in range(800)]
    keys = [b["user_id"].encode() for b in bodies]
    total_resolved = 0
    for part, chunk in enumerate((slice(0, 400), slice(400, 800))):
        with WorkerProcess(stack, names, checkpoint, tmp_path / f"worker{part}.log") as worker:
            produce(stack, names.input_topic, [dumps(b) for b in bodies[chunk]], keys=keys[chunk])
            worker.wait_metric("streamadapt_events_consumed_total", 400)
            worker.wait_metric("streamadapt_predictions_total", 400)
            total_resolved += worker.metric("streamadapt_labels_resolved_total")
            assert worker.stop() == 0
    # every purchase but each user's first resolves the user's previous prediction, across the restart too
    assert total_resolved == len(bodies) - users
    client = stack.redis_client()
    stored = sum(StateStore(client, stack.redis_settings(names.key_prefix)).window_sizes().values())
    assert stored == len(bodies) - users
    client.close()
