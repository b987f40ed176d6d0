"""Helpers for tests that run the real worker process against the real Kafka and Redis."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamadapt.model.checkpoint import Parameters
from streamadapt.schemas import ModelVersion, TrainedOn
from streamadapt.state.registry import Registry, encode_parameters
from tests.conftest import Names, Stack

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`streamadapt run` as a child process, configured by environment variables like in production."""

    def __init__(self, stack: Stack, names: Names, checkpoint: Path, log_path: Path, wait_ready: bool = True,
                 **extra_env: str):
        self.port = free_port()
        self._wait_ready = wait_ready
        self.env = {**os.environ, **names.env(stack), "STREAMADAPT_METRICS_PORT": str(self.port),
                    "STREAMADAPT_METRICS_HOST": "127.0.0.1", "STREAMADAPT_SOURCE_CHECKPOINT": str(checkpoint),
                    "STREAMADAPT_NO_FINETUNE": "true", "STREAMADAPT_PROGRESS_INTERVAL_S": "1", **extra_env}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout_s: float = 90.0) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "streamadapt.cli", "run"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"worker exited early:\n{self.log_path.read_text()[-3000:]}"
            if self.http_status("/readyz" if self._wait_ready else "/healthz") == 200:
                return self
            time.sleep(0.2)
        raise AssertionError(f"worker not ready in {ready_timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def metric(self, name: str) -> float:
        """Sum of a sample over its labels, read from /metrics."""
        return metric_at(self.port, name)

    def serving_version(self) -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("streamadapt_serving_model_info{"):
                    return line.split('model_version="', 1)[1].split('"', 1)[0]
        return None

    def wait_until(self, predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} not reached in {timeout_s} s; log tail:\n{self.log_path.read_text()[-2000:]}")

    def wait_metric(self, name: str, at_least: float, timeout_s: float = 60.0) -> float:
        deadline = time.monotonic() + timeout_s
        value = 0.0
        while time.monotonic() < deadline:
            value = self.metric(name)
            if value >= at_least:
                return value
            time.sleep(0.1)
        raise AssertionError(f"{name} reached {value}, not {at_least}, in {timeout_s} s")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout_s)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def metric_at(port: int, name: str) -> float:
    """Sum of a sample over its labels, read from the /metrics of the process on `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name) and (line[len(name)] in " {"))


def produce(stack: Stack, topic: str, values: list[bytes | None], keys: list[bytes | None] | None = None):
    """Send values in order (one partition per key as Kafka chooses); returns their (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap, acks="all", linger_ms=5)
    keys = keys or [b"k"] * len(values)
    futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, values)]
    producer.flush()
    coordinates = [(f.get(timeout=30).partition, f.get(timeout=30).offset) for f in futures]
    producer.close()
    return coordinates


def read_topic(stack: Stack, topic: str, expect: int, timeout_s: float = 60.0, settle_s: float = 1.0,
               committed_only: bool = False) -> list:
    """Every record of `topic` from the start: waits for `expect` records, then `settle_s` more for extras.
    `committed_only` reads as a read_committed consumer (records of aborted transactions are skipped)."""
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=500,
                             isolation_level="read_committed" if committed_only else "read_uncommitted")
    deadline = time.monotonic() + timeout_s
    while not consumer.partitions_for_topic(topic):
        assert time.monotonic() < deadline, f"topic {topic} never appeared"
        time.sleep(0.2)
        consumer.topics()
    consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
    records: list = []
    settle_deadline = None
    while True:
        batch = consumer.poll(timeout_ms=200)
        for part in batch.values():
            records.extend(part)
        now = time.monotonic()
        if len(records) >= expect and settle_deadline is None:
            settle_deadline = now + settle_s
        if (settle_deadline is not None and now >= settle_deadline) or now >= deadline:
            break
    consumer.close()
    return records


def check_every_event_predicted(bodies: list[dict], records: list) -> int:
    """Assert that every event of `bodies` has a prediction among `records` and that any prediction
    emitted more than once is byte-identical; returns how many were re-emitted."""
    per_event: dict[str, set[bytes]] = defaultdict(set)
    for record in records:
        per_event[json.loads(record.value)["event_id"]].add(record.value)
    missing = {b["event_id"] for b in bodies} - set(per_event)
    assert not missing, f"{len(missing)} events lack a prediction"
    changed = [event_id for event_id, copies in per_event.items() if len(copies) > 1]
    assert not changed, f"{len(changed)} re-emitted predictions differ from the first, e.g. {changed[0]}"
    return len(records) - len(per_event)


