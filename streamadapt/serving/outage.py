"""Consumption paused while Redis or Kafka refuses the serving loop's work: the pause, the backoff between
tries, and their metrics and log lines. The loop decides what to retry and what to read again; this module
only waits, keeping the consumer in its group meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from streamadapt.kafka.protocol import InputRecord, ServingConsumer
from streamadapt.metrics import WorkerMetrics

log = logging.getLogger(__name__)

FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0

T = TypeVar("T")


class Outage:
    def __init__(self, consumer: ServingConsumer, metrics: WorkerMetrics,
                 read_again: Callable[[list[InputRecord]], None], polled: Callable[[], None]):
        """`read_again(records)` seeks back to records a poll returned while paused (from partitions assigned
        during the wait); `polled()` is called after each poll, which proves the consumer alive."""
        self._consumer = consumer
        self._metrics = metrics
        self._read_again = read_again
        self._polled = polled
        self.since: float | None = None  # monotonic time the current outage began
        self._retry_in_s = FIRST_RETRY_S

    @property
    def paused(self) -> bool:
        return self.since is not None

    def wait_out(self, error: Exception, stop: threading.Event | None) -> None:
        """Pause every assigned partition and wait the backoff (less if `stop` is set) while polling, which
        keeps the consumer in its group; the next wait is twice as long, up to MAX_RETRY_S."""
        dependency = "redis" if isinstance(error, redis.RedisError) else "kafka"
        self._metrics.dependency_errors.labels(dependency).inc()
        if self.since is None:
            self.since = time.monotonic()
            self._metrics.paused.set(1)
            log.error("%s refused the batch's outputs (%s: %s): consumption paused, retrying", dependency,
                      type(error).__name__, error)
        else:
            log.warning("still failing after %.0f s (%s: %s); next try in %.1f s",
                        time.monotonic() - self.since, type(error).__name__, error, self._retry_in_s)
        until = time.monotonic() + self._retry_in_s
        while time.monotonic() < until and not (stop is not None and stop.is_set()):
            self._consumer.pause_all()
            slice_ms = max(1, int(min(1.0, until - time.monotonic()) * 1000))
            self._read_again(self._consumer.poll(slice_ms))
            self._polled()
        self._consumer.pause_all()
        self._retry_in_s = min(2 * self._retry_in_s, MAX_RETRY_S)

    def retry(self, attempt: Callable[[], T], error: Exception,
              outage_errors: type[Exception] | tuple[type[Exception], ...], stop: threading.Event | None,
              between: Callable[[], None] = lambda: None) -> T:
        """After `error`, wait the outage out and call `attempt` again until it returns, or until `stop` is set
        (or there is no `stop`: inside a rebalance), when the last error is raised and the work is read again
        by the partitions' next owner. `between()` is called before each wait."""
        while True:
            if stop is None or stop.is_set():
                raise error
            between()
            self.wait_out(error, stop)
            try:
                return attempt()
            except outage_errors as again:
                error = again

    def end(self, why: str = "outputs accepted again") -> None:
        """The dependency answers again: resume consumption, and start the next outage's backoff afresh."""
        self._retry_in_s = FIRST_RETRY_S
        if self.since is not None:
            log.warning("%s after %.1f s: resuming consumption", why, time.monotonic() - self.since)
            self.since = None
            self._metrics.paused.set(0)
            self._consumer.resume_all()
