"""The side-by-side report of ``bench/compare.py``: its goal lines must judge
the same runs that its table shows."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import pytest

BENCH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"
)


@pytest.fixture(scope="module")
def compare() -> Any:
    sys.path.insert(0, BENCH)
    try:
        yield importlib.import_module("compare")
    finally:
        sys.path.remove(BENCH)


def _w3l_runs(system: str, p99s: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "system": system,
            "workload": "W3L",
            "lat_us_p50": 900,
            "lat_us_p99": p99,
            "rep": rep,
        }
        for rep, p99 in enumerate(p99s, 1)
    ]


def _as_sitting(compare: Any, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # What the sitting does with the runs of one pair: the median one is the
    # row, the others are kept as repetitions.
    chosen = compare.median_run(runs, runs[0]["workload"])
    for r in runs:
        r["kind"] = "ssebench" if r is chosen else "ssebench-rep"
    return runs


def test_goals_judge_the_median_run_not_the_first(compare: Any) -> None:
    rows = _as_sitting(compare, _w3l_runs("ssepg-pg", [4800, 2400, 1500]))
    rows += _as_sitting(compare, _w3l_runs("nchan1", [1600, 1200, 1300]))
    line = next(
        line for line in compare.goals(rows).splitlines() if "p99 of ssepg-pg " in line
    )
    assert "2.4 ms vs 1.3 ms" in line
    assert "MISSED" in line


def test_a_single_run_is_judged_as_it_is(compare: Any) -> None:
    rows = _w3l_runs("ssepg-pg", [1200]) + _w3l_runs("nchan1", [1300])
    for r in rows:
        r["kind"] = "ssebench"
    line = next(
        line for line in compare.goals(rows).splitlines() if "p99 of ssepg-pg " in line
    )
    assert "1.2 ms vs 1.3 ms" in line
    assert "| met |" in line
