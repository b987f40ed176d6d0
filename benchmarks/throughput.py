"""`python -m benchmarks throughput`: how fast the worker drains a backlog, and its latency at fixed rates,
against the bare loops of each Kafka client on the same broker in the same run.

- bare loops (benchmarks.latency): at-least-once (consume each batch, produce one record per input record,
  flush, check every acknowledgement, commit: the least any worker on this client must do) and
  fire-and-forget (the client's ceiling), on kafka-python and on confluent-kafka;
- worker: `streamadapt run --no-finetune` as a real process, with validation, Redis state, inference,
  label join and the ordered commit.
A drain's time runs from the first record received to the last one handled; every contender drains a fresh
copy of the same backlog, in alternation. Latency rows (benchmarks.latency) are timed from each event's
scheduled send time. Peak RSS is the worker's VmHWM.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks import latency
from benchmarks.latency import bare_loop
from benchmarks.results import cell, goal_line, write_json
from streamadapt.kafka.admin import delete_topics, ensure_topics
from streamadapt.model.checkpoint import Parameters, ServingModel, read_metadata
from streamadapt.ops.generate import write_events
from streamadapt.ops.replay import replay
from streamadapt.ops.watch import metric_totals
from streamadapt.settings import KafkaSettings, Settings
from streamadapt.state.store import connect, drop_keys


@dataclass(frozen=True)
class DrainResult:
    name: str
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")


def drain_bare(kafka: KafkaSettings, client: str, mode: str, input_topic: str, output_topic: str, events: int,
               timeout_s: float) -> DrainResult:
    """Drain time of a bare loop (benchmarks.latency.bare_loop) on `client` in `mode`."""
    ensure_topics(kafka, [output_topic])  # as many partitions as the worker's outputs, and no error logged
    consumed, started, finished, deadline = 0, None, None, time.monotonic() + timeout_s

    def counted(n: int, polled_at: float) -> None:  # once a batch is handled, in the loop's mode
        nonlocal consumed, started, finished
        finished = time.perf_counter()
        started = started or polled_at
        consumed += n

    bare_loop(client, mode, kafka.bootstrap, input_topic, output_topic, f"bench-bare-{uuid.uuid4().hex[:8]}",
              kafka.max_poll_records, stop=lambda: consumed >= events or time.monotonic() > deadline, on_batch=counted)
    return DrainResult(f"bare {client} {mode}", consumed, (finished or 0.0) - (started or 0.0))


# How often the drain polls the worker's /metrics. Each scrape costs the worker ~1.5 ms of its serving
# thread; at 20 a second that was a few per cent of what is measured. 0.2 s bounds each end of the
# timing to 0.2 s, under 2 % of a 100k-event drain.
SCRAPE_INTERVAL_S = 0.2


def topics_of(input_topic: str) -> list[str]:
    """The topics of a bench worker reading `input_topic`: input, predictions, dead letters, model versions."""
    return [input_topic, f"{input_topic}.predictions", f"{input_topic}.dlq", f"{input_topic}.model-versions"]


@contextmanager
def deleted_when_done(kafka: KafkaSettings) -> Iterator[list[str]]:
    """A list to name topics in; they are deleted at the end, after every measurement (a deletion makes the
    broker delete files a minute later, which should not land in a drain)."""
    made: list[str] = []
    try:
        yield made
    finally:
        delete_topics(kafka, made)


@contextmanager
def worker_process(settings: Settings, checkpoint: Path, input_topic: str, log_path: Path,
                   extra_env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, int]]:
    """A real `streamadapt run` process on its own topics, group and Redis prefix (`bench-<run>`, or the
    STREAMADAPT_REDIS_KEY_PREFIX of `extra_env`): (process, metrics port). Its Redis keys are deleted when it
    stops; its topics, `topics_of(input_topic)`, are left to the caller."""
    run = uuid.uuid4().hex[:8]
    key_prefix = (extra_env or {}).get("STREAMADAPT_REDIS_KEY_PREFIX", f"bench-{run}")
    port = _free_port()
    _, predictions, dlq, model_versions = topics_of(input_topic)
    env = {**os.environ, **settings.as_environment(), "STREAMADAPT_KAFKA_INPUT_TOPIC": input_topic,
           "STREAMADAPT_KAFKA_PREDICTIONS_TOPIC": predictions, "STREAMADAPT_KAFKA_DLQ_TOPIC": dlq,
           "STREAMADAPT_KAFKA_MODEL_VERSIONS_TOPIC": model_versions,
           "STREAMADAPT_KAFKA_GROUP_ID": f"bench-worker-{run}", "STREAMADAPT_REDIS_KEY_PREFIX": key_prefix,
           "STREAMADAPT_METRICS_HOST": "127.0.0.1", "STREAMADAPT_METRICS_PORT": str(port),
           "STREAMADAPT_SOURCE_CHECKPOINT": str(checkpoint), "STREAMADAPT_NO_FINETUNE": "true", "STREAMADAPT_ROLE": "worker",
           **(extra_env or {})}
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "streamadapt.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        _drop_redis_keys(settings, key_prefix)


@dataclass(frozen=True)
class WorkerDrain:
    drain: DrainResult  # from its first consumed record to its last prediction
    peak_rss_mib: float  # its processes' peak resident memory, summed
    start_up_s: float  # from launching the process to its first consumed record (to within SCRAPE_INTERVAL_S)


def drain_worker(settings: Settings, checkpoint: Path, input_topic: str, events: int, timeout_s: float,
                 log_path: Path) -> WorkerDrain:
    """A real worker process (on the client library settings.kafka.client) drains the backlog."""
    launched = time.perf_counter()
    with worker_process(settings, checkpoint, input_topic, log_path) as (process, port):
        started, handled, deadline = None, 0.0, time.monotonic() + timeout_s
        while handled < events and time.monotonic() < deadline:
            if process.poll() is not None:
                raise _exited(process, log_path)
            metrics = _scrape(port)
            if metrics.get("streamadapt_events_consumed_total", 0.0) > 0 and started is None:
                started = time.perf_counter()
            handled = (metrics.get("streamadapt_predictions_total", 0.0)
                       + metrics.get("streamadapt_events_dead_lettered_total", 0.0))
            time.sleep(SCRAPE_INTERVAL_S)
        finished = time.perf_counter()
        peak_rss_mib = _peak_rss_mib(process.pid)
    started = started or finished
    return WorkerDrain(DrainResult(f"streamadapt worker ({settings.kafka.client})", int(handled), finished - started),
                       peak_rss_mib, started - launched)


FINETUNE_EVERY_S = 8.0  # with a round taking ~5 s, about half the events are sent during one


def worker_latency(settings: Settings, checkpoint: Path, input_topic: str, payloads: Path, rate: float,
                   seconds: float, log_path: Path, *, finetune: bool = False) -> dict:
    """A latency row (benchmarks.latency) of a fresh worker on `input_topic` (and the other `topics_of` it,
    all new), on the client of `settings`.

    With `finetune`, the worker runs with its trainer (`--role all`), which starts a fine-tune every
    FINETUNE_EVERY_S; the events due while the trainer's `streamadapt_finetune_running` gauge read 1 are also
    summarized apart from those due while it read 0: the interference of a fine-tune, on one worker at one time."""
    extra = {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "all", "STREAMADAPT_TRAINING_ON_DRIFT": "false",
             "STREAMADAPT_TRAINING_EVERY_S": str(FINETUNE_EVERY_S), "STREAMADAPT_TRAINING_EVERY_EXAMPLES": str(10**9),
             "STREAMADAPT_TRAINING_MIN_EXAMPLES": "500"} if finetune else {}
    ensure_topics(settings.kafka, topics_of(input_topic)[:3])  # the worker makes its one-partition model-versions
    redis_before = _redis_housekeeping(settings)
    name = f"worker ({settings.kafka.client}{', with its trainer' if finetune else ''})"
    with worker_process(settings, checkpoint, input_topic, log_path, extra) as (process, port):
        _wait_ready(process, port, log_path)
        if finetune:  # and its trainer child (metrics on the next port): it loads TensorFlow, which on a busy
            _wait_ready(process, port + 1, log_path)  # machine took longer than the row, and no fine-tune ran in it
        training: list[tuple[float, float]] = []  # wall-clock intervals with a fine-tune running
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_training, args=(port + 1, training, stop), daemon=True)
        if finetune:
            watcher.start()
        measured = latency.measure(settings.kafka.bootstrap, input_topic, f"{input_topic}.predictions",
                                         payloads, rate, seconds, name)
        stop.set()
        swaps = _swaps(_scrape(port)) if finetune else None
    row = {**measured.row.as_dict(), "swaps": swaps,
           "redis_rewrites": _rewrites_between(redis_before, _redis_housekeeping(settings))}
    if finetune:
        during = measured.due_within(training)
        row["while_training"] = measured.part(during).as_dict()
        row["between_training"] = measured.part(~during).as_dict()
    return row


def bare_latency(kafka: KafkaSettings, client: str, payloads: Path, rate: float, seconds: float) -> dict:
    """A latency row of the bare at-least-once loop on `client`, in a process of its own, on new topics."""
    run = uuid.uuid4().hex[:8]
    input_topic, output_topic = f"bench-bare-latency-{run}", f"bench-bare-latency-{run}.out"
    context = multiprocessing.get_context("spawn")
    stop, ready = context.Event(), context.Event()
    with deleted_when_done(kafka) as made:
        made += [input_topic, output_topic]
        ensure_topics(kafka, [input_topic, output_topic])
        loop = context.Process(target=latency.run_bare_loop,
                               args=(client, latency.AT_LEAST_ONCE, kafka.bootstrap, input_topic, output_topic,
                                     f"bench-bare-{run}", kafka.max_poll_records, stop, ready), daemon=True)
        loop.start()
        try:
            if not ready.wait(60):
                raise RuntimeError(f"the bare {client} loop was given no partition in 60 s")
            measured = latency.measure(kafka.bootstrap, input_topic, output_topic, payloads, rate, seconds,
                                             f"bare {client} at-least-once")
        finally:
            stop.set()
            loop.join(timeout=30)
            if loop.is_alive():
                loop.kill()
    return {**measured.row.as_dict(), "swaps": None, "redis_rewrites": 0}


def measure_swap(checkpoint: Path, swaps: int = 200) -> dict:
    """What a hot-swap costs the serving thread: ServingModel.swap of another version's weights, which
    checks they fit and serves them from the next batch on (the follower thread fetches and verifies them
    beforehand, off the serving path)."""
    model = ServingModel.from_checkpoint(checkpoint)
    versions = [Parameters([w * (1.0 + 0.01 * i) for w in model.weights]) for i in range(2)]
    durations = []
    for i in range(swaps):
        started = time.perf_counter()
        model.swap(versions[i % 2], f"bench-{i}")
        durations.append(time.perf_counter() - started)
    ms = np.array(durations) * 1000.0
    return {"swaps": swaps, "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def _watch_training(trainer_port: int, intervals: list[tuple[float, float]], stop: threading.Event) -> None:
    """Record the wall-clock intervals in which the trainer's fine-tune gauge reads 1 (sampled at 20 Hz)."""
    began = None
    while not stop.is_set():
        running = _scrape(trainer_port).get("streamadapt_finetune_running", 0.0) > 0
        now = time.time()
        if running and began is None:
            began = now
        elif not running and began is not None:
            intervals.append((began, now))
            began = None
        time.sleep(0.05)
    if began is not None:
        intervals.append((began, time.time()))


def _swaps(metrics: dict[str, float]) -> dict:
    count = metrics.get("streamadapt_model_swap_duration_seconds_count", 0.0)
    total = metrics.get("streamadapt_model_swap_duration_seconds_sum", 0.0)
    return {"count": int(count), "mean_ms": total / count * 1000.0 if count else float("nan"),
            "max_bucket_ms": _max_bucket_ms(metrics)}


def _wait_ready(process: subprocess.Popen, port: int, log_path: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _exited(process, log_path)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the worker was not ready after {timeout_s:.0f} s; it last logged: {_last_line(log_path)}")


def _exited(process: subprocess.Popen, log_path: Path) -> RuntimeError:
    """The error for a bench worker that exited. It names the last line the worker logged (its reason, when
    it refused to start), since its log goes with the bench's scratch directory."""
    return RuntimeError(f"the worker exited with {process.returncode}: {_last_line(log_path)}")


def _last_line(log_path: Path) -> str:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return next((line.strip() for line in reversed(lines) if line.strip()), "(nothing logged)")


def _drop_redis_keys(settings: Settings, key_prefix: str) -> None:
    """The benchmark's own Redis state goes when it is done."""
    with closing(connect(settings.redis)) as client:
        drop_keys(client, key_prefix)


def _rewrites_between(before: dict[str, float], after: dict[str, float]) -> int:
    return int(after["aof_rewrites"] - before["aof_rewrites"] + after["rdb_saves"] - before["rdb_saves"])


def _redis_housekeeping(settings: Settings) -> dict[str, float]:
    """What Redis holds, and how often it has rewritten its AOF or saved a snapshot: both fork and write the
    whole dataset, on the cores the drains are measured on."""
    with closing(connect(settings.redis)) as client:
        persistence, memory = client.info("persistence"), client.info("memory")
        return {"keys": client.dbsize(), "used_memory_mib": memory["used_memory"] / 2**20,
                "aof_rewrites": persistence.get("aof_rewrites", 0), "rdb_saves": persistence.get("rdb_saves", 0)}


REDIS_AT_REST_TIMEOUT_S = 300.0


def wait_for_redis_at_rest(settings: Settings, echo=print, timeout_s: float = REDIS_AT_REST_TIMEOUT_S) -> float:
    """Wait while Redis rewrites its AOF or saves a snapshot, so that a measurement does not carry the tail of
    one that the measurement before it began (each forks and takes most of a core for seconds; the worker's
    writes decide when one begins, not the measurement it lands in). The seconds waited; after `timeout_s`
    the measurement goes ahead, with a note."""
    started = time.monotonic()
    with closing(connect(settings.redis)) as client:
        while _redis_forked(client.info("persistence")):
            if time.monotonic() - started > timeout_s:
                echo(f"note: Redis is still rewriting or saving after {timeout_s:.0f} s; measuring anyway")
                break
            time.sleep(0.1)
    waited_s = time.monotonic() - started
    if waited_s >= 0.1:
        echo(f"waited {waited_s:.1f} s for Redis to finish an AOF rewrite or snapshot before measuring")
    return waited_s


def _redis_forked(persistence: dict) -> bool:
    return bool(persistence.get("aof_rewrite_in_progress") or persistence.get("aof_rewrite_scheduled")
                or persistence.get("rdb_bgsave_in_progress"))


FIXED_RATES_EVENTS_PER_S = (1000.0, 2000.0, 5000.0, 8000.0)  # and half the worker's drain rate
TRAINER_ROW_EVENTS_PER_S = 2000.0

# The issue's serving goals on the 2-core development machine, broker and Redis on the same machine.
GOAL_DRAIN_RATIO = 0.8  # x the bare at-least-once kafka-python loop, the client users named
GOAL_P99_MS = {2000.0: 20.0, 5000.0: 50.0}  # on the default client, at these rates
GOAL_P99_FACTOR_TO_BARE = 2.0  # at every fixed rate, x the same client's bare at-least-once loop
GOAL_FINETUNE_P99_FACTOR = 1.5
GOAL_HOT_SWAP_MS = 5.0
GOAL_PEAK_RSS_MIB = 1.5 * 1024

AT_LEAST_ONCE, FIRE_AND_FORGET = latency.AT_LEAST_ONCE, latency.FIRE_AND_FORGET


@dataclass(frozen=True)
class Drains:
    """Every drain of one bench run, in the order they ran, and what Redis did around them."""

    bare: dict[str, list[DrainResult]]  # by "client mode"
    workers: dict[str, list[WorkerDrain]]  # by client library; the configured client first
    redis_before: dict[str, float]
    redis_after: dict[str, float]


def run_throughput_bench(settings: Settings, events: int, checkpoint: Path | None, out: Path | None,
                         repeat: int = 3, timeout_s: float = 900.0, latency_s: float = 60.0, echo=print) -> dict:
    """Drain `events` with each contender, `repeat` times alternating, and report the medians; then, unless
    `latency_s` is 0, latency rows of `latency_s` each at FIXED_RATES_EVENTS_PER_S and at half the worker's
    drain rate, for the worker and the bare at-least-once loop on each client, and the worker with its trainer
    at TRAINER_ROW_EVENTS_PER_S. Prints the figures and the issue's goals judged from them; writes them as
    JSON to `out`. Both clients are measured, the one of `settings` first (its rows are judged against the
    goals of the default client)."""
    if checkpoint is not None:
        read_metadata(checkpoint)  # a checkpoint the workers would refuse stops the bench before any backlog
    other = "confluent" if settings.kafka.client == "kafka-python" else "kafka-python"
    clients = [settings.kafka.client, other]
    with tempfile.TemporaryDirectory(prefix="streamadapt-bench-") as scratch, deleted_when_done(settings.kafka) as made:
        scratch_dir = Path(scratch)
        stream, checkpoint = backlog_and_checkpoint(scratch_dir, events, checkpoint, echo)
        drains = drain_alternating(settings, clients, checkpoint, stream, events, repeat, timeout_s, scratch_dir,
                                   made, echo)
        swap = measure_swap(checkpoint)
        latencies: list[dict] = []
        if latency_s > 0:
            drain_rate = _median([d.drain for d in drains.workers[settings.kafka.client]]).events_per_s
            latencies = latency_rows(settings, clients, checkpoint, drain_rate, latency_s, scratch_dir, made, echo)
    result = throughput_result(settings.kafka.client, events, repeat, drains, swap, latencies)
    print_throughput(result, echo)
    if out is not None:
        write_json(out, result)
        echo(f"wrote {out}")
    return result


def drain_alternating(settings: Settings, clients: list[str], checkpoint: Path, stream: Path, events: int,
                      repeat: int, timeout_s: float, scratch_dir: Path, made: list[str], echo=print) -> Drains:
    """`repeat` rounds, each draining a fresh copy of `stream` with every bare loop (both modes on each client)
    and then with the worker on each client; every topic made is named in `made`."""
    bare_kinds = [(client, mode) for client in ["kafka-python"] + [c for c in clients if c != "kafka-python"]
                  for mode in (AT_LEAST_ONCE, FIRE_AND_FORGET)]
    bare: dict[str, list[DrainResult]] = {f"{client} {mode}": [] for client, mode in bare_kinds}
    workers: dict[str, list[WorkerDrain]] = {client: [] for client in clients}
    redis_before = _redis_housekeeping(settings)
    for attempt in range(1, repeat + 1):
        run = uuid.uuid4().hex[:8]
        topics = {**{kind: f"bench-bare-{kind.replace(' ', '-')}-{run}" for kind in bare},
                  **{client: f"bench-worker-{client}-{run}" for client in clients}}
        made += [*(t for kind in bare for t in (topics[kind], f"{topics[kind]}.out")),
                 *(t for c in clients for t in topics_of(topics[c]))]
        for topic in topics.values():
            replay(stream, settings.kafka.model_copy(update={"input_topic": topic}))
        echo(f"run {attempt}/{repeat}: backlog of {events} events produced for each contender")
        for client, mode in bare_kinds:
            kind = f"{client} {mode}"
            echo(f"run {attempt}/{repeat}: draining with the bare {kind} loop")
            wait_for_redis_at_rest(settings, echo)
            bare[kind].append(drain_bare(settings.kafka, client, mode, topics[kind], f"{topics[kind]}.out", events,
                                         timeout_s))
        for client in clients:
            echo(f"run {attempt}/{repeat}: draining with the worker on {client}")
            wait_for_redis_at_rest(settings, echo)
            on_client = _on_client(settings, client)
            workers[client].append(drain_worker(on_client, checkpoint, topics[client], events, timeout_s,
                                                scratch_dir / "worker.log"))
    return Drains(bare, workers, redis_before, _redis_housekeeping(settings))


def _on_client(settings: Settings, client: str) -> Settings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"client": client})})


