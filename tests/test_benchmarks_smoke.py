"""The benchmark suite's quick mode must keep working (it is not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import pipelines
from benchmarks.smoke import run_smoke


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_and_reports(tmp_path: Path) -> None:
    report = run_smoke(tmp_path)
    text = report.read_text()
    assert "orchestra" in text and "round trip" in text.lower()
    raw = json.loads(report.with_suffix(".json").read_text())
    assert raw, "the JSON beside the report holds the raw numbers"


@pytest.mark.timeout(120)
def test_pipelines_benchmark_reports_the_overhead_per_step() -> None:
    times = pipelines.measure(items=200, repeat=1)
    assert {name: len(values) for name, values in times.items()} == {
        "hand await": 1,
        "composite await": 1,
        "hand result()": 1,
        "composite result()": 1,
    }
    text = pipelines.report(times, 200, 1)
    for kind in ("await", "result()"):
        assert f"composite overhead ({kind}): " in text
    assert text.count("ms per step") == 2 and "goal <= 5 ms" in text
