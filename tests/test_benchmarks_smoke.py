"""The benchmark suite's quick mode must keep working (it is not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.smoke import run_smoke


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_and_reports(tmp_path: Path) -> None:
    report = run_smoke(tmp_path)
    text = report.read_text()
    assert "orchestra" in text and "round trip" in text.lower()
    raw = json.loads(report.with_suffix(".json").read_text())
    assert raw, "the JSON beside the report holds the raw numbers"