def committed_offsets(stack: Stack, group: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka_bootstrap, group_id=group, enable_auto_commit=False)
    partitions = consumer.partitions_for_topic(topic) or set()
    offsets = {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in partitions}
    consumer.close()
    return offsets


def event(i: int, user: str | None = None, **changes) -> dict:
    body = {"event_id": f"ev-{i}", "user_id": user or f"user-{i % 17}", "item_id": f"item-{i % 50}",
            "category": ["groceries", "books", "toys", "garden"][i % 4], "price": 3.5 + i % 20, "quantity": 1 + i % 3,
            "currency": "EUR", "ts": f"2025-08-01T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}Z"}
    body.update(changes)
    return body


def dumps(body: dict) -> bytes:
    return json.dumps(body).encode()


def put_version(registry: Registry, version: str, weights, source_sha: str, promoted: bool,
                artifact: bytes | None = None) -> ModelVersion:
    artifact = encode_parameters(Parameters(weights)) if artifact is None else artifact
    record = ModelVersion(model="purchases", version=version, task="next_category", source_checkpoint_sha256=source_sha,
                          created_at=datetime.now(timezone.utc), trained_on=TrainedOn(examples=0), promoted=promoted,
                          artifact_sha256=hashlib.sha256(encode_parameters(Parameters(weights))).hexdigest(),
                          artifact_ref=registry.artifact_ref(version))
    registry.put(record, artifact)
    return record


# Tests that run a redis-server of their own (start_redis) are skipped where there is none.
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None,
                                        reason="needs redis-server (scripts/dev-stack installs it)")


def start_redis(directory, *args: str) -> subprocess.Popen:
    """A redis-server of a test's own, on 127.0.0.1 with its files in `directory`; `args` say the port and
    the rest. Returns at once: wait_for_redis tells when it answers."""
    return subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--dir", str(directory),
                             "--save", "", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_redis(client, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Until `client` gets an answer from the server `process` runs (a refusal for want of a password counts)."""
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, "redis-server exited at start-up"
        try:
            client.ping()
            return
        except redis.AuthenticationError:
            return
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)


def run_expecting_failure(env: dict[str, str], timeout_s: float = 120) -> str:
    """`streamadapt run` that must stop at start-up; returns its stderr after checking it is one clean line."""
    result = subprocess.run([sys.executable, "-m", "streamadapt.cli", "run"], env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("streamadapt run: error:")]
    assert len(error_lines) == 1, result.stderr[-3000:]
    return result.stderr


def produce_paced(bootstrap: str, topic: str, bodies: list[dict], rate_per_s: float, failures: list,
                  acked: list[dict] | None = None) -> None:
    """Send `bodies` keyed by user at `rate_per_s`; the client buffers and retries through a broker restart
    (delivery timeout 5 min). Sends the broker refused go to `failures`; the bodies it took to `acked`, if
    given (a retried send may land twice: the worker's dedupe drops the copy)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, delivery_timeout_ms=300_000,
                             request_timeout_ms=30_000, reconnect_backoff_max_ms=2000)
    started = time.monotonic()
    futures = []
    for i, body in enumerate(bodies):
        delay = started + i / rate_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures.append((body, producer.send(topic, key=body["user_id"].encode(), value=dumps(body))))
    producer.flush(timeout=300)
    for body, future in futures:
        try:
            future.get(timeout=1)
        except Exception as error:  # reported by the test, which then fails
            failures.append(error)
        else:
            if acked is not None:
                acked.append(body)
    producer.close(timeout=30)


def read_every_event_predicted(stack: Stack, topic: str, event_ids: set[str], timeout_s: float,
                               committed_only: bool = False, between: Callable[[], None] = lambda: None) -> list:
    """Every record of `topic`, read again until each of `event_ids` has a prediction there or `timeout_s`
    passes (at least once, re-emitted records count toward the number read before every event has its own);
    `between` runs before each read."""
    deadline = time.monotonic() + timeout_s
    while True:
        between()
        records = read_topic(stack, topic, expect=len(event_ids), timeout_s=30, settle_s=3,
                             committed_only=committed_only)
        if event_ids <= {json.loads(r.value)["event_id"] for r in records} or time.monotonic() > deadline:
            return records
