import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from streamadapt.metrics import HealthServer, WorkerMetrics, observe_many

OPERATIONS = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()


def exported_names(metrics: WorkerMetrics) -> set[str]:
    """Sample names, plus the declared families (a labelled metric has no sample before first use)."""
    lines = metrics.render().decode().splitlines()
    samples = {line.split("{")[0].split(" ")[0] for line in lines if line and not line.startswith("#")}
    families = {line.split(" ")[2] for line in lines if line.startswith("# TYPE ")}
    return samples | families


def test_every_metric_named_in_the_operations_guide_is_exported():
    metrics = WorkerMetrics()
    exported = exported_names(metrics)
    documented = set(re.findall(r"`(streamadapt_[a-z_]+)", OPERATIONS))
    assert documented, "docs/operations.md lists the metrics"
    missing = {name for name in documented if not any(e == name or e.startswith(name + "_") for e in exported)}
    assert not missing


def test_metric_names_follow_prometheus_conventions():
    for name in exported_names(WorkerMetrics()):
        if name.startswith("streamadapt_"):
            assert re.fullmatch(r"streamadapt_[a-z_]+", name), name
            assert not name.endswith("_total_total")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.mark.parametrize("ready, expected", [(True, 200), (False, 503)])
def test_health_endpoints(ready, expected):
    metrics = WorkerMetrics()
    metrics.dead_letters.labels("invalid_json").inc(3)
    with HealthServer(metrics, "127.0.0.1", 0, is_ready=lambda: ready) as server:
        assert get(server.port, "/healthz")[0] == 200
        assert get(server.port, "/readyz")[0] == expected
        status, body = get(server.port, "/metrics")
        assert status == 200
        assert 'streamadapt_events_dead_lettered_total{reason="invalid_json"} 3.0' in body
        assert get(server.port, "/nope")[0] == 404


def test_idle_connections_neither_hold_the_server_for_ever_nor_keep_a_scrape_out(monkeypatch):
    import socket
    import time

    monkeypatch.setattr("streamadapt.metrics.REQUEST_TIMEOUT_S", 0.5)
    with HealthServer(WorkerMetrics(), "127.0.0.1", 0, is_ready=lambda: True) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]  # slowloris: never a request
        time.sleep(0.2)
        started = time.monotonic()
        try:  # while every slot is held: closed at once, not left waiting
            get(server.port, "/healthz")
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() - started < 0.4
        time.sleep(1.0)  # the server has timed the idle ones out
        for connection in idle:
            connection.settimeout(2.0)
            assert connection.recv(1) == b""  # closed by the server, its thread free
        assert get(server.port, "/healthz")[0] == 200
        for connection in idle:
            connection.close()


LATENCY = "streamadapt_event_to_prediction_latency_seconds"


def test_observing_many_amounts_at_once_counts_as_observing_each():
    one_by_one, at_once = WorkerMetrics(), WorkerMetrics()
    amounts = np.array([0.0, 0.0004, 0.001, 0.0011, 0.05, 0.7, 12.0, 45.0, 0.001])  # on and between bucket bounds
    for amount in amounts:
        one_by_one.latency.observe(float(amount))
    observe_many(at_once.latency, amounts)
    observe_many(at_once.latency, np.zeros(0))
    def latency_lines(metrics):
        return [line for line in metrics.render().decode().splitlines()
                if line.startswith(LATENCY) and not line.startswith(LATENCY + "_created")]

    assert latency_lines(at_once) == latency_lines(one_by_one) and len(latency_lines(at_once)) > 10


def test_the_model_version_has_one_label_name_across_every_metric():
    metrics = WorkerMetrics()
    metrics.model_info.info({"model_version": "v3", "task": "next_category"})
    metrics.live_quality.labels("v3", "log_loss").set(1.0)
    labels = {name for line in metrics.render().decode().splitlines() if line.startswith("streamadapt_")
              for name in re.findall(r"(\w+)=\"", line)}
    assert "model_version" in labels and not labels & {"version", "model"}
