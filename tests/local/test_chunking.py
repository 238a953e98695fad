"""The adaptive chunker's choices, seen in the TaskStateChanged journal (one RUNNING event
per chunk sent): a small map of fast tasks is not cut into many tiny chunks, a map of
slower tasks still is (to balance its end), and every item is still accounted for."""

from __future__ import annotations

import time

from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb import TaskState, TaskStateChanged
from orchestra_nb._bus import Subscription
from orchestra_nb._events import replay_counts
from orchestra_nb._serialize import dumps_callable
from orchestra_nb.testing import wait_for

HANG_GUARD = 30.0


def inc(x: int) -> int:
    return x + 1


def nap_inc(x: int) -> int:
    time.sleep(0.001)
    return x + 1


def _journal(pool: orchestra.Pool) -> tuple[list[TaskStateChanged], Subscription]:
    events: list[TaskStateChanged] = []
    return events, pool.subscribe(events.append, types=(TaskStateChanged,))


def _chunks(events: list[TaskStateChanged], job_id: int) -> list[int]:
    return [e.count for e in events if e.job_id == job_id and e.state == TaskState.RUNNING]


def test_a_small_map_of_fast_tasks_is_sent_in_one_chunk(pool: orchestra.Pool) -> None:
    # What the engine has learnt of the function (set, not measured: a loaded machine
    # would measure anything): a microsecond an item, so 50 items are 50 us of work.
    local_core(pool).dispatch.fn_time[dumps_callable(inc)[1]] = 1e-6
    events, sub = _journal(pool)
    try:
        handle = pool.map(inc, range(50))
        assert handle.result(HANG_GUARD) == [x + 1 for x in range(50)]
        job_id = handle.job_id
        wait_for(lambda: sum(_chunks(events, job_id)) >= 50, timeout=HANG_GUARD, what="RUNNING events")
        wait_for(
            lambda: replay_counts(events, job_id)[TaskState.SUCCEEDED] == 50,
            timeout=HANG_GUARD,
            what="the SUCCEEDED events",
        )
    finally:
        sub.close()
    # Without a floor on a chunk's work, the chunks shrank to balance the end: 13, 10, 7,
    # 5, 4, 3, 2, 2, 1, 1, 1, 1 (12 messages for 50 us of work).
    assert _chunks(events, job_id) == [50]
    counts = replay_counts(events, job_id)
    assert counts[TaskState.SUCCEEDED] == 50 and sum(counts) == 50  # item by item


def test_a_map_of_slower_tasks_is_still_split_across_the_workers(pool: orchestra.Pool) -> None:
    events, sub = _journal(pool)
    try:
        handle = pool.map(nap_inc, range(200))  # at least 1 ms an item: 0.2 s of work
        assert handle.result(HANG_GUARD) == [x + 1 for x in range(200)]
        job_id = handle.job_id
        wait_for(lambda: sum(_chunks(events, job_id)) >= 200, timeout=HANG_GUARD, what="RUNNING events")
    finally:
        sub.close()
    sizes = _chunks(events, job_id)
    assert sum(sizes) == 200
    # Chunks aim at 20 ms of work: at most 20 items of at least 1 ms each (the first two,
    # sent before anything was measured, have one item each).
    assert len(sizes) >= 10 and max(sizes) <= 20, sizes
    assert {e.worker_id for e in events if e.job_id == job_id and e.state == TaskState.RUNNING} == set(
        local_core(pool).workers.procs
    )


def test_a_lower_measure_replaces_an_inflated_estimate_at_once(pool: orchestra.Pool) -> None:
    core = local_core(pool)
    assert pool.map(inc, range(50)).result(HANG_GUARD) == [x + 1 for x in range(50)]  # measured
    # Then inflated, as by a chunk whose worker was preempted on a loaded machine: 10 ms an
    # item, so the next map's first chunks have two items each.
    digest = dumps_callable(inc)[1]
    core.dispatch.fn_time[digest] = 0.01
    events, sub = _journal(pool)
    try:
        handle = pool.map(inc, range(50))
        assert handle.result(HANG_GUARD) == [x + 1 for x in range(50)]
        job_id = handle.job_id
        wait_for(lambda: sum(_chunks(events, job_id)) >= 50, timeout=HANG_GUARD, what="RUNNING events")
    finally:
        sub.close()
    sizes = _chunks(events, job_id)
    # The first result (tens of us an item: mostly the chunk's fixed cost) sets the
    # estimate, and the next chunks are sized to balance the end (ceil(46 / 4) = 12 items
    # or more). Halving the error once per result went 2, 2, 3, 7, 9, 7...
    assert sizes[:2] == [2, 2] and sizes[2] >= 12, sizes
