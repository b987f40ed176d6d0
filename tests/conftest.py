"""Shared fixtures. The real Kafka and Redis come from scripts/dev-stack, started once per test run."""
from __future__ import annotations

import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STACK_SCRIPT = REPO / "scripts" / "dev-stack"


@dataclass(frozen=True)
class Stack:
    kafka_bootstrap: str
    redis_url: str


@pytest.fixture(scope="session")
def stack() -> Stack:
    """Kafka and Redis via the project's own script; stopped at the end only if this run started them."""
    was_running = subprocess.run([STACK_SCRIPT, "status"], capture_output=True).returncode == 0
    result = subprocess.run([STACK_SCRIPT, "up"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dev-stack up failed:\n{result.stderr}"
    lines = result.stdout.splitlines()
    assert len(lines) == 2, f"dev-stack up must print exactly two lines, printed: {lines!r}"
    kafka = re.fullmatch(r"STREAMADAPT_KAFKA_BOOTSTRAP=(\S+)", lines[0])
    redis_url = re.fullmatch(r"STREAMADAPT_REDIS_URL=(redis://\S+)", lines[1])
    assert kafka and redis_url, f"unexpected dev-stack output: {lines!r}"
    yield Stack(kafka.group(1), redis_url.group(1))
    _drop_test_keys(redis_url.group(1))
    if not was_running and not os.environ.get("STREAMADAPT_TEST_KEEP_STACK"):
        subprocess.run([STACK_SCRIPT, "down"], capture_output=True, timeout=120)


def _drop_test_keys(redis_url: str) -> None:
    """Delete what this run's tests left in Redis: a developer's stack outlives the run, and a Redis
    holding stale keys rewrites its append-only file during later benchmarks."""
    import redis

    from streamadapt.state.store import drop_keys

    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in ISSUED_KEY_PREFIXES:
            drop_keys(client, prefix)
            drop_keys(client, f"{prefix}-*")  # prefixes a test derives from its own, e.g. one per run or builder
    finally:
        client.close()


@dataclass(frozen=True)
class Names:
    """Fresh topics, group and Redis prefix for one test."""

    input_topic: str
    predictions_topic: str
    dlq_topic: str
    group_id: str
    key_prefix: str
    model_versions_topic: str

    def env(self, stack: Stack) -> dict[str, str]:
        return {
            "STREAMADAPT_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "STREAMADAPT_REDIS_URL": stack.redis_url,
            "STREAMADAPT_KAFKA_INPUT_TOPIC": self.input_topic,
            "STREAMADAPT_KAFKA_PREDICTIONS_TOPIC": self.predictions_topic,
            "STREAMADAPT_KAFKA_DLQ_TOPIC": self.dlq_topic,
            "STREAMADAPT_KAFKA_GROUP_ID": self.group_id,
            "STREAMADAPT_REDIS_KEY_PREFIX": self.key_prefix,
            "STREAMADAPT_KAFKA_MODEL_VERSIONS_TOPIC": self.model_versions_topic,
        }


ISSUED_KEY_PREFIXES: list[str] = []  # the Redis prefixes of this run's tests, whose keys go at its end


def new_names() -> Names:
    """Fresh topics, group and Redis prefix (the prefix's keys are deleted when the test run ends)."""
    run = uuid.uuid4().hex[:10]
    ISSUED_KEY_PREFIXES.append(f"test-{run}")
    return Names(f"purchases-{run}", f"predictions-{run}", f"purchases.dlq-{run}", f"group-{run}", f"test-{run}",
                 f"model-versions-{run}")


@pytest.fixture
def names() -> Names:
    return new_names()


@pytest.fixture(scope="session")
def source_events(tmp_path_factory) -> Path:
    from streamadapt.ops.generate import write_events

    path = tmp_path_factory.mktemp("data") / "source.jsonl"
    write_events(path, events=12000, market="source", seed=3)
    return path


@pytest.fixture(scope="session")
def repurchase_checkpoint(tmp_path_factory, source_events) -> Path:
    """A small repurchase source checkpoint (7-day horizon), trained once per run."""
    from streamadapt.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("checkpoint") / "repurchase"
    pretrain(source_events, out, task="repurchase", horizon_days=7, epochs=3, seed=0)
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, source_events) -> Path:
    """A small next_category source checkpoint, trained once per run."""
    from streamadapt.training.pretrain import pretrain

    out = tmp_path_factory.mktemp("checkpoint") / "next_category"
    pretrain(source_events, out, task="next_category", horizon_days=7, epochs=5, seed=0)
    return out
