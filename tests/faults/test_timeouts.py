"""Timeouts that stop the work (issue 4): interrupt first, kill and replace if ignored."""

from __future__ import annotations

import pytest
from faultkit import assert_all_final, assert_serves

from orchestra_nb import TaskState, TaskTimeoutError, WorkerExited, WorkerStarted
from orchestra_nb.testing import EventRecorder, hold_gil_sleep


def spin_if(x: int, bad: int = 3) -> int:
    if x == bad:
        while True:  # pure Python: the SIGINT handler runs between bytecodes
            pass
    return x * 10


def hold_gil_if(x: int, bad: int = 3) -> int:
    if x == bad:
        hold_gil_sleep(600)  # native code holding the GIL, deaf to SIGINT: only a kill ends it
    return x * 10


def test_pure_python_spin_is_interrupted_and_the_worker_kept(make_pool) -> None:
    # A grace longer than the hang guard: the task can end only by its interrupt.
    pool = make_pool(workers=2, timeout_grace=120.0)
    pids = sorted(pool.worker_pids())
    handle = pool.map(spin_if, range(8), timeout=0.3, return_exceptions=True)
    results = handle.result(timeout=60)
    err = results[3]
    assert isinstance(err, TaskTimeoutError)
    assert isinstance(err, TimeoutError)
    assert "exceeded its timeout of 0.3 s and was interrupted" in str(err)
    assert isinstance(err.__cause__, BaseException)  # the KeyboardInterrupt (or its traceback)
    assert [r for i, r in enumerate(results) if i != 3] == [i * 10 for i in range(8) if i != 3]
    assert sorted(pool.worker_pids()) == pids  # interrupted, not replaced
    assert_all_final(handle)
    assert_serves(pool)
    assert sorted(pool.worker_pids()) == pids


def test_run_timeout_raises_task_timeout_error(make_pool) -> None:
    pool = make_pool(workers=1)
    with pytest.raises(TimeoutError):
        pool.options(timeout=0.2).run(spin_if, 3).result(timeout=30)
    assert pool.options(timeout=5).run(spin_if, 4).result(timeout=30) == 40


def test_native_code_holding_the_gil_gets_its_worker_killed_and_replaced(make_pool) -> None:
    pool = make_pool(workers=2, timeout_grace=0.5, stall_timeout=None)
    pids = set(pool.worker_pids())
    with EventRecorder(pool) as rec:
        handle = pool.map(hold_gil_if, range(8), timeout=0.3, return_exceptions=True)
        results = handle.result(timeout=60)
        err = results[3]
        assert isinstance(err, TaskTimeoutError)
        assert isinstance(err, TimeoutError)
        assert "did not respond to the interrupt" in str(err)
        assert "killed and replaced" in str(err)
        assert [r for i, r in enumerate(results) if i != 3] == [
            i * 10 for i in range(8) if i != 3
        ]
        rec.wait(lambda e: isinstance(e, WorkerExited))
        exited = [e for e in rec.of(WorkerExited) if e.reason.startswith("killed")]
        assert len(exited) == 1
        assert exited[0].returncode == -9
        assert exited[0].pid in pids
        rec.wait(lambda e: isinstance(e, WorkerStarted))  # the replacement
    assert_all_final(handle)
    assert_serves(pool)
    new_pids = set(pool.worker_pids())
    assert exited[0].pid not in new_pids
    assert len(new_pids & pids) == 1


def test_a_timed_out_task_is_retried_when_asked(make_pool) -> None:
    pool = make_pool(workers=1)
    with EventRecorder(pool) as rec:
        handle = pool.options(timeout=0.2, retries=1, retry_on=(TimeoutError,)).run(spin_if, 3)
        with pytest.raises(TaskTimeoutError):
            handle.result(timeout=30)
        rec.wait(lambda e: getattr(e, "state", None) == TaskState.FAILED)
        retrying = [e for e in rec.events if getattr(e, "state", None) == TaskState.RETRYING]
        assert len(retrying) == 1
        assert retrying[0].attempt == 1
