"""Memory guard, recycling and bad results (issue 4)."""

from __future__ import annotations

import collections
import os
import time

import pytest
from faultkit import assert_all_final, assert_serves

from orchestra_nb import (
    MemoryLimitError,
    ResultTooLargeError,
    WorkerCrashedError,
    WorkerExited,
    WorkerStarted,
)
from orchestra_nb.testing import EventRecorder

_HOARD: list[bytes] = []


def allocate_and_wait(mb: int, hold: float) -> int:
    """Touch ``mb`` MB (real pages, so RSS grows), keep it, wait ``hold`` s."""
    _HOARD.append(b"\x01" * (mb * 1_000_000))
    time.sleep(hold)
    return os.getpid()


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def sized(n: int) -> bytes:
    return b"x" * n


def test_hard_limit_kills_the_worker_and_fails_the_task(make_pool) -> None:
    pool = make_pool(workers=2, memory_limit="250MB")
    before = set(pool.worker_pids())
    with EventRecorder(pool) as rec:
        # It would hold its memory for 10 min: only the pool's kill ends it within the guard.
        with pytest.raises(MemoryLimitError) as info:
            pool.run(allocate_and_wait, 400, 600).result(timeout=60)
        err = info.value
        assert isinstance(err, WorkerCrashedError)
        assert "SIGKILL(-9)" in str(err)
        assert "memory_limit of 238 MiB" in str(err)
        _, exited = rec.wait(lambda e: isinstance(e, WorkerExited) and e.pid == err.pid)
        assert exited.reason.startswith("killed: memory use")
        rec.wait(lambda e: isinstance(e, WorkerStarted))  # its replacement
    assert err.pid in before
    assert_serves(pool)
    assert err.pid not in pool.worker_pids()


def test_soft_limit_recycles_the_worker_after_its_task(make_pool) -> None:
    pool = make_pool(workers=1, memory_soft_limit="150MB")
    (first,) = pool.worker_pids()
    with EventRecorder(pool) as rec:
        pid = pool.run(allocate_and_wait, 250, 0.6).result(timeout=30)
        assert pid == first  # the task ran to completion on the fat worker
        _, exited = rec.wait(lambda e: isinstance(e, WorkerExited) and e.pid == first)
        assert exited.reason == "recycled"
        assert exited.returncode == 0
        rec.wait(lambda e: isinstance(e, WorkerStarted) and e.pid != first)
    assert_serves(pool)
    assert first not in pool.worker_pids()
    assert pool.run(pid_after, 0).result(timeout=30) != first


def test_max_tasks_per_worker_recycles(make_pool) -> None:
    pool = make_pool(workers=1, max_tasks_per_worker=5)
    with EventRecorder(pool) as rec:
        pids = pool.map(pid_after, [0.01] * 20, chunksize=1).result(timeout=60)
        per_pid = collections.Counter(pids)
        assert sorted(per_pid.values()) == [5, 5, 5, 5]
        rec.wait(lambda e: len([x for x in rec.of(WorkerExited) if x.reason == "recycled"]) >= 4)
    assert_serves(pool)


def test_result_too_large_fails_that_task_only(make_pool) -> None:
    pool = make_pool(workers=2, max_result_bytes=10_000)
    pids = sorted(pool.worker_pids())
    sizes = [100] * 20
    sizes[4] = 1_000_000
    handle = pool.map(sized, sizes, chunksize=5, return_exceptions=True)
    results = handle.result(timeout=30)
    err = results[4]
    assert isinstance(err, ResultTooLargeError)
    assert "task 4" in str(err)
    assert "max_result_bytes=10,000" in str(err)
    assert [r for i, r in enumerate(results) if i != 4] == [b"x" * 100] * 19
    assert_all_final(handle)
    with pytest.raises(ResultTooLargeError):
        pool.run(sized, 50_000).result(timeout=30)
    assert sorted(pool.worker_pids()) == pids  # the workers keep serving
    assert_serves(pool)


def peak_rss_mib() -> float:
    """This worker's peak resident memory so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sized_and_peak(n: int) -> tuple[int, float]:
    return os.getpid(), peak_rss_mib()


RESULT_MIB = 100
LIMIT = 5 * 1024 * 1024


@pytest.mark.parametrize("how", ["run", "map"])
def test_a_result_over_max_result_bytes_stops_pickling_at_the_limit(make_pool, how: str) -> None:
    """The limit bounds the worker's memory: pickling stops once it passes the limit, instead
    of pickling the whole result (twice) and comparing its size afterwards."""
    pool = make_pool(workers=1, max_result_bytes=LIMIT)
    pid, before = pool.run(sized_and_peak, 0).result(timeout=30)
    if how == "run":
        with pytest.raises(ResultTooLargeError) as info:
            pool.run(sized, RESULT_MIB << 20).result(timeout=30)
        err = info.value
    else:
        out = pool.map(sized, [10, RESULT_MIB << 20, 20], chunksize=3, return_exceptions=True).result(
            timeout=30
        )
        assert out[0] == b"x" * 10 and out[2] == b"x" * 20
        err = out[1]
    assert isinstance(err, ResultTooLargeError)
    assert f"task {0 if how == 'run' else 1}" in str(err)
    assert f"max_result_bytes={LIMIT:,}" in str(err)
    same_pid, after = pool.run(sized_and_peak, 0).result(timeout=30)
    assert same_pid == pid  # the same worker, whose peak includes the failed task
    # The result itself is RESULT_MIB; pickling it whole would add as much again at least.
    assert after - before < RESULT_MIB + 40, (before, after)
    assert_serves(pool)
