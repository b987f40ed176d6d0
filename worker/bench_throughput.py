"""`streamadapt bench throughput`: how fast the worker drains a backlog, against the client's own limit.

Both contenders drain the same backlog on the same broker:
- bare: a kafka-python loop that consumes each batch, produces one record per input record, flushes,
  checks every acknowledgement and commits: the least any worker on this client must do;
- worker: `streamadapt run --no-finetune` as a real process, with validation, Redis state, inference,
  label join and the ordered commit.
Time runs from the first record received to the last one handled. Peak RSS is the worker's VmHWM.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from kafka import KafkaConsumer

from worker import kafka_io
from worker.generate import write_events
from worker.replay import replay
from worker.settings import KafkaSettings, Settings


@dataclass(frozen=True)
class DrainResult:
    name: str
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def drain_bare(kafka: KafkaSettings, input_topic: str, output_topic: str, events: int, timeout_s: float) -> DrainResult:
    consumer = KafkaConsumer(input_topic, bootstrap_servers=kafka.bootstrap, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             max_poll_records=kafka.max_poll_records)
    producer = kafka_io.open_producer(kafka)
    consumed, started, deadline = 0, None, time.monotonic() + timeout_s
    try:
        while consumed < events and time.monotonic() < deadline:
            records = [r for batch in consumer.poll(timeout_ms=kafka.poll_timeout_ms).values() for r in batch]
            if not records:
                continue
            started = started or time.perf_counter()
            futures = [producer.send(output_topic, key=r.key, value=r.value) for r in records]
            producer.flush()
            kafka_io.wait_acknowledged(futures, 60)
            consumer.commit()
            consumed += len(records)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close()
        producer.close(timeout=10)
    return DrainResult("bare kafka-python consume+produce", consumed, elapsed)


def drain_worker(settings: Settings, checkpoint: Path, input_topic: str, events: int, timeout_s: float,
                 log_path: Path) -> tuple[DrainResult, float]:
    """Drain time of a real worker process, and its peak resident memory in MiB."""
    run = uuid.uuid4().hex[:8]
    port = _free_port()
    env = {**os.environ, **settings.as_environment(), "STREAMADAPT_KAFKA_INPUT_TOPIC": input_topic,
           "STREAMADAPT_KAFKA_PREDICTIONS_TOPIC": f"{input_topic}.predictions", "STREAMADAPT_KAFKA_DLQ_TOPIC": f"{input_topic}.dlq",
           "STREAMADAPT_KAFKA_GROUP_ID": f"bench-worker-{run}", "STREAMADAPT_REDIS_KEY_PREFIX": f"bench-{run}",
           "STREAMADAPT_METRICS_HOST": "127.0.0.1", "STREAMADAPT_METRICS_PORT": str(port),
           "STREAMADAPT_SOURCE_CHECKPOINT": str(checkpoint), "STREAMADAPT_NO_FINETUNE": "true", "STREAMADAPT_ROLE": "worker"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "worker.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started, consumed, deadline = None, 0.0, time.monotonic() + timeout_s
        while consumed < events and time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}; see {log_path}")
            consumed = _consumed(port)
            if consumed > 0 and started is None:
                started = time.perf_counter()
            time.sleep(0.05)
        elapsed = time.perf_counter() - (started or time.perf_counter())
        peak_rss_mib = _peak_rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
        _drop_redis_keys(settings, f"bench-{run}")
    return DrainResult("streamadapt worker (--no-finetune)", int(consumed), elapsed), peak_rss_mib


def _drop_redis_keys(settings: Settings, key_prefix: str) -> None:
    """The benchmark's own Redis state goes when it is done (its topics expire with the broker's retention)."""
    from worker.state import connect

    client = connect(settings.redis)
    try:
        batch = []
        for key in client.scan_iter(f"{key_prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def run_throughput_bench(settings: Settings, events: int, checkpoint: Path | None, out: Path | None,
                         repeat: int = 3, timeout_s: float = 900.0, echo=print) -> dict:
    """Drain `events` with each contender, `repeat` times alternating, and report the medians."""
    bare_runs, worker_runs, rss = [], [], []
    with tempfile.TemporaryDirectory(prefix="streamadapt-bench-") as scratch:
        scratch_dir = Path(scratch)
        stream = scratch_dir / "events.jsonl"
        write_events(stream, events=events, market="target", seed=99)
        if checkpoint is None:
            checkpoint = _quick_checkpoint(scratch_dir, echo)
        for attempt in range(1, repeat + 1):
            run = uuid.uuid4().hex[:8]
            topics = {"bare": f"bench-bare-{run}", "worker": f"bench-worker-{run}"}
            for topic in topics.values():
                replay(stream, settings.kafka.model_copy(update={"input_topic": topic}))
            echo(f"run {attempt}/{repeat}: backlog of {events} events produced; draining with the bare loop")
            bare_runs.append(drain_bare(settings.kafka, topics["bare"], f"{topics['bare']}.out", events, timeout_s))
            echo(f"run {attempt}/{repeat}: draining with the worker")
            worker_run, peak_rss_mib = drain_worker(settings, checkpoint, topics["worker"], events, timeout_s,
                                                    scratch_dir / "worker.log")
            worker_runs.append(worker_run)
            rss.append(peak_rss_mib)
    bare, worker = _median(bare_runs), _median(worker_runs)
    ratio = worker.events_per_s / bare.events_per_s
    result = {"events": events, "repeat": repeat,
              "bare": {**asdict(bare), "events_per_s": bare.events_per_s,
                       "runs_events_per_s": [r.events_per_s for r in bare_runs]},
              "worker": {**asdict(worker), "events_per_s": worker.events_per_s,
                         "runs_events_per_s": [r.events_per_s for r in worker_runs]},
              "ratio_worker_to_bare": ratio, "worker_peak_rss_mib": max(rss),
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    echo(f"{'median of ' + str(repeat) + ' runs':38}{'events':>8}{'seconds':>10}{'events/s':>11}   runs (events/s)")
    for r, runs in ((bare, bare_runs), (worker, worker_runs)):
        shown = " ".join(f"{x.events_per_s:.0f}" for x in runs)
        echo(f"{r.name:38}{r.events:>8}{r.seconds:>10.2f}{r.events_per_s:>11.0f}   {shown}")
    echo(f"ratio worker / bare: {ratio:.3f}    worker peak RSS: {max(rss):.0f} MiB")
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")
        echo(f"wrote {out}")
    return result


def _median(runs: list[DrainResult]) -> DrainResult:
    return sorted(runs, key=lambda r: r.events_per_s)[len(runs) // 2]


def _quick_checkpoint(scratch_dir: Path, echo) -> Path:
    from worker.pretrain import pretrain

    echo("no --source-checkpoint given: pretraining a small one")
    source = scratch_dir / "source.jsonl"
    write_events(source, events=20_000, market="source", seed=98)
    pretrain(source, scratch_dir / "checkpoint", task="next_category", horizon_days=7, epochs=2)
    return scratch_dir / "checkpoint"


def _consumed(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("streamadapt_events_consumed_total "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
