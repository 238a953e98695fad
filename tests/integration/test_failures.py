"""``handle.failures()``: one row per failed item, with its index, input, exception,
attempts, worker and how long its failing attempt ran, as text and as an HTML table.

Durations are checked against clocks, not thresholds: the failing task times itself with
``time.perf_counter`` (CLOCK_MONOTONIC, one clock for every process of the machine), and the
duration the row carries must enclose that and fit inside the test's own reading around the
whole map.
"""

from __future__ import annotations

import functools
import os
import time

import pytest

import orchestra_nb as orchestra

HANG_GUARD = 60.0


class SelfTimed(Exception):
    """Carries how long the task ran by its own clock (seconds), in its message."""


def slow_failure(i: int) -> int:
    if i == 2:
        start = time.perf_counter()
        time.sleep(0.05)
        raise SelfTimed(repr(time.perf_counter() - start))
    return i


def fail_at(bad: int, i: int) -> int:
    if i == bad:
        raise ValueError(f"item {i} is bad")
    return i


def crash_on_one(i: int) -> int:
    if i == 1:
        os._exit(1)
    return i


def test_a_failure_row_says_how_long_its_failing_attempt_ran(pool: orchestra.Pool) -> None:
    before = time.perf_counter()
    h = pool.map(slow_failure, [10, 11, 2, 13], chunksize=1, return_exceptions=True)
    h.result(timeout=HANG_GUARD)
    wall = time.perf_counter() - before
    [row] = h.failures()
    assert (row.index, row.input, row.attempts) == (2, 2, 1)
    assert isinstance(row.exception, SelfTimed) and row.worker is not None
    self_timed = float(str(row.exception).split("\n")[0])
    assert row.duration is not None and not row.duration_bound
    assert self_timed <= row.duration <= wall, (self_timed, row.duration, wall)
    # Both forms carry the column and the row's value.
    text, table = repr(h.failures()), h.failures()._repr_html_()
    assert "duration" in text.splitlines()[1] and row.duration_text in text, text
    assert "<th>duration</th>" in table and f"<td>{row.duration_text}</td>" in table, table
    assert row.duration_text.endswith(" ms") or row.duration_text.endswith(" s")


@pytest.mark.local_only("the worker times a large chunk of fast items per block")
def test_a_failure_inside_a_block_of_fast_items_carries_an_upper_bound(
    pool: orchestra.Pool,
) -> None:
    # One chunk of 300 items: item 150 fails in the middle of a timed block, item 0 first.
    before = time.perf_counter()
    mid = pool.map(functools.partial(fail_at, 150), range(300), chunksize=300, return_exceptions=True)
    first = pool.map(functools.partial(fail_at, 0), range(300), chunksize=300, return_exceptions=True)
    mid.result(timeout=HANG_GUARD)
    first.result(timeout=HANG_GUARD)
    wall = time.perf_counter() - before
    [inside] = mid.failures()
    [alone] = first.failures()
    assert inside.index == 150 and inside.duration_bound
    assert inside.duration is not None and 0 <= inside.duration <= wall
    assert inside.duration_text.startswith("≤ ")
    assert alone.index == 0 and not alone.duration_bound
    assert alone.duration is not None and 0 <= alone.duration <= wall
    assert "≤ " in repr(mid.failures()) and "≤ " not in repr(first.failures())


@pytest.mark.local_only("a worker process dies")
def test_an_item_that_kills_its_worker_has_a_row_with_worker_and_duration(
    pool: orchestra.Pool,
) -> None:
    before = time.perf_counter()
    h = pool.map(crash_on_one, range(3), chunksize=1, return_exceptions=True)
    h.result(timeout=HANG_GUARD)
    wall = time.perf_counter() - before
    [row] = h.failures()
    assert row.index == 1 and isinstance(row.exception, orchestra.WorkerCrashedError)
    assert row.worker is not None and row.attempts >= 1
    assert row.duration is not None and 0 <= row.duration <= wall
    assert f"w{row.worker}" in repr(h.failures())


def test_an_item_that_never_ran_has_no_duration(pool: orchestra.Pool) -> None:
    # Rejected by an open circuit breaker: nothing reached a worker, nothing was timed.
    breaker = pool.circuit("flaky", fail_max=1, reset_timeout=3600)
    opened = pool.map(functools.partial(fail_at, 0), [0], circuit=breaker, return_exceptions=True)
    opened.result(timeout=HANG_GUARD)
    [ran] = opened.failures()
    assert ran.duration is not None
    h = pool.map(abs, range(3), circuit=breaker, return_exceptions=True)
    h.result(timeout=HANG_GUARD)
    rows = h.failures()
    assert [f.index for f in rows] == [0, 1, 2]
    assert all(isinstance(f.exception, orchestra.CircuitOpenError) for f in rows)
    assert all(f.duration is None and f.duration_text == "?" for f in rows)
