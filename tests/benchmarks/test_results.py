import json
import math

import numpy as np
import pytest

from benchmarks.results import cell, finite_or_null, goal_line, write_json


def test_figures_that_could_not_be_measured_are_written_as_null(tmp_path):
    result = {"p99_ms": float("nan"), "rows": [{"later": np.float64("nan"), "before": 0.25}, (float("inf"), 3)],
              "name": "static", "count": 0, "met": None}
    path = tmp_path / "bench.json"
    write_json(path, result)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "p99_ms": None, "rows": [{"later": None, "before": 0.25}, [None, 3]], "name": "static", "count": 0, "met": None}
    assert math.isnan(result["p99_ms"])  # the result itself is left as it was


def test_finite_values_pass_unchanged():
    assert finite_or_null({"a": [1, 2.5, "x", True], "b": {"c": -0.0}}) == {"a": [1, 2.5, "x", True], "b": {"c": -0.0}}


def test_a_table_cell_is_the_formatted_figure_or_a_dash():
    assert cell(12.345, ".1f") == "12.3"
    assert cell(np.float64(0.5), ".3f") == "0.500"
    assert cell(float("nan"), ".1f") == "–"


@pytest.mark.parametrize("met, verdict", [(True, "met"), (False, "MISSED"), (None, "not judged")])
def test_a_goal_is_printed_with_its_verdict_and_figures(met, verdict):
    assert goal_line({"goal": "p99 at most 50 ms", "figures": "41.0 ms", "met": met}) == f"goal {verdict}: p99 at most 50 ms: 41.0 ms"
