"""The benchmark suite's quick mode must keep working (it is not a timed test): every
workload it runs produces its rows, the new ones included. No figure is judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import pipelines
from benchmarks.smoke import NEW_WORKLOADS, run_smoke


@pytest.mark.timeout(400)
def test_quick_benchmark_runs_and_reports(tmp_path: Path) -> None:
    report = run_smoke(tmp_path, timeout=380)
    text = report.read_text()
    assert "orchestra" in text and "round trip" in text.lower()
    raw = json.loads(report.with_suffix(".json").read_text())
    results = raw["results"]
    for workload in NEW_WORKLOADS:
        cells = results[workload]
        cell = cells["machine"] if workload == "raw" else cells["orchestra"]
        assert cell["status"] == "ok", f"{workload}: {cell['status']} {cell.get('log_tail')}"
        assert cell["metrics"] and not cell["errors"], f"{workload}: {cell['errors']}"
    # peers run the new workloads too, where they can (the widget is orchestra's own)
    for workload in ("smallmaps", "broadcast", "montecarlo"):
        assert results[workload]["ppe_forkserver"]["metrics"], workload
    summary = {row["workload"] for row in raw["summary"]}
    assert {"widget", "smallmaps", "broadcast", "montecarlo"} <= summary
    assert any(row["metric"] == "await_med_us/zmq_rtt_med_us" for row in raw["summary"])
    assert "Raw limits of this machine" in text


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
