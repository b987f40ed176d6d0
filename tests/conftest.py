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
STACK_DIR = Path(os.environ.get("DEV_STACK_DIR", REPO / ".stack"))  # where scripts/dev-stack keeps its files


@dataclass(frozen=True)
class Stack:
    kafka_bootstrap: str
    redis_url: str
    redis_cluster: bool = False

    def redis_settings(self, key_prefix: str, **more):
        from streamadapt.settings import RedisSettings

        return RedisSettings(url=self.redis_url, key_prefix=key_prefix, cluster=self.redis_cluster, **more)

    def redis_client(self):
        """A client of this stack's Redis: redis.Redis, or redis.RedisCluster."""
        from streamadapt.state.store import connect

        return connect(self.redis_settings("test"))


def _dev_stack_up(*flags: str) -> Stack:
    result = subprocess.run([STACK_SCRIPT, "up", *flags], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"dev-stack up failed:\n{result.stderr}"
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert re.fullmatch(r"\S+:\d+", values.get("STREAMADAPT_KAFKA_BOOTSTRAP", "")) and \
        values.get("STREAMADAPT_REDIS_URL", "").startswith("redis://"), f"unexpected dev-stack output: {result.stdout!r}"
    return Stack(values["STREAMADAPT_KAFKA_BOOTSTRAP"], values["STREAMADAPT_REDIS_URL"],
                 values.get("STREAMADAPT_REDIS_CLUSTER") == "true")


@pytest.fixture(scope="session")
def stack() -> Stack:
    """Kafka and Redis via the project's own script; stopped at the end only if this run started them."""
    was_running = subprocess.run([STACK_SCRIPT, "status"], capture_output=True).returncode == 0
    started = _dev_stack_up()
    assert not started.redis_cluster
    STARTED_KAFKA.append(started.kafka_bootstrap)
    yield started
    _drop_test_keys(started)
    if not was_running and not os.environ.get("STREAMADAPT_TEST_KEEP_STACK"):
        subprocess.run([STACK_SCRIPT, "down"], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def cluster_stack(stack) -> Stack:
    """The same Kafka, with a three-master Redis Cluster (`scripts/dev-stack up --redis-cluster`) for Redis;
    `stack`'s end stops it with the rest."""
    started = _dev_stack_up("--redis-cluster")
    assert started.redis_cluster and started.kafka_bootstrap == stack.kafka_bootstrap
    yield started
    _drop_test_keys(started)


@pytest.fixture(params=["redis", "redis-cluster"])
def each_redis(request) -> Stack:
    """Kafka with the single Redis, then with the Redis Cluster: for what must hold on both."""
    return request.getfixturevalue("stack" if request.param == "redis" else "cluster_stack")


def stack_with(request, redis_kind: str) -> Stack:
    """For a test parametrized by `redis_kind`: the stack with the single Redis ("redis") or with the Redis
    Cluster ("redis-cluster")."""
    return request.getfixturevalue({"redis": "stack", "redis-cluster": "cluster_stack"}[redis_kind])


def _drop_test_keys(stack: Stack) -> None:
    """Delete what this run's tests left in Redis: a developer's stack outlives the run, and a Redis
    holding stale keys rewrites its append-only file during later benchmarks."""
    from streamadapt.state.store import drop_keys

    client = stack.redis_client()
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
            "STREAMADAPT_REDIS_CLUSTER": "true" if stack.redis_cluster else "false",
            "STREAMADAPT_KAFKA_MODEL_VERSIONS_TOPIC": self.model_versions_topic,
        }


STARTED_KAFKA: list[str] = []  # the dev stack's bootstrap, once the session has started it
ISSUED_KEY_PREFIXES: list[str] = []  # the Redis prefixes of this run's tests, whose keys go at its end


def new_names() -> Names:
    """Fresh topics, group and Redis prefix (the prefix's keys are deleted when the test run ends)."""
    run = uuid.uuid4().hex[:10]
    ISSUED_KEY_PREFIXES.append(f"test-{run}")
    return Names(f"purchases-{run}", f"predictions-{run}", f"purchases.dlq-{run}", f"group-{run}", f"test-{run}",
                 f"model-versions-{run}")


@pytest.fixture
def names() -> Names:
    """A test's fresh names; with the dev stack, its topics are deleted after it, so that the broker does not
    pile up thousands of partitions over runs (each one slows its restarts, which fault tests time)."""
    made = new_names()
    yield made
    if STARTED_KAFKA:
        from streamadapt.kafka.admin import delete_topics
        from streamadapt.settings import KafkaSettings

        delete_topics(KafkaSettings(bootstrap=STARTED_KAFKA[0]),
                      [made.input_topic, made.predictions_topic, made.dlq_topic, made.model_versions_topic])


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
