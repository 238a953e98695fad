"""joblib in a real ipykernel: ``%load_ext orchestra_nb`` registers ``backend="orchestra"``,
and "interrupt kernel" stops a running ``joblib.Parallel`` call with the pool kept warm."""

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
    # joblib's batches open no progress widget each (a flood of bars otherwise).
    assert k.comms(mid) == []
