"""Composites in a real ipykernel: the composite block keeps updating while other cells run,
and interrupting a cell that awaits a composite cancels every part of it."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from kernel_harness import Kernel

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

STEPS = textwrap.dedent("""\
    import os, time
    from orchestra_nb import Map, Parallel, Sequence, Task
    from orchestra_nb.notebook._composite import run_composite
    def slow(i, dt=0.05):
        time.sleep(dt)
        return i
    def started_then_wait(i, log):
        with open(log, "a") as f:
            f.write(f"{i}\\n")
        time.sleep(60)
    """)


def _wait_lines(path: Path, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"only {lines} started"
        time.sleep(0.005)


def test_background_sequence_updates_its_block_while_another_cell_runs(kernel: Kernel) -> None:
    k = kernel
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(STEPS)
    mid1, _ = k.execute(
        "h = run_composite(Sequence(Map(slow, range(30), chunksize=1), Map(slow, range(30), chunksize=1),"
        " name='bg'), interval=0.1)"
    )
    assert k.value("h.done()") is False  # the cell returned while the composite runs
    blocks = k.comms(mid1, "HTMLModel")
    assert blocks, "no composite block shown"
    block = blocks[0]
    assert not k.comms(mid1, "IntProgressModel")  # no per-job progress bars for its parts
    mid2 = k.submit("time.sleep(1.0)")
    k.wait_reply(mid2)
    k.wait_idle(mid2)
    busy = next(t for t, m in k.snapshot() if m["msg_type"] == "status"
                and m["parent_header"].get("msg_id") == mid2 and m["content"]["execution_state"] == "busy")
    idle = next(t for t, m in k.snapshot() if m["msg_type"] == "status"
                and m["parent_header"].get("msg_id") == mid2 and m["content"]["execution_state"] == "idle")
    during = {s["value"] for t, s, _m in k.states(block) if busy < t < idle and "value" in s}
    assert len(during) >= 2, during  # the block changed while a synchronous cell blocked
    mid3, _ = k.execute("r = await h\nprint(len(r), h.state.name)")
    assert k.stream(mid3).split() == ["30", "SUCCEEDED"]
    k.wait_state(block, lambda s: "succeeded" in s.get("value", "") and "60/60" in s.get("value", ""))


def test_interrupting_an_awaited_composite_cancels_all_its_parts(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    k.execute(STEPS)
    mid = k.submit(
        f"h = Sequence(Parallel(Task(started_then_wait, 0, {str(log)!r}), "
        f"Task(started_then_wait, 1, {str(log)!r})), Task(slow)).run()\nawait h"
    )
    _wait_lines(log, 2)  # both parts are running
    k.km.interrupt_kernel()
    _, reply = k.wait_reply(mid, timeout=10)
    assert reply["status"] == "error" and reply["ename"] == "CancelledError"
    k.wait_idle(mid)
    assert k.value("h.wait_finished(10) and h.cancelled()") is True
    assert k.value("[s.state.name for s in h.steps()]") == ["CANCELLED"] * 5
    # the parts' tasks were interrupted in their workers: the pool is free at once
    mid2, _ = k.execute("print(await orchestra.map(slow, range(4)))", timeout=20)
    assert k.stream(mid2).strip() == "[0, 1, 2, 3]"
    assert sorted(log.read_text().split()) == ["0", "1"]
