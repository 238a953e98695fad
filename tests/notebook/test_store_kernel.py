"""A cached map survives its kernel: a real ipykernel is SIGKILLed half-way through a
200-item map; a new kernel reruns the same cell and computes exactly the missing items
(counted by marker files the workers write). Then an unrelated cell edit keeps every
result, and an edit of the helper the task calls recomputes them all."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from kernel_harness import Kernel, wait_dead

from orchestra_nb._store import ResultStore

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

N = 200

SETUP = """\
import os, time, uuid
%config Orchestra.store = {store!r}
MARKS = {marks!r}
"""

HELPER = """\
def helper(x):
    return x * x
"""

TASK = """\
def task(x):
    # one marker file per execution, written in the worker
    open(os.path.join(MARKS, f"{{x}}-{{os.getpid()}}-{{uuid.uuid4().hex}}"), "x").close()
    time.sleep(0.01)
    return helper(x)
"""

MAP_CELL = f"handle = orchestra.map(task, range({N}), cache=True, chunksize=1)\nresults = await handle"


def start_kernel(store: Path, marks: Path) -> Kernel:
    kernel = Kernel()
    try:
        kernel.execute("import orchestra_nb; orchestra_nb.configure(workers=2)\n%load_ext orchestra_nb")
        kernel.execute(SETUP.format(store=str(store), marks=str(marks)))
        kernel.execute(HELPER)
        kernel.execute(TASK.format())
    except BaseException:
        kernel.shutdown(now=True)
        raise
    return kernel


def executions(marks: Path) -> list[int]:
    return sorted(int(p.name.split("-")[0]) for p in marks.iterdir())


def test_a_map_resumes_after_the_kernel_is_killed(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    marks = tmp_path / "marks"
    marks.mkdir()

    first = start_kernel(store_path, marks)
    try:
        first.execute("orchestra.default_pool().wait_started(30)")
        workers = first.value("orchestra.default_pool().worker_pids()")
        assert first.value("str(orchestra.store.current().path)") == str(store_path.resolve())
        first.submit(MAP_CELL)
        with ResultStore(store_path) as watcher:  # synchronise on what is stored
            deadline = time.monotonic() + 120
            while watcher.count() < N // 2:
                assert time.monotonic() < deadline, "the map never got half-way"
                time.sleep(0.01)
        first.km.provisioner.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        assert wait_dead([first.pid, *workers], 30) == []  # its workers die with it
    finally:
        first.shutdown(now=True)
    with ResultStore(store_path) as store:
        stored = store.count()
    ran_first = executions(marks)
    assert N // 2 <= stored < N, "the kill came too late to test anything"
    assert len(ran_first) >= stored

    second = start_kernel(store_path, marks)
    try:
        second.execute(MAP_CELL)
        assert second.value("results") == [x * x for x in range(N)]  # as an uncached run gives
        assert second.value("handle.cached") == stored
        ran_second = executions(marks)
        rerun = list(ran_second)
        for item in ran_first:
            rerun.remove(item)
        assert len(rerun) == N - stored  # exactly the missing items ran ...
        assert len(set(rerun)) == len(rerun)  # ... each once

        # An unrelated cell edit: every result is still a hit.
        second.execute("UNRELATED = [1, 2, 3]\ndef other(y):\n    return y + 1\n")
        second.execute(MAP_CELL)
        assert second.value("handle.cached") == N
        assert executions(marks) == ran_second

        # The helper the task calls is edited: every result is recomputed.
        second.execute("def helper(x):\n    return x * x + 1\n")
        second.execute(MAP_CELL)
        assert second.value("handle.cached") == 0
        assert second.value("results") == [x * x + 1 for x in range(N)]
        assert len(executions(marks)) == len(ran_second) + N

        mid, _ = second.execute("%orchestra store")
        report = second.stream(mid)
        assert str(store_path.resolve()) in report and f"{2 * N} result(s) of 2 function(s)" in report, report
    finally:
        second.shutdown()


def test_config_store_trait_and_named_runs_across_kernels(tmp_path: Path) -> None:
    store_path = tmp_path / "runs.sqlite"
    marks = tmp_path / "marks"
    marks.mkdir()
    first = start_kernel(store_path, marks)
    try:
        first.execute('await orchestra.map(task, range(10), checkpoint="sweep-1")')
    finally:
        first.shutdown()
    second = start_kernel(store_path, marks)
    try:
        runs = second.value("[(r.name, r.function, r.done, r.total) for r in orchestra.store.runs()]")
        assert runs == [["sweep-1", "task", 10, 10]]
        # The stored results, read by name alone (no function, no inputs needed).
        assert second.value("orchestra.store.run_results('sweep-1')") == [x * x for x in range(10)]
        assert second.value("orchestra.store.delete_run('sweep-1')") is True
        assert second.value("orchestra.store.runs()") == []
    finally:
        second.shutdown()