def latency_rows(settings: Settings, clients: list[str], checkpoint: Path, drain_rate: float, latency_s: float,
                 scratch_dir: Path, made: list[str], echo=print) -> list[dict]:
    """At each fixed rate and at half `drain_rate`: a row for the worker and one for the bare at-least-once
    loop on each client; then the worker on the default client with its trainer. Each row as a dict."""
    rates = sorted({*FIXED_RATES_EVENTS_PER_S, round(drain_rate / 2)})
    payloads = scratch_dir / "latency.jsonl"
    latency.write_payloads(payloads, int(max(rates) * latency_s) + 1)
    rows = []
    for rate in rates:
        for client in clients:
            echo(f"latency at {rate:,.0f} events/s: the bare {client} loop, then the worker on {client}")
            wait_for_redis_at_rest(settings, echo)
            rows.append(bare_latency(settings.kafka, client, payloads, rate, latency_s))
            input_topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
            made += topics_of(input_topic)
            wait_for_redis_at_rest(settings, echo)
            rows.append(worker_latency(_on_client(settings, client), checkpoint, input_topic, payloads, rate, latency_s,
                                       scratch_dir / "latency.log"))
    echo(f"latency at {TRAINER_ROW_EVENTS_PER_S:,.0f} events/s with the trainer, on {settings.kafka.client}")
    input_topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    made += topics_of(input_topic)
    wait_for_redis_at_rest(settings, echo)
    rows.append(worker_latency(settings, checkpoint, input_topic, payloads, TRAINER_ROW_EVENTS_PER_S, latency_s,
                               scratch_dir / "latency.log", finetune=True))
    return rows


