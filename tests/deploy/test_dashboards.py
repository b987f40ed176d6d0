"""Dashboards and alert rules parse and read only metrics the worker really exports."""
import json
import shutil
import subprocess

import pytest

from streamadapt.metrics import WorkerMetrics
from tests.deploy.conftest import (
    ALERTS,
    DASHBOARDS,
    HISTOGRAM_SUFFIXES,
    REPO,
    SCRAPE_CONFIG,
    alert_rules,
    dashboard_queries,
    metric_names,
)


def exported_families() -> set[str]:
    families = set()
    metrics = WorkerMetrics()
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            families.add(name)
            if kind == "counter":
                families.add(name + "_total")
    return families | {"up"}


def family_of(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.removesuffix("_info") if name.endswith("_model_info") else name


@pytest.mark.parametrize("title, expr", dashboard_queries() + [(r["alert"], r["expr"]) for r in alert_rules()])
def test_queries_read_only_exported_metrics(title, expr):
    names = metric_names(expr)
    assert names, f"{title}: reads no metric"
    known = exported_families()
    unknown = {n for n in names if family_of(n) not in known and n not in known}
    assert not unknown, f"{title}: {unknown}"


def test_dashboard_has_the_rows_users_look_for_and_imports_into_any_grafana():
    """Every panel reads the data source the `datasource` variable names (the provisioned one by default, any
    Prometheus in a Grafana it is imported into), and every query follows the instance variable."""
    provisioned = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
        assert {"Throughput and lag", "Latency", "Dead letters and duplicates", "Live model", "Training", "Process"} <= rows
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert f"uid: {variables['datasource']['current']['value']}" in provisioned
        assert {"instance", "model_version"} <= set(variables)
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}"
                for target in panel["targets"]:
                    assert target["datasource"]["uid"] == "${datasource}"
                    assert 'instance=~"$instance"' in target["expr"], target["expr"]
                    if "live_quality" in target["expr"] or "serving_model_info" in target["expr"]:
                        assert 'model_version=~"$model_version"' in target["expr"]


def test_alerts_cover_what_operators_need():
    names = {r["alert"] for r in alert_rules()}
    assert {"StreamadaptWorkerDown", "StreamadaptWorkersMissing", "StreamadaptConsumerLagGrowing",
            "StreamadaptDeadLetterRateHigh", "StreamadaptNoPromotionForLong", "StreamadaptLiveQualityDropping",
            "StreamadaptFineTuneFailures", "StreamadaptNoTrainerLeading"} <= names
    assert all(r.get("annotations", {}).get("summary") for r in alert_rules())
    workers_missing = next(r for r in alert_rules() if r["alert"] == "StreamadaptWorkersMissing")
    assert workers_missing["expr"].startswith("absent(")  # fires when no worker is scraped at all


def test_every_alert_links_to_its_runbook_section():
    operations = (REPO / "docs" / "operations.md").read_text()
    headings = {line[4:].strip().lower() for line in operations.splitlines() if line.startswith("### ")}
    for rule in alert_rules():
        link = rule["annotations"].get("runbook_url", "")
        assert link == f"docs/operations.md#{rule['alert'].lower()}", rule["alert"]
        assert rule["alert"].lower() in headings, f"no runbook section for {rule['alert']}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus (scripts/install)")
def test_promtool_accepts_the_shipped_files():
    rules = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(["promtool", "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr
