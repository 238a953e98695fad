"""Retries (issue 4): the pool applies the RetryPolicy's backoff schedule exactly.

The jitter source is injected (``Pool(retry_random=...)``), so the delays the pool schedules
are known in advance; each RETRYING event carries the attempt number and the delay the pool
passed to ``loop.call_later``, and the task's own clock proves no retry ran early.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import assert_all_final, assert_serves

from orchestra_nb import RetryPolicy, TaskState, TaskStateChanged
from orchestra_nb.testing import EventRecorder


def fail_n_times(path: str, n: int, x: int) -> int:
    """Fails the first ``n`` calls (counted in a file), logging each attempt's clock."""
    with open(path, "a+") as f:
        f.seek(0)
        calls = len(f.read().splitlines())
        start = time.monotonic()
        if calls < n:
            f.write(f"{start} {time.monotonic()} fail\n")
            f.flush()
            raise ConnectionError(f"flaky resource, attempt {calls + 1}")
        f.write(f"{start} {time.monotonic()} ok\n")
    return x * 2


def always_value_error(x: int) -> int:
    raise ValueError(f"bad input {x}")


def states_of(rec: EventRecorder, job_id: int, index: int) -> list[TaskStateChanged]:
    return [
        e for e in rec.of(TaskStateChanged)
        if e.job_id == job_id and e.start <= index < e.start + max(e.count, 1)
    ]


def test_backoff_schedule_is_applied_exactly(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=1, retry_random=lambda: 0.25)
    policy = RetryPolicy(retries=3, backoff=0.01, factor=3.0, max_backoff=0.05, jitter=0.4,
                         retry_on=(ConnectionError,))
    expected = policy.schedule(lambda: 0.25)
    assert expected == pytest.approx([0.008, 0.024, 0.04])
    log = tmp_path / "attempts"
    with EventRecorder(pool) as rec:
        handle = pool.options(retries=policy).run(fail_n_times, str(log), 3, 21)
        assert handle.result(timeout=30) == 42
        rec.wait(lambda e: isinstance(e, TaskStateChanged) and e.state == TaskState.SUCCEEDED)
        events = states_of(rec, handle.job_id, 0)
    retrying = [e for e in events if e.state == TaskState.RETRYING]
    assert [e.attempt for e in retrying] == [1, 2, 3]
    assert [e.delay for e in retrying] == expected  # exactly what the policy computes
    # The task comes into being PENDING; every retry goes RETRYING -> PENDING -> RUNNING,
    # in that order, then it succeeds.
    assert [e.state for e in events] == [
        TaskState.PENDING, TaskState.RUNNING,
        TaskState.RETRYING, TaskState.PENDING, TaskState.RUNNING,
        TaskState.RETRYING, TaskState.PENDING, TaskState.RUNNING,
        TaskState.RETRYING, TaskState.PENDING, TaskState.RUNNING,
        TaskState.SUCCEEDED,
    ]
    # No retry started before its backoff was over (CLOCK_MONOTONIC is system-wide).
    rows = [line.split() for line in log.read_text().splitlines()]
    assert [r[2] for r in rows] == ["fail", "fail", "fail", "ok"]
    for n, delay in enumerate(expected):
        assert float(rows[n + 1][0]) - float(rows[n][1]) >= delay


def test_retries_exhausted_fail_with_the_last_error(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=1, retry_random=lambda: 0.0)
    policy = RetryPolicy(retries=2, backoff=0.001, jitter=0.0)
    with EventRecorder(pool) as rec:
        handle = pool.options(retries=policy).run(fail_n_times, str(tmp_path / "a"), 10, 1)
        with pytest.raises(ConnectionError, match="attempt 3"):
            handle.result(timeout=30)
        rec.wait(lambda e: isinstance(e, TaskStateChanged) and e.state == TaskState.FAILED)
        retrying = [e for e in states_of(rec, handle.job_id, 0) if e.state == TaskState.RETRYING]
    assert [(e.attempt, e.delay) for e in retrying] == [(1, 0.001), (2, 0.002)]


def test_retry_on_selects_what_is_retried(make_pool) -> None:
    pool = make_pool(workers=2)
    with EventRecorder(pool) as rec:
        handle = pool.map(always_value_error, range(5), retries=3, retry_on=(ConnectionError,),
                          return_exceptions=True)
        results = handle.result(timeout=30)
    assert all(isinstance(r, ValueError) for r in results)
    assert not [e for e in rec.of(TaskStateChanged) if e.state == TaskState.RETRYING]


def test_retries_in_a_map_leave_the_other_results_alone(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=2, retry_random=lambda: 0.5)
    flaky = str(tmp_path / "flaky")

    with EventRecorder(pool) as rec:
        handle = pool.map(_maybe_flaky, [(flaky, i) for i in range(100)],
                          retries=RetryPolicy(retries=2, backoff=0.001), chunksize=7)
        assert handle.result(timeout=30) == [i * 2 for i in range(100)]
        assert_all_final(handle)
        rec.wait(lambda e: isinstance(e, TaskStateChanged) and e.state == TaskState.RETRYING)
    retrying = [e for e in rec.of(TaskStateChanged) if e.state == TaskState.RETRYING]
    assert [(e.start, e.attempt) for e in retrying] == [(42, 1), (42, 2)]
    assert handle.counts()[TaskState.SUCCEEDED] == 100
    assert_serves(pool)


def _maybe_flaky(arg: tuple[str, int]) -> int:
    path, i = arg
    if i == 42:
        return fail_n_times(path, 2, i)
    return i * 2