def throughput_result(client: str, events: int, repeat: int, drains: Drains, swap: dict, latencies: list[dict]) -> dict:
    """The bench's JSON: medians of the drains, each client's figures and ratios, the hot-swaps, the latency
    rows, what Redis did during the drains, and the goals judged from them."""
    bare = {kind: _median(runs) for kind, runs in drains.bare.items()}
    named = bare[f"kafka-python {AT_LEAST_ONCE}"]
    by_client = {}
    for name, runs in drains.workers.items():
        median = _median([run.drain for run in runs])
        own = bare.get(f"{name} {AT_LEAST_ONCE}", named)
        ceiling = bare.get(f"{name} {FIRE_AND_FORGET}")
        by_client[name] = {"name": median.name, "events": median.events, "seconds": median.seconds,
                           "events_per_s": median.events_per_s,
                           "ratio_to_bare_kafka_python": median.events_per_s / named.events_per_s,
                           "ratio_to_own_bare": median.events_per_s / own.events_per_s,
                           "ratio_to_own_fire_and_forget": (median.events_per_s / ceiling.events_per_s
                                                            if ceiling else float("nan")),
                           "runs_events_per_s": [run.drain.events_per_s for run in runs],
                           "ratio_per_run": [run.drain.events_per_s / b.events_per_s
                                             for run, b in zip(runs, drains.bare[f"kafka-python {AT_LEAST_ONCE}"])],
                           "peak_rss_mib": max(run.peak_rss_mib for run in runs),
                           "start_up_s": float(np.median([run.start_up_s for run in runs])),
                           "start_up_s_per_run": [run.start_up_s for run in runs]}
    before, after = drains.redis_before, drains.redis_after
    result = {"events": events, "repeat": repeat, "client": client,
              "bare": {kind: {**asdict(median), "events_per_s": median.events_per_s,
                              "runs_events_per_s": [r.events_per_s for r in drains.bare[kind]]}
                       for kind, median in bare.items()},
              "workers_by_client": by_client,
              "hot_swap": swap,
              "latency": latencies,
              "redis": {"keys_at_start": before["keys"], "used_memory_mib_at_start": before["used_memory_mib"],
                        "aof_rewrites_during_drains": after["aof_rewrites"] - before["aof_rewrites"],
                        "snapshots_during_drains": after["rdb_saves"] - before["rdb_saves"]},
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    result["goals"] = goals(result)
    return result


def _row(rows: list[dict], contender: str, rate: float) -> dict | None:
    return next((row for row in rows if row["contender"] == contender and row["offered_events_per_s"] == rate), None)


def goals(result: dict) -> list[dict]:
    """The issue's serving goals, each with its figures and whether `result` meets it: True, False, or None
    when the run did not measure it (latency skipped, or no fine-tune ran during the trainer's row)."""
    client = result["client"]
    chosen = result["workers_by_client"][client]
    per_run = ", ".join(f"{ratio:.3f}" for ratio in chosen["ratio_per_run"])
    checked = [{"goal": f"drain rate at least {GOAL_DRAIN_RATIO} x the bare at-least-once kafka-python loop's",
                "figures": f"{chosen['ratio_to_bare_kafka_python']:.3f} on {client} (per run: {per_run}); "
                           f"{chosen['ratio_to_own_bare']:.3f} of {client}'s own bare loop",
                "met": chosen["ratio_to_bare_kafka_python"] >= GOAL_DRAIN_RATIO}]
    rows = result["latency"]
    for rate, limit in GOAL_P99_MS.items():
        row = _row(rows, f"worker ({client})", rate)
        p99 = float("nan") if row is None else row["p99_ms"]
        missing = 0 if row is None else row["missing"]
        checked.append({"goal": f"p99 at most {limit:g} ms at {rate:,.0f} events/s on {client}, nothing missing",
                        "figures": "not measured" if row is None else f"{cell(p99, '.1f')} ms, {missing} missing",
                        "met": None if math.isnan(p99) else p99 <= limit and missing == 0})
    for worker_client in result["workers_by_client"]:
        pairs = [(rate, _row(rows, f"worker ({worker_client})", rate), _row(rows, f"bare {worker_client} at-least-once", rate))
                 for rate in sorted({row["offered_events_per_s"] for row in rows})]
        pairs = [(rate, w, b) for rate, w, b in pairs if w is not None and b is not None]
        ratios = [(rate, w["p99_ms"] / b["p99_ms"]) for rate, w, b in pairs]
        checked.append({"goal": f"p99 at most {GOAL_P99_FACTOR_TO_BARE:g} x the bare {worker_client} loop's at every rate",
                        "figures": ", ".join(f"{ratio:.2f} x at {rate:,.0f}/s" for rate, ratio in ratios) or "not measured",
                        "met": all(ratio <= GOAL_P99_FACTOR_TO_BARE for _, ratio in ratios) if ratios else None})
    trainer = next((row for row in rows if row.get("while_training") is not None), None)
    during, between = ((trainer["while_training"]["p99_ms"], trainer["between_training"]["p99_ms"]) if trainer
                       else (float("nan"), float("nan")))
    measured = not (math.isnan(during) or math.isnan(between))
    checked.append({"goal": f"p99 during a fine-tune at most {GOAL_FINETUNE_P99_FACTOR:g} x p99 between fine-tunes",
                    "figures": (f"{during:.1f} against {between:.1f} ms ({during / between:.2f} x)" if measured else
                                "not measured" if trainer is None else "no fine-tune ran during the row"),
                    "met": during <= GOAL_FINETUNE_P99_FACTOR * between if measured else None})
    swap = result["hot_swap"]
    checked += [
        {"goal": f"every hot-swap at most {GOAL_HOT_SWAP_MS:g} ms",
         "figures": f"median {swap['median_ms']:.3f} ms, slowest {swap['max_ms']:.2f} ms of {swap['swaps']}",
         "met": swap["max_ms"] <= GOAL_HOT_SWAP_MS},
        {"goal": f"worker peak RSS at most {GOAL_PEAK_RSS_MIB / 1024:g} GiB",
         "figures": f"{chosen['peak_rss_mib']:.0f} MiB", "met": chosen["peak_rss_mib"] <= GOAL_PEAK_RSS_MIB}]
    return checked


def print_throughput(result: dict, echo=print) -> None:
    """The compact tables of a `throughput_result`, ending with its goals."""
    echo(f"{'median of ' + str(result['repeat']) + ' runs':44}{'events':>8}{'seconds':>10}{'events/s':>11}   runs (events/s)")
    for row in [*result["bare"].values(), *result["workers_by_client"].values()]:
        shown = " ".join(f"{rate:.0f}" for rate in row["runs_events_per_s"])
        echo(f"{row['name']:44}{row['events']:>8}{row['seconds']:>10.2f}{row['events_per_s']:>11.0f}   {shown}")
    for client, figures in result["workers_by_client"].items():
        echo(f"worker ({client}): {figures['ratio_to_bare_kafka_python']:.3f} of bare kafka-python at-least-once, "
             f"{figures['ratio_to_own_bare']:.3f} of its own client's, {cell(figures['ratio_to_own_fire_and_forget'], '.3f')} "
             f"of its fire-and-forget; peak RSS {figures['peak_rss_mib']:.0f} MiB, start-up {figures['start_up_s']:.1f} s")
    housekeeping = result["redis"]
    if housekeeping["aof_rewrites_during_drains"] or housekeeping["snapshots_during_drains"]:
        echo(f"note: Redis rewrote its append-only file {housekeeping['aof_rewrites_during_drains']} time(s) and saved "
             f"{housekeeping['snapshots_during_drains']} snapshot(s) during the drains, with "
             f"{housekeeping['keys_at_start']} keys ({housekeeping['used_memory_mib_at_start']:.0f} MiB) in it at the "
             "start: the worker's runs carry that work (a fresh Redis does not)")
    swap = result["hot_swap"]
    echo(f"hot-swap on the serving thread: median {swap['median_ms']:.3f} ms, p99 {swap['p99_ms']:.3f} ms, "
         f"max {swap['max_ms']:.3f} ms over {swap['swaps']} swaps")
    if result["latency"]:
        echo(f"{'latency from the scheduled send time':40}{'events/s':>9}{'missing':>8}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'p99.9 ms':>10}{'max ms':>9}   p99 per 10 s (ms)")
    for row in result["latency"]:
        parts = [("", row)] + [(label, row[key]) for label, key in (("  of which due during a fine-tune", "while_training"),
                                                                    ("  and due between fine-tunes", "between_training"))
                               if row.get(key) is not None]
        for label, part in parts:
            slices = " ".join(cell(v, ".0f") for v in part["p99_ms_per_slice"]) if not label else ""
            echo(f"{label or row['contender']:40}{part['offered_events_per_s']:>9.0f}{part['missing']:>8}"
                 f"{cell(part['p50_ms'], '.1f'):>9}{cell(part['p99_ms'], '.1f'):>9}{cell(part['p999_ms'], '.1f'):>10}"
                 f"{cell(part['max_ms'], '.1f'):>9}   {slices}")
        if row["redis_rewrites"]:
            echo(f"  Redis began {row['redis_rewrites']} AOF rewrite(s) or snapshot(s) meanwhile: latency spikes for seconds")
        if row["swaps"] is not None:
            echo(f"  hot-swaps: {row['swaps']['count']}, mean {cell(row['swaps']['mean_ms'], '.2f')} ms, "
                 f"slowest <= {cell(row['swaps']['max_bucket_ms'], 'g')} ms")
    for goal in result["goals"]:
        echo(goal_line(goal))


def _median(runs: list[DrainResult]) -> DrainResult:
    return sorted(runs, key=lambda r: r.events_per_s)[len(runs) // 2]


def backlog_and_checkpoint(scratch_dir: Path, events: int, checkpoint: Path | None, echo) -> tuple[Path, Path]:
    """The benchmarks' backlog (a generated target stream of `events`) in `scratch_dir`, and the checkpoint to
    serve: `checkpoint`, or a small one pretrained there."""
    stream = scratch_dir / "events.jsonl"
    write_events(stream, events=events, market="target", seed=99)
    return stream, checkpoint if checkpoint is not None else _quick_checkpoint(scratch_dir, echo)


def _quick_checkpoint(scratch_dir: Path, echo) -> Path:
    from streamadapt.training.pretrain import pretrain

    echo("no --source-checkpoint given: pretraining a small one")
    source = scratch_dir / "source.jsonl"
    write_events(source, events=20_000, market="source", seed=98)
    pretrain(source, scratch_dir / "checkpoint", task="next_category", horizon_days=7, epochs=2)
    return scratch_dir / "checkpoint"


_SWAP_BUCKET = "streamadapt_model_swap_duration_seconds_bucket{"


def _scrape(port: int) -> dict[str, float]:
    """A worker's metric totals (streamadapt.ops.watch.metric_totals); empty when its port does not answer."""
    try:
        return metric_totals(f"http://127.0.0.1:{port}/metrics", timeout_s=2.0)
    except OSError:
        return {}


def _max_bucket_ms(metrics: dict[str, float]) -> float:
    """The upper bound of the swap-duration bucket holding the slowest swap."""
    buckets = sorted((float(key[len(_SWAP_BUCKET):-1]), count) for key, count in metrics.items()
                     if key.startswith(_SWAP_BUCKET))
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if count >= total and total > 0:
            return bound * 1000.0
    return float("nan")


def _peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a worker: the VmHWM of its process and of every process under it (the trainer
    when there is one), summed. Their peaks need not coincide: this is an upper bound."""
    total_kib = 0
    for process in [pid, *_descendants(pid)]:
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024.0


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *_descendants(int(child))]
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
