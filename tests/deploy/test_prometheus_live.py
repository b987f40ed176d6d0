"""A real Prometheus scrapes a live worker on the real stack with the shipped scrape config (targets
rewritten to the worker's port) and alert rules; every dashboard query and alert expression is then
evaluated through its HTTP API."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.deploy.conftest import ALERTS, SCRAPE_CONFIG, alert_rules, dashboard_queries
from tests.integration.conftest import WorkerProcess, dumps, event, free_port, produce

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs Debian's prometheus (scripts/install)")]

# Panels that must show data on any live worker that has served traffic.
CORE = {"Events consumed and predicted", "Consumer lag per partition", "Event to prediction (p50, p99, p99.9)",
        "Dead letters by reason", "Serving version by replica", "Live log-loss (prequential)", "CPU", "Resident memory"}


def api(port: int, query: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read())


@pytest.fixture
def prometheus(tmp_path):
    """Start Prometheus with the shipped config, scraping `targets` set by the test before start()."""
    processes = []

    def start(worker_port: int) -> int:
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        config["rule_files"] = [str(ALERTS)]
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs")
            job["static_configs"] = [{"targets": [f"127.0.0.1:{worker_port}"]}] if job["job_name"] == "streamadapt-worker" else []
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(subprocess.Popen(["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                           f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    return port
            except OSError:
                time.sleep(0.3)
        raise AssertionError((tmp_path / "prometheus.log").read_text()[-2000:])

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def test_every_dashboard_query_and_alert_runs_against_a_live_worker(stack, names, checkpoint, tmp_path, prometheus):
    env = {"STREAMADAPT_NO_FINETUNE": "false", "STREAMADAPT_ROLE": "worker"}
    with WorkerProcess(stack, names, checkpoint, tmp_path / "worker.log", **env) as worker:
        port = prometheus(worker.port)
        bodies = [dumps(event(i, user=f"user-{i % 30}")) for i in range(3000)] + [b"not json", b"[1]"]
        for start in range(0, len(bodies), 500):  # traffic spread over a few scrapes, so rate() has points
            produce(stack, names.input_topic, bodies[start:start + 500])
            time.sleep(1.5)
        worker.wait_metric("streamadapt_events_consumed_total", len(bodies))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = api(port, "sum(streamadapt_events_consumed_total)")["data"]["result"]
            if result and float(result[0]["value"][1]) >= len(bodies):
                break
            time.sleep(1)
        time.sleep(6)  # a few more scrapes after the last event, for rate() windows

        empty, failed = [], []
        for title, expr in dashboard_queries():
            answer = api(port, expr)
            if answer.get("status") != "success":
                failed.append((title, expr, answer.get("error")))
            elif not answer["data"]["result"]:
                empty.append(title)
        print(f"{len(dashboard_queries()) - len(empty)} of {len(dashboard_queries())} dashboard queries returned series; "
              f"empty: {empty}")
        assert not failed, failed
        assert not CORE & set(empty), f"core panels without data: {CORE & set(empty)}"
        assert len(empty) <= len(dashboard_queries()) // 5, f"too many empty panels: {empty}"

        for rule in alert_rules():
            answer = api(port, rule["expr"])
            assert answer.get("status") == "success", (rule["alert"], answer.get("error"))
        up = api(port, 'up{job="streamadapt-worker"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        assert worker.stop() == 0
