"""`python -m benchmarks scaling`: the worker's drain rate with 1, 2 and 3 serving processes over the input
topic's partitions, on a single Redis and on a Redis Cluster, with what each part of the system spent per event:
the measured costs behind the capacity model of docs/operations.md.

Each run produces a fresh backlog, starts `streamadapt run --no-finetune --processes N`, and measures in steady
state: from the moment every process has consumed records (the group has settled) until 95 % of the backlog is
handled. Over that interval it reads the CPU time of the worker's processes (/proc), of every Redis node
(INFO cpu) and of the whole machine (/proc/stat); the rest of the machine's busy time is Kafka's and the
benchmark's own. After the first run on each Redis, it samples the bytes Redis holds per claim, per profile and
per stored example (MEMORY USAGE).
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import SecretStr

from benchmarks.results import write_json
from benchmarks.throughput import (
    _descendants,
    _exited,
    _scrape,
    backlog_and_checkpoint,
    deleted_when_done,
    topics_of,
    wait_for_redis_at_rest,
    worker_process,
)
from streamadapt.model.checkpoint import read_metadata
from streamadapt.ops.replay import replay
from streamadapt.settings import Settings
from streamadapt.state.store import connect

STEADY_UNTIL = 0.95  # of the backlog handled: the tail, where partitions run dry one by one, is left out
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ScalingRow:
    redis: str  # "redis" or "redis-cluster"
    processes: int
    events: int  # handled within the steady interval
    seconds: float
    worker_cpu_s: float
    redis_cpu_s: float
    machine_busy_cpu_s: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def per_event_ms(self, cpu_s: float) -> float:
        return cpu_s / self.events * 1000.0


def run_scaling_bench(settings: Settings, cluster_url: str | None, processes: list[int], events: int,
                      checkpoint: Path | None, out: Path | None, timeout_s: float = 900.0, echo=print) -> dict:
    """A drain per (Redis, process count); prints the table and the per-event costs, writes JSON to `out`."""
    if checkpoint is not None:
        read_metadata(checkpoint)
    kinds = [("redis", settings)]
    if cluster_url is not None:
        redis = settings.redis.model_copy(update={"url": SecretStr(cluster_url), "cluster": True})
        kinds.append(("redis-cluster", settings.model_copy(update={"redis": redis})))
    rows: list[ScalingRow] = []
    storage: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="streamadapt-bench-") as scratch, deleted_when_done(settings.kafka) as made:
        scratch_dir = Path(scratch)
        stream, checkpoint = backlog_and_checkpoint(scratch_dir, events, checkpoint, echo)
        for kind, on_kind in kinds:
            for count in processes:
                topic = f"bench-scaling-{uuid.uuid4().hex[:8]}"
                made += topics_of(topic)
                replay(stream, on_kind.kafka.model_copy(update={"input_topic": topic}))
                if kind == "redis":
                    wait_for_redis_at_rest(on_kind, echo)
                echo(f"{kind}, {count} process{'es' if count > 1 else ''}: draining {events:,} events over "
                     f"{on_kind.kafka.topic_partitions} partitions")
                row, sizes = _drain(on_kind, kind, checkpoint, topic, events, count, timeout_s,
                                    scratch_dir / "worker.log", measure_storage=kind not in storage)
                rows.append(row)
                if sizes:
                    storage[kind] = sizes
                echo(f"  {row.events_per_s:,.0f} events/s")
    result = scaling_result(rows, storage, events, settings.kafka.topic_partitions)
    print_scaling(result, echo)
    if out is not None:
        write_json(out, result)
        echo(f"wrote {out}")
    return result


def _drain(settings: Settings, kind: str, checkpoint: Path, topic: str, events: int, count: int, timeout_s: float,
           log_path: Path, measure_storage: bool) -> tuple[ScalingRow, dict[str, float]]:
    key_prefix = f"bench-scaling-{uuid.uuid4().hex[:8]}"
    extra = {"STREAMADAPT_PROCESSES": str(count), "STREAMADAPT_REDIS_KEY_PREFIX": key_prefix}
    with worker_process(settings, checkpoint, topic, log_path, extra) as (process, port):
        ports = [port] + [port + 1 + index for index in range(1, count)]  # process i serves metrics on port + 1 + i
        deadline = time.monotonic() + timeout_s

        def totals() -> list[dict[str, float]]:
            if process.poll() is not None:
                raise _exited(process, log_path)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the drain took over {timeout_s:.0f} s")
            return [_scrape(p) for p in ports]

        def handled(scrapes: list[dict[str, float]]) -> float:
            return sum(s.get("streamadapt_predictions_total", 0.0) + s.get("streamadapt_events_dead_lettered_total", 0.0)
                       for s in scrapes)

        scrapes = totals()
        while not all(s.get("streamadapt_events_consumed_total", 0.0) > 0 for s in scrapes):  # the group settled
            time.sleep(0.05)
            scrapes = totals()
        start = _sample(settings, process.pid), handled(scrapes), time.perf_counter()
        while (done := handled(totals())) < STEADY_UNTIL * events:
            time.sleep(0.1)
        end = _sample(settings, process.pid), done, time.perf_counter()
        sizes = _storage_bytes(settings, key_prefix) if measure_storage else {}
    (cpu_start, handled_start, t_start), (cpu_end, handled_end, t_end) = start, end
    row = ScalingRow(kind, count, int(handled_end - handled_start), t_end - t_start,
                     *(after - before for before, after in zip(cpu_start, cpu_end)))
    return row, sizes


def _sample(settings: Settings, pid: int) -> tuple[float, float, float]:
    """CPU seconds so far: of the worker's processes, of every Redis node, and busy on the whole machine."""
    worker_ticks = 0
    for process in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        worker_ticks += int(fields[11]) + int(fields[12])  # utime, stime
    with closing(connect(settings.redis)) as client:
        nodes = [node.redis_connection for node in client.get_primaries()] if settings.redis.cluster else [client]
        redis_s = sum(float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
                      for info in (node.info("cpu") for node in nodes))
    cpu = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy_ticks = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
    return worker_ticks / _TICKS_PER_S, redis_s, busy_ticks / _TICKS_PER_S


