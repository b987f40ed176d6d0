"""The observer's gauges follow the partitions owned now, and the live quality the versions tracked now."""
from types import SimpleNamespace

from streamadapt.kafka.protocol import TopicPartition
from streamadapt.metrics import WorkerMetrics
from streamadapt.serving.observer import Observer

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def lag_series(metrics: WorkerMetrics) -> dict[str, float]:
    return {sample.labels["partition"]: sample.value for family in metrics.registry.collect()
            if family.name == "streamadapt_consumer_lag_records" for sample in family.samples}


def test_the_lag_of_a_partition_taken_away_in_a_rebalance_is_no_longer_exported():
    lags = {P0: 5, P1: 7}
    metrics = WorkerMetrics()
    observer = Observer(SimpleNamespace(lag=lambda: dict(lags)), metrics, "next_category", 100, 10.0)
    observer.refresh_lag()
    assert lag_series(metrics) == {"0": 5.0, "1": 7.0}
    del lags[P1]  # revoked
    lags[P0] = 2
    observer.refresh_lag()
    assert lag_series(metrics) == {"0": 2.0}


def test_a_failed_lag_look_up_keeps_the_last_figures_and_serving_goes_on(caplog):
    def lag():
        raise RuntimeError("broker away")

    metrics = WorkerMetrics()
    metrics.lag.labels("in", "0").set(3)
    Observer(SimpleNamespace(lag=lag), metrics, "next_category", 100, 10.0).refresh_lag()
    assert lag_series(metrics) == {"0": 3.0} and "could not read consumer lag" in caplog.text
