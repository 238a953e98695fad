"""The bounded randomised fault run (issue 4), 30 s; CI runs it here, in the README's test
command. By hand: ``python -m orchestra_nb.testing.fault_run --seconds 60 --seed N``."""

from __future__ import annotations

import pytest

from orchestra_nb.testing import fault_run


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_randomised_fault_run() -> None:
    report = fault_run.run(seconds=30, seed=4, workers=3, min_maps=10)  # (30 s may be 9 maps under load)
    c = report.counts
    assert report.violations == []
    assert c["lost"] == 0
    assert c["hung"] == 0
    assert c["leaked"] == 0
    assert c["leaked_files"] == 0
    assert c["leaked_threads"] == 0
    assert c["maps"] >= 10
    assert c["tasks"] >= 1000
    assert c["kills"] >= 10  # faults were really injected
    assert c["raise"]
    assert c["flaky"]
    assert c["failed_expected"]
    assert c["succeeded"] + c["failed_expected"] + c["failed_by_kills"] == c["tasks"]
