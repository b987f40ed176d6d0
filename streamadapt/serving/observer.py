"""What a serving worker reports and watches besides serving: the metrics of every committed batch, the
prequential quality of the labels it resolved and the drift alarm, and, on a timer, the consumer's lag, live
quality, whether the consumer has stalled, and a progress line. Nothing here changes what is served.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from streamadapt.core.event_time import utc_datetime
from streamadapt.core.quality import QualityMonitor
from streamadapt.kafka.protocol import ServingConsumer
from streamadapt.metrics import WorkerMetrics
from streamadapt.serving.batch import Built, Resolved

log = logging.getLogger(__name__)

GAUGE_REFRESH_S = 5.0  # consumer lag and live quality are observations: refreshed on a timer, not per batch
# A consumer that owns partitions, is not paused, and has not fetched for this long has stalled inside the client
# (Observer.stalled). Its fetch rate covers about a minute, so a stall shows about two minutes after it began.
STALLED_AFTER_S = 60.0


class Observer:
    def __init__(self, consumer: ServingConsumer, metrics: WorkerMetrics, task: str, quality_window: int,
                 progress_interval_s: float, raise_drift_alarm: Callable[[float], None] | None = None):
        """`raise_drift_alarm(regime_since_ts)` asks the trainer for a fine-tune (StateStore.raise_drift_alarm)."""
        self._consumer = consumer
        self._metrics = metrics
        self._task = task
        self._quality = QualityMonitor(task, quality_window)
        self._quality_series: set[tuple[str, str]] = set()
        self._lag_series: set[tuple[str, str]] = set()
        self._raise_drift_alarm = raise_drift_alarm
        self._progress_interval_s = progress_interval_s
        self.stalled = False  # see check_fetching
        self._not_fetching_since: float | None = None
        now = time.monotonic()
        self._next_gauges_at = self._next_progress_at = now
        self._last_progress = (now, 0.0)

    def committed(self, built: Built) -> None:
        """Count a committed batch, and score the labels it resolved."""
        m, task = self._metrics, self._task
        for reason in built.dead_letter_reasons:
            m.dead_letters.labels(reason).inc()
        m.duplicates.inc(built.duplicates)
        m.replayed.inc(built.replayed)
        m.predictions.labels(task).inc(built.predicted)
        if built.resolved is not None:
            m.labels_resolved.labels(task).inc(built.labels_resolved)
            self._score(built.resolved)

    def tick(self, now: float, paused: bool) -> None:
        """The timed observations that are due (`paused`: an outage holds consumption back)."""
        if now >= self._next_gauges_at:
            self.refresh_lag()
            self.check_fetching(now, paused)
            self.refresh_quality()
            self._next_gauges_at = now + GAUGE_REFRESH_S
        if now >= self._next_progress_at:
            self.log_progress(now)
            self._next_progress_at = now + self._progress_interval_s

    def final(self) -> None:
        """The last observations, once serving has stopped."""
        self.refresh_quality()
        self.log_progress(time.monotonic())

    def _score(self, resolved: Resolved) -> None:
        """Prequential scores of the labels a committed batch resolved; on a drift alarm, ask the trainer for a
        fine-tune on the examples since the estimated change."""
        observe = self._quality.observe
        changes = [change for version, probabilities, label, resolved_ts_s in zip(*resolved, strict=True)
                   if (change := observe(version, probabilities, label, resolved_ts_s)) is not None]
        if not changes:
            return
        self._metrics.drift_alarms.inc(len(changes))
        log.warning("drift detector alarmed on the live loss stream; the change is estimated at event time %s",
                    utc_datetime(changes[-1]).isoformat())
        if self._raise_drift_alarm is not None:
            try:
                self._raise_drift_alarm(changes[-1])
            except redis.RedisError as error:  # the batch is committed; a lost alarm only delays a fine-tune
                log.warning("could not pass the drift alarm to the trainer: %s", error)

    def refresh_quality(self) -> None:
        """Export rolling quality per tracked version; drop the series of versions no longer tracked."""
        exported = set()
        for version, measures in self._quality.snapshot().items():
            for measure, value in measures.items():
                self._metrics.live_quality.labels(version, measure).set(value)
                exported.add((version, measure))
        for stale in self._quality_series - exported:
            self._metrics.live_quality.remove(*stale)
        self._quality_series = exported

    def refresh_lag(self) -> None:
        """Export the lag of each partition owned; drop the series of partitions no longer owned, whose last
        value would otherwise stay in the total and in the lag alert for ever."""
        try:
            lags = self._consumer.lag()
        except Exception as error:  # lag is an observation; a failed look-up must not stop serving
            log.warning("could not read consumer lag: %s", error)
            return
        exported = set()
        for tp, lag in lags.items():
            labels = (tp.topic, str(tp.partition))
            self._metrics.lag.labels(*labels).set(lag)
            exported.add(labels)
        for stale in self._lag_series - exported:
            self._metrics.lag.remove(*stale)
        self._lag_series = exported

    def check_fetching(self, now: float, paused: bool) -> None:
        """Whether the consumer has stalled: it owns partitions, consumption is not paused, and the client sent
        no fetch for STALLED_AFTER_S. Every poll then succeeds and returns nothing, and the lag gauge (the last
        fetch's high-water mark) can read 0, so nothing else would show it: kafka-python 3.0 once left a
        rebalance unfinished that way (streamadapt.kafka.workarounds). A stalled worker is not ready, and says
        so once."""
        try:
            fetching = self._consumer.fetching()
        except Exception as error:  # an observation, as the lag: a failed look-up must not stop serving
            log.warning("could not read whether the Kafka consumer fetches: %s", error)
            fetching = None
        owned = self._consumer.assignment() if fetching is False and not paused else set()
        if not owned:
            self._not_fetching_since = None
        elif self._not_fetching_since is None:
            self._not_fetching_since = now
        stalled = self._not_fetching_since is not None and now - self._not_fetching_since >= STALLED_AFTER_S
        if stalled and not self.stalled:
            log.error("the Kafka consumer owns %d partitions but has fetched nothing for over a minute, though every "
                      "poll succeeds: /readyz reports not ready; restart the worker if it does not recover", len(owned))
        elif self.stalled and not stalled:
            log.info("the Kafka consumer fetches again")
        self.stalled = stalled

    def log_progress(self, now: float) -> None:
        """One line of the counters, and the consumption rate since the last line."""
        metrics = self._metrics
        consumed = metrics.total("streamadapt_events_consumed_total")
        predicted = metrics.total("streamadapt_predictions_total")
        dead = metrics.total("streamadapt_events_dead_lettered_total")
        duplicates = metrics.total("streamadapt_events_duplicate_total")
        then, consumed_then = self._last_progress
        rate = (consumed - consumed_then) / max(1e-9, now - then)
        self._last_progress = (now, consumed)
        log.info("progress: consumed=%d predicted=%d dead_lettered=%d duplicates=%d rate=%.0f events/s",
                 consumed, predicted, dead, duplicates, rate)
