"""Stall detection (issue 4): heartbeats come from the worker's control thread; a worker whose
heartbeat stops (SIGSTOP by pid, or native code holding the GIL) is reported on the bus and,
with ``replace_stalled=True``, killed and replaced."""

from __future__ import annotations

import os
import signal
import time

from faultkit import assert_serves

from orchestra_nb import TaskState, WorkerExited, WorkerStalled, WorkerStarted
from orchestra_nb.testing import EventRecorder, cont_pid, hold_gil_sleep, stop_pid, wait_for


def nap(x: float) -> int:
    time.sleep(x)
    return os.getpid()


def hold_gil(seconds: float) -> str:
    hold_gil_sleep(seconds)
    return "done"


def _stalled(pool, pid: int) -> bool:
    return any(w["pid"] == pid and w["stalled"] for w in pool.status()["workers"])


def test_sigstopped_worker_is_reported_stalled_then_recovers(make_pool) -> None:
    pool = make_pool(workers=2, heartbeat=0.05, stall_timeout=0.4, replace_stalled=False)
    pids = sorted(pool.worker_pids())
    victim = pids[0]
    with EventRecorder(pool) as rec:
        stop_pid(victim)
        try:
            _, stalled = rec.wait(lambda e: isinstance(e, WorkerStalled) and e.pid == victim)
            assert stalled.silent_for >= 0.4  # silence counts from its last heartbeat
            assert _stalled(pool, victim)  # what a progress widget reads
        finally:
            cont_pid(victim)
        wait_for(lambda: not _stalled(pool, victim), what="heartbeat after SIGCONT")
    assert not list(rec.of(WorkerExited))  # reported, not replaced
    assert sorted(pool.worker_pids()) == pids
    assert_serves(pool)


def test_replace_stalled_kills_and_replaces_and_requeues_its_task(make_pool) -> None:
    pool = make_pool(workers=2, heartbeat=0.05, stall_timeout=0.4, replace_stalled=True)
    with EventRecorder(pool) as rec:
        handle = pool.map(nap, [0.2] * 6, chunksize=1)
        _, running = rec.wait(lambda e: getattr(e, "state", None) == TaskState.RUNNING)
        victim = next(w["pid"] for w in pool.status()["workers"] if w["id"] == running.worker_id)
        stop_pid(victim)
        try:
            rec.wait(lambda e: isinstance(e, WorkerStalled) and e.pid == victim)
            _, exited = rec.wait(lambda e: isinstance(e, WorkerExited) and e.pid == victim)
            assert exited.reason.startswith("killed: no heartbeat")
            assert exited.returncode == -signal.SIGKILL
            rec.wait(lambda e: isinstance(e, WorkerStarted) and e.worker_id > 2)
        finally:
            cont_pid(victim)  # a no-op once it is dead; never leave it stopped
        pids = handle.result(timeout=30)
    assert victim not in pids[1:] or pids.count(victim) < 6
    assert len(pids) == 6
    assert_serves(pool)
    assert victim not in pool.worker_pids()


def test_native_code_holding_the_gil_looks_stalled(make_pool) -> None:
    pool = make_pool(workers=1, heartbeat=0.05, stall_timeout=0.3)
    (pid,) = pool.worker_pids()
    with EventRecorder(pool) as rec:
        handle = pool.run(hold_gil, 1)
        rec.wait(lambda e: isinstance(e, WorkerStalled) and e.pid == pid)
        assert handle.result(timeout=30) == "done"  # not replaced: it just finishes
    assert pool.worker_pids() == [pid]
    assert_serves(pool)
