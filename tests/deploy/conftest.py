"""Readers of the shipped deployment files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DASHBOARDS = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every shipped dashboard, with every variable at "All" (`.*`),
    as Grafana sends it when the dashboard opens."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append((panel["title"], re.sub(r"\$(instance|model_version)\b", ".*", target["expr"])))
    return queries


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (ours and the client library's process/GC metrics)."""
    names = set(re.findall(r"\b((?:streamadapt|process|python)_[a-z0-9_]+)\b", expr))
    if re.search(r"\bup\b", expr):
        names.add("up")
    return names
