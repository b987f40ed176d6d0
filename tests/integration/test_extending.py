"""A network of the user's own (examples/), through the real stack: pretrained by the command line,
served through Kafka, fine-tuned and promoted by the trainer, every event predicted once."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from streamadapt.ops.generate import write_events
from streamadapt.ops.replay import replay
from streamadapt.schemas import ModelVersion
from streamadapt.settings import KafkaSettings
from tests.conftest import new_names
from tests.integration.conftest import (
    WorkerProcess,
    check_every_event_predicted,
    dumps,
    produce,
    read_topic,
)
from tests.integration.test_adaptation import trainer_leads

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOP_UP = 1_500
PLUGIN = "examples.device_features:DeviceFeatures"


def promoted_and_served(stack, names, worker: WorkerProcess, timeout_s: float) -> ModelVersion | None:
    """A promoted version the worker serves, within `timeout_s`; None if none."""
    consumer = KafkaConsumer(names.model_versions_topic, bootstrap_servers=stack.kafka_bootstrap,
                             enable_auto_commit=False, auto_offset_reset="earliest")
    promoted: dict[str, ModelVersion] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for part in consumer.poll(timeout_ms=500).values():
                for record in part:
                    version = ModelVersion.model_validate_json(record.value)
                    if version.promoted and version.strategy is not None:  # not the source
                        promoted[version.version] = version
            if (serving := worker.serving_version()) in promoted:
                return promoted[serving]
    finally:
        consumer.close()
    return None


def test_a_model_of_the_users_own_is_pretrained_served_fine_tuned_and_promoted(cluster_stack, source_events, tmp_path):
    """On the Redis Cluster: the trainer's registry and lease live under one hash tag, the windows it reads in
    every shard."""
    stack = cluster_stack
    checkpoint = tmp_path / "residual"
    result = subprocess.run(
        [sys.executable, "-m", "streamadapt.cli", "pretrain", "--events", str(source_events), "--out", str(checkpoint),
         "--epochs", "4", "--model-builder", "examples.residual_model:build"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((checkpoint / "metadata.json").read_text())["model_builder"] == "examples.residual_model:build"

    events_path, total = tmp_path / "target.jsonl", 12_000
    write_events(events_path, events=total, market="target", drift_at=2_000, seed=5)
    lines = events_path.read_bytes().splitlines(keepends=True)
    bodies = [json.loads(line) for line in lines]
    names = new_names()
    kafka = KafkaSettings(bootstrap=stack.kafka_bootstrap, input_topic=names.input_topic)
    env = {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "all", "STREAMADAPT_TRAINING_EVERY_S": "10",
           "STREAMADAPT_TRAINING_EVERY_EXAMPLES": "2000", "STREAMADAPT_TRAINING_MIN_EXAMPLES": "1000",
           "STREAMADAPT_TRAINING_PROMOTION_Z": "2"}
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
        worker.wait_until(lambda: trainer_leads(worker), 120, "the trainer child leading")
        sent = 6_000
        part = tmp_path / "part.jsonl"
        part.write_bytes(b"".join(lines[:sent]))
        replay(part, kafka, 1500)
        while (version := promoted_and_served(stack, names, worker, 60.0)) is None:
            assert sent < total, f"no version promoted; log tail:\n{worker.log_path.read_text()[-3000:]}"
            part.write_bytes(b"".join(lines[sent:sent + TOP_UP]))
            replay(part, kafka, 1500)
            sent += TOP_UP
        part.write_bytes(b"".join(lines[sent:]))
        replay(part, kafka, 1500)
        records = read_topic(stack, names.predictions_topic, expect=total, timeout_s=180)
        assert worker.stop() == 0
    assert version.strategy and version.trained_on.examples > 0
    assert check_every_event_predicted(bodies, records) == 0
    served = {json.loads(r.value)["model_version"] for r in records}
    assert version.version in served and f"src-{version.source_checkpoint_sha256[:12]}" in served


@pytest.fixture(scope="module")
def device_checkpoint(source_events, tmp_path_factory) -> Path:
    """Pretrained with examples.device_features on a source file whose events carry a `device` field that says
    which category the user buys next, so that the model learns to read it."""
    lines = [json.loads(line) for line in source_events.read_text().splitlines()]
    next_category: dict[int, str] = {}
    last_of_user: dict[str, int] = {}
    for i, body in enumerate(lines):
        if (previous := last_of_user.get(body["user_id"])) is not None:
            next_category[previous] = body["category"]
        last_of_user[body["user_id"]] = i
    categories = sorted({body["category"] for body in lines})
    devices = ("app", "mobile", "desktop")
    for i, body in enumerate(lines):
        if i in next_category:
            body["device"] = devices[categories.index(next_category[i]) % len(devices)]
    directory = tmp_path_factory.mktemp("device")
    (directory / "source.jsonl").write_text("".join(json.dumps(body) + "\n" for body in lines))
    result = subprocess.run(
        [sys.executable, "-m", "streamadapt.cli", "pretrain", "--events", str(directory / "source.jsonl"),
         "--out", str(directory / "checkpoint"), "--epochs", "4", "--features", PLUGIN],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return directory / "checkpoint"



def test_a_feature_plug_in_reading_an_extra_event_field_changes_what_is_served(stack, device_checkpoint, tmp_path):
    metadata = json.loads((device_checkpoint / "metadata.json").read_text())
    assert metadata["features"]["plugin"] == PLUGIN and metadata["features"]["name"] == "example.device"
    names = new_names()
    body = {"item_id": "i1", "category": "c00", "price": 12.5, "quantity": 1, "ts": "2026-12-01T10:00:00Z"}
    bodies = [{**body, "event_id": f"e-{device}", "user_id": f"u-{device}", "device": device}
              for device in ("app", "mobile", "desktop", "fridge")]
    with WorkerProcess(stack, names, device_checkpoint, tmp_path / "worker.log", STREAMADAPT_FEATURES=PLUGIN,
                       PYTHONPATH=str(REPO)) as worker:
        produce(stack, names.input_topic, [dumps(b) for b in bodies], [b["user_id"].encode() for b in bodies])
        records = read_topic(stack, names.predictions_topic, expect=len(bodies))
        assert worker.stop() == 0
    served = {json.loads(r.value)["event_id"]: json.loads(r.value)["probabilities"] for r in records}
    assert check_every_event_predicted(bodies, records) == 0
    # the four events differ in their device only, and each device is served its own prediction
    assert len({json.dumps(served[b["event_id"]]) for b in bodies}) == len(bodies)


def test_run_refuses_a_checkpoint_pretrained_with_other_features_in_one_line(device_checkpoint):
    result = subprocess.run([sys.executable, "-m", "streamadapt.cli", "run", "--source-checkpoint",
                             str(device_checkpoint)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and f"run with --features {PLUGIN}" in error[0], result.stderr
