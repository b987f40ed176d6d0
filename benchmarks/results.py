"""Benchmark results as strict JSON, as table cells and as goal verdicts. A figure that could not be
measured is NaN in the result (accuracy over a span with no labels, percentiles of no events). It is
written as null in the JSON (Python's default `NaN` token is not JSON, and jq, JavaScript's JSON.parse and
most other readers refuse the whole file for it) and as a dash in the printed table."""
from __future__ import annotations

import json
import math
from pathlib import Path


def write_json(path: Path, result: dict) -> None:
    path.write_text(json.dumps(finite_or_null(result), indent=2, allow_nan=False) + "\n")


def finite_or_null(value):
    """`value` with every NaN or infinite float, however deeply nested in dicts and lists, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def cell(value: float, spec: str) -> str:
    """A figure for a printed table, formatted by `spec`, or a dash where it could not be measured."""
    return "–" if math.isnan(value) else format(value, spec)


def goal_line(goal: dict) -> str:
    """One printed line for a judged goal ({"goal", "figures", "met"}; met is None when it was not measured)."""
    verdict = "not judged" if goal["met"] is None else "met" if goal["met"] else "MISSED"
    return f"goal {verdict}: {goal['goal']}: {goal['figures']}"
