"""The composite block (``notebook._composite``), fed by a real composite on real workers.

The widgets are real ipywidgets objects (without a front end); what a front end would show
is their state, read here."""

from __future__ import annotations

import concurrent.futures
import os
import time
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import Map, Parallel, Sequence, Task, TaskState
from orchestra_nb.notebook._composite import CompositeView, render_html
from orchestra_nb.testing import wait_for

pytest.importorskip("ipywidgets")

HANG_GUARD = 30.0


def gated(i: int, d: str) -> int:
    Path(d, f"started-{i}").touch()
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(os.path.join(d, f"release-{i}")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"release-{i} never appeared")
        time.sleep(0.002)
    return i


def square(x: int) -> int:
    return x * x


def test_the_block_follows_the_composite_and_its_buttons_act(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    step = Sequence(Task(gated, 0, d), Parallel(Map(square, range(5)), Task(square, 3)),
                    Task(gated, 1, d), Task(gated, 2, d), pass_results=False, name="etl")
    h = step.run(pool)
    view = CompositeView(h, interval=0.1)
    try:
        wait_for(lambda: "running" in view.html.value, HANG_GUARD, what="a running step shown")
        assert "0:gated" in view.html.value and "3:gated" in view.html.value
        view.pause_button.click()
        assert h.paused
        wait_for(lambda: view.pause_button.description == "Resume", HANG_GUARD, what="the Resume label")
        Path(tmp_path, "release-0").touch()
        wait_for(lambda: h.held >= 1, HANG_GUARD, what="a part held")
        wait_for(lambda: "paused" in view.html.value, HANG_GUARD, what="PAUSED shown")
        view.pause_button.click()
        assert not h.paused
        wait_for(lambda: Path(tmp_path, "started-1").exists(), HANG_GUARD, what="step 1 after resume")
        wait_for(lambda: "5/5" in view.html.value, HANG_GUARD, what="the map's count")
        view.cancel_button.click()
        with pytest.raises(concurrent.futures.CancelledError):
            h.result(HANG_GUARD)
        assert h.cancelled()
        wait_for(lambda: view.cancel_button.disabled, HANG_GUARD, what="the final refresh")
        assert "cancelled" in view.html.value
        assert h.finished()  # the buttons are disabled after the parts' final counts
        assert view.html.value == render_html(h)
    finally:
        view.close()
    assert not view._thread.is_alive()
    states = [s.state for s in h.steps()]
    assert TaskState.SUCCEEDED in states and TaskState.CANCELLED in states
