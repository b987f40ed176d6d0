"""Prometheus metrics of one process, and its HTTP server for /metrics, /healthz and /readyz."""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from streamadapt.core.labels import TASKS
from streamadapt.schemas import RejectReason

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def observe_many(histogram: Histogram, amounts: np.ndarray) -> None:
    """`histogram.observe(amount)` for each amount, in one call per bucket rather than one per amount (the
    serving loop observes every prediction's latency). It reads prometheus_client's Histogram internals
    (`_upper_bounds`, `_buckets`, `_sum`); tests/test_metrics.py checks it against `observe`."""
    if len(amounts) == 0:
        return
    histogram._raise_if_not_observable()
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, amounts, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(np.sum(amounts)))
    for bucket, count in zip(histogram._buckets, counts.tolist()):
        if count:
            bucket.inc(count)


class WorkerMetrics:
    """Every metric the worker exports. Labels are bounded: reasons are an enum, partitions are few."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.events_consumed = Counter("streamadapt_events_consumed", "Input records consumed.", registry=r)
        self.dead_letters = Counter("streamadapt_events_dead_lettered", "Input records dead-lettered, by reason.",
                                    ["reason"], registry=r)
        for reason in RejectReason:
            self.dead_letters.labels(reason.value)  # export zeros so rate() works from the start
        self.outputs_refused = Counter("streamadapt_outputs_refused",
                                       "Outputs the broker refused for what they are (larger than the topic accepts, "
                                       "invalid), skipped with their input committed, by topic.", ["topic"], registry=r)
        self.duplicates = Counter("streamadapt_events_duplicate", "Valid events dropped as duplicates of an earlier event_id.",
                                  registry=r)
        self.predictions = Counter("streamadapt_predictions", "Predictions published.", ["task"], registry=r)
        for task in TASKS:
            self.predictions.labels(task)
        self.replayed = Counter("streamadapt_predictions_replayed",
                                "Predictions re-emitted unchanged for records seen before a restart.", registry=r)
        self.latency = Histogram("streamadapt_event_to_prediction_latency_seconds",
                                 "From the input record's Kafka timestamp to its prediction being acknowledged.",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_duration = Histogram("streamadapt_batch_duration_seconds", "Time to handle one polled batch.",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("streamadapt_batch_records", "Records per polled batch.",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000), registry=r)
        self.lag = Gauge("streamadapt_consumer_lag_records", "Log end offset minus committed offset, per partition.",
                         ["topic", "partition"], registry=r)
        self.model_info = Info("streamadapt_serving_model", "The model version this process serves.", registry=r)
        self.model_swaps = Counter("streamadapt_model_swaps", "Times the serving model was replaced.", registry=r)
        self.swaps_refused = Counter("streamadapt_model_swaps_refused",
                                     "Model versions refused (checksum, missing artifact or shape); the old one kept serving.",
                                     registry=r)
        self.swap_duration = Histogram("streamadapt_model_swap_duration_seconds", "Time the serving loop spent swapping weights.",
                                       buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25), registry=r)
        self.labels_resolved = Counter("streamadapt_labels_resolved", "Served predictions whose label resolved.",
                                       ["task"], registry=r)
        self.live_quality = Gauge("streamadapt_live_quality",
                                  "Prequential quality of served predictions over the rolling window, per serving version.",
                                  ["model_version", "measure"], registry=r)
        self.drift_alarms = Counter("streamadapt_drift_alarms", "Drift detector alarms on the live loss stream.", registry=r)
        self.finetune_runs = Counter("streamadapt_finetune_runs", "Fine-tune runs by outcome.", ["outcome"], registry=r)
        for outcome in ("promoted", "rejected", "failed", "skipped"):
            self.finetune_runs.labels(outcome)
        self.finetune_duration = Histogram("streamadapt_finetune_duration_seconds", "Duration of fine-tune runs.",
                                           buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640), registry=r)
        self.finetune_running = Gauge("streamadapt_finetune_running", "1 while this process runs a fine-tune.", registry=r)
        self.paced_partitions = Gauge("streamadapt_paced_partitions",
                                      "Input partitions paused because the stream is catching up (a replay, a "
                                      "backlog) and ran over --training-max-lag-s of event time ahead.", registry=r)
        self.pacing_pauses = Counter("streamadapt_pacing_pauses", "Input partitions paused by pacing, by reason: "
                                     "align (ahead of the slowest partition), round (ahead of a due fine-tune "
                                     "round), swap (until the new champion serves).", ["reason"], registry=r)
        for reason in ("align", "round", "swap"):
            self.pacing_pauses.labels(reason)
        self.trainer_leader = Gauge("streamadapt_trainer_leader", "1 while this process holds the trainer lease.", registry=r)
        self.window_examples = Gauge("streamadapt_window_examples", "Labelled examples held in the Redis windows.", registry=r)
        self.windows = Gauge("streamadapt_windows", "Event-time windows held in Redis.", registry=r)
        self.paused = Gauge("streamadapt_consumption_paused",
                            "1 while consumption is paused because Redis or Kafka refuses a batch's outputs.", registry=r)
        self.dependency_errors = Counter("streamadapt_dependency_errors",
                                         "Batches refused by an unavailable dependency, by dependency.", ["dependency"],
                                         registry=r)
        self.ready = Gauge("streamadapt_ready", "1 when connected to Kafka and Redis and serving a model.", registry=r)

    def total(self, sample_name: str) -> float:
        """Sum of a sample over all its label values (e.g. 'streamadapt_predictions_total')."""
        return sum(sample.value for metric in self.registry.collect() for sample in metric.samples
                   if sample.name == sample_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz (the process is alive) and /readyz (`is_ready()` is true) on one port."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int, is_ready: Callable[[], bool]):
        handler = _handler(metrics, is_ready)
        self._server = _BoundedHTTPServer((host, port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> HealthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# A client that connects and sends nothing (or trickles) holds a thread: each connection gets this long per read
# or write, and at most this many are served at once; more are closed at once. Scrapes and probes take
# milliseconds, and come a few at a time.
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 16


class _BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog: connections beyond it wait seconds for a SYN retry

    def __init__(self, address, handler) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handler(metrics: WorkerMetrics, is_ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ready = is_ready()
                self._send(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    return Handler