def _storage_bytes(settings: Settings, key_prefix: str, sample: int = 200) -> dict[str, float]:
    """Mean bytes Redis holds per claim, per profile and per stored example (MEMORY USAGE, a sample of each)."""
    names = {"event": "claim", "profile": "profile", "window": "example"}
    keys_of: dict[str, list[bytes]] = {kind: [] for kind in names}
    sizes: dict[str, float] = {}
    with closing(connect(settings.redis)) as client:
        for key in client.scan_iter(f"{key_prefix}:*", count=1000):
            kind = key.decode().split(":")[2]  # prefix, hash tag, kind, name
            if kind in keys_of and len(keys_of[kind]) < sample:
                keys_of[kind].append(key)
            if all(len(found) >= sample for found in keys_of.values()):
                break
        for kind, keys in keys_of.items():
            if keys:
                used = sum(client.memory_usage(key, samples=0) or 0 for key in keys)
                held = sum(client.llen(key) for key in keys) if kind == "window" else len(keys)
                sizes[names[kind]] = used / max(held, 1)
    return sizes


def scaling_result(rows: list[ScalingRow], storage: dict[str, dict[str, float]], events: int, partitions: int) -> dict:
    """Each run's figures, against the run of the fewest processes on the same Redis."""
    fewest: dict[str, ScalingRow] = {}
    for row in rows:
        if row.redis not in fewest or row.processes < fewest[row.redis].processes:
            fewest[row.redis] = row
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        one = fewest[row.redis]
        by_kind.setdefault(row.redis, []).append({
            **asdict(row), "events_per_s": row.events_per_s,
            "speed_up": row.events_per_s / one.events_per_s,
            "linear_share": row.events_per_s / (one.events_per_s * row.processes / one.processes),
            "worker_cpu_ms_per_event": row.per_event_ms(row.worker_cpu_s),
            "redis_cpu_ms_per_event": row.per_event_ms(row.redis_cpu_s),
            "other_cpu_ms_per_event": row.per_event_ms(row.machine_busy_cpu_s - row.worker_cpu_s - row.redis_cpu_s),
            "machine_busy_cores": row.machine_busy_cpu_s / row.seconds})
    return {"events": events, "partitions": partitions, "cpus": os.cpu_count(), "runs": by_kind,
            "storage_bytes": storage}


def print_scaling(result: dict, echo=print) -> None:
    echo(f"\ndrain of {result['events']:,} events over {result['partitions']} partitions, steady state "
         f"(every process consuming, up to {STEADY_UNTIL:.0%} handled), on {result['cpus']} CPUs")
    echo(f"{'redis':<14}{'processes':>10}{'events/s':>10}{'speed-up':>10}{'of linear':>10}"
         f"{'worker ms/ev':>14}{'redis ms/ev':>13}{'other ms/ev':>13}{'busy cores':>12}")
    for kind, runs in result["runs"].items():
        for r in runs:
            echo(f"{kind:<14}{r['processes']:>10}{r['events_per_s']:>10,.0f}{r['speed_up']:>10.2f}"
                 f"{r['linear_share']:>10.2f}{r['worker_cpu_ms_per_event']:>14.3f}{r['redis_cpu_ms_per_event']:>13.3f}"
                 f"{r['other_cpu_ms_per_event']:>13.3f}{r['machine_busy_cores']:>12.2f}")
    for kind, sizes in result["storage_bytes"].items():
        echo(f"{kind}: bytes held per " + ", ".join(f"{name} {value:,.0f}" for name, value in sizes.items()))
