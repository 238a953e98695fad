"""joblib in a real ipykernel: ``%load_ext orchestra_nb`` registers ``backend="orchestra"``,
a ``joblib.Parallel`` call shows one progress widget that counts its calls, and "interrupt
kernel" or the widget's Cancel button stop it with the pool kept warm."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from kernel_harness import Kernel

pytest.importorskip("joblib")

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

TASKS = textwrap.dedent("""\
    import os, time
    import joblib
    def task(i, log={log!r}):
        with open(log, "a") as f:
            f.write(f"{{i}}\\n")
        time.sleep(60)  # only an interrupt ends it
        return i
    def pid(i):
        return os.getpid()
    def square(i):
        return i * i
    """)


def _wait_lines(path: Path, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        assert time.monotonic() < deadline, f"only {lines} started"
        time.sleep(0.005)


def test_interrupt_stops_a_joblib_call_and_the_pool_stays_warm(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    k.execute(TASKS.format(log=str(log)))
    # No import of orchestra_nb.joblib here: %load_ext registered the backend.
    mid = k.submit(
        "with joblib.parallel_config(backend='orchestra'):\n"
        "    joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(task)(i) for i in range(20))"
    )
    started = _wait_lines(log, 2)  # both workers are inside a task; the rest is queued
    k.km.interrupt_kernel()
    _, reply = k.wait_reply(mid, timeout=30)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    k.wait_idle(mid)
    # The running tasks were stopped (the workers are free again), not killed ...
    k.execute(
        "__deadline = time.monotonic() + 30\n"
        "while any(w.job is not None for w in orchestra.default_pool().statistics().workers):\n"
        "    assert time.monotonic() < __deadline\n"
        "    time.sleep(0.01)"
    )
    assert sorted(k.value("orchestra.default_pool().worker_pids()")) == pids
    # ... nothing queued started afterwards, and the next call runs at once on the same workers.
    assert sorted(log.read_text().split()) == sorted(started)
    ran_on = k.value(
        "sorted(set(joblib.Parallel(n_jobs=-1, backend='orchestra')"
        "(joblib.delayed(pid)(i) for i in range(40))))"
    )
    assert set(ran_on) <= set(pids)
    # One progress view for the call (not one per batch), which ends cancelled: the calls
    # that had started were interrupted, the ones dispatched behind them never ran.
    assert len(k.comms(mid, "HTMLModel")) == 1
    final = k.wait_view(k.job_widgets(mid)["view"], lambda n: n["state"] == "cancelled")
    assert final["succeeded"] == 0 and final["cancelled"] == final["total"] >= 2, final


def test_a_parallel_call_shows_one_widget_counting_its_calls(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    k.execute(TASKS.format(log=str(tmp_path / "unused.txt")))
    mid, _ = k.execute(
        "with joblib.parallel_config(backend='orchestra'):\n"
        "    out = joblib.Parallel(n_jobs=-1)(joblib.delayed(square)(i) for i in range(3000))"
    )
    assert k.value("out == [i * i for i in range(3000)]") is True
    # joblib sent the calls in batches as it went; the cell has one view, for the calls.
    assert len(k.comms(mid, "HTMLModel")) == 1
    w = k.job_widgets(mid)
    final = k.wait_view(w["view"], lambda n: n["state"] == "done")
    assert (final["succeeded"], final["total"]) == (3000, 3000), final
    assert "joblib: square" in final["text"] and "3,000/3,000 done · done in" in final["text"], final
    # The next call has a view of its own.
    mid2, _ = k.execute(
        "joblib.Parallel(n_jobs=-1, backend='orchestra')(joblib.delayed(square)(i) for i in range(7))"
    )
    assert len(k.comms(mid2, "HTMLModel")) == 1
    final2 = k.wait_view(k.job_widgets(mid2)["view"], lambda n: n["state"] == "done")
    assert (final2["succeeded"], final2["total"]) == (7, 7), final2


def test_the_cancel_button_stops_a_parallel_call(kernel: Kernel, tmp_path: Path) -> None:
    k = kernel
    log = tmp_path / "started.txt"
    k.execute("orchestra.default_pool().wait_started(30)")
    pids = k.value("sorted(orchestra.default_pool().worker_pids())")
    k.execute(TASKS.format(log=str(log)))
    # The cell awaits the call (run on a thread), so the kernel handles the click meanwhile.
    mid = k.submit(
        "import asyncio\n"
        "def run():\n"
        "    with joblib.parallel_config(backend='orchestra'):\n"
        "        return joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(task)(i) for i in range(20))\n"
        "await asyncio.to_thread(run)"
    )
    w = k.job_widgets(mid)
    started = _wait_lines(log, 2)
    k.click(w["button"])
    _, reply = k.wait_reply(mid, timeout=30)
    assert reply["status"] == "error" and reply["ename"] == "JobCancelled", reply
    assert "the Cancel button" in reply["evalue"]
    k.wait_idle(mid)
    final = k.wait_view(w["view"], lambda n: n["state"] == "cancelled")
    assert final["succeeded"] == 0 and final["cancelled"] == final["total"], final
    assert len(k.comms(mid, "HTMLModel")) == 1
    # The started calls were interrupted, not their workers killed; nothing else started.
    k.execute(
        "__deadline = time.monotonic() + 30\n"
        "while any(w.job is not None for w in orchestra.default_pool().statistics().workers):\n"
        "    assert time.monotonic() < __deadline\n"
        "    time.sleep(0.01)"
    )
    assert sorted(k.value("orchestra.default_pool().worker_pids()")) == pids
    assert sorted(log.read_text().split()) == sorted(started)
