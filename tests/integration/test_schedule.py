"""Scheduled work: ``run_after``, ``run_at``, ``every`` on real workers.

Schedules are checked exactly on a :class:`~orchestra_nb.testing.FakeClock`: ``advance``
returns once the scheduler has started everything due, so the start times recorded by the
handle are exact clock readings, with no sleeping. One test uses the real clock.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import JobStarted, Map, Scheduler, Sequence, Task, TaskState
from orchestra_nb.testing import EventRecorder, FakeClock, wait_for

HANG_GUARD = 30.0
WALL = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)


def inc(x: int) -> int:
    return x + 1


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def gated(i: int, d: str) -> int:
    Path(d, f"started-{i}").touch()
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(os.path.join(d, f"release-{i}")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"release-{i} never appeared")
        time.sleep(0.002)
    return i


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=100.0, wall=WALL)


@pytest.fixture
def scheduler(clock: FakeClock) -> Iterator[Scheduler]:
    with Scheduler(clock) as s:
        yield s


def wait_between_runs(h: orchestra.ScheduledHandle) -> None:
    """Until the scheduler has seen the current run end (the handle is SCHEDULED again)."""
    wait_for(lambda: h.state is TaskState.SCHEDULED or h.done(), HANG_GUARD, what="the run to end")


def test_every_runs_on_an_exact_schedule(pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler) -> None:
    h = scheduler.every(10, inc, 1, count=3, pool=pool)
    assert h.state is TaskState.SCHEDULED
    assert h.next_start == WALL + datetime.timedelta(seconds=10)
    assert h.next_start_in == 10
    clock.advance(9.5)
    assert h.runs == [] and h.state is TaskState.SCHEDULED
    clock.advance(0.5)
    assert h.start_times == [110.0]
    assert h.next_start == WALL + datetime.timedelta(seconds=20)
    for expected in ([110.0, 120.0], [110.0, 120.0, 130.0]):
        assert h.runs[-1].result(HANG_GUARD) == 2
        wait_between_runs(h)
        clock.advance(10)
        assert h.start_times == expected
    assert h.result(HANG_GUARD) == [2, 2, 2]
    assert h.state is TaskState.SUCCEEDED and h.next_start is None
    assert h.skipped_times == []
    assert scheduler.pending() == []


def test_every_with_a_late_run_skips(
    pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler, tmp_path: Path
) -> None:
    h = scheduler.every(10, gated, 0, str(tmp_path), count=2, overlap="skip", pool=pool)
    clock.advance(10)
    wait_for(lambda: Path(tmp_path, "started-0").exists(), HANG_GUARD, what="run 1 running")
    clock.advance(10)  # run 1 still going: this one is skipped
    clock.advance(10)  # ... and this one
    assert h.skipped_times == [120.0, 130.0]
    assert h.start_times == [110.0]
    Path(tmp_path, "release-0").touch()
    wait_between_runs(h)
    clock.advance(10)
    assert h.start_times == [110.0, 140.0]
    assert h.result(HANG_GUARD) == [0, 0]


def test_every_with_a_late_run_queues_one(
    pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler, tmp_path: Path
) -> None:
    h = scheduler.every(5, gated, 0, str(tmp_path), count=3, overlap="queue", delay=0, pool=pool)
    clock.advance(0)
    wait_for(lambda: Path(tmp_path, "started-0").exists(), HANG_GUARD, what="run 1 running")
    clock.advance(5)  # due while run 1 runs: queued
    clock.advance(5)  # another one due: one is waiting already, so this one is skipped
    assert h.start_times == [100.0] and h.skipped_times == [110.0]
    Path(tmp_path, "release-0").touch()  # run 1 ends: the queued run starts at once
    wait_for(lambda: len(h.start_times) == 2, HANG_GUARD, what="the queued run")
    assert h.start_times == [100.0, 110.0]  # started when run 1 ended (the clock stood at 110)
    wait_between_runs(h)
    clock.advance(5)
    assert h.start_times == [100.0, 110.0, 115.0]
    assert h.result(HANG_GUARD) == [0, 0, 0]


def test_run_after_and_run_at(pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler) -> None:
    later = scheduler.run_after(5, inc, 41, pool=pool)
    at = scheduler.run_at(WALL + datetime.timedelta(seconds=30), square, 7, pool=pool)
    assert [h.name for h in scheduler.pending()] == ["inc", "square"]
    assert scheduler.status()[1] == {
        "id": at.id,
        "name": "square",
        "state": "SCHEDULED",
        "runs": 0,
        "skipped": 0,
        "next_start": "2030-01-01T12:00:30+00:00",
        "next_start_in": 30.0,
        "interval": None,
        "count": 1,
        "overlap": "skip",
    }
    clock.advance(4)
    assert later.state is TaskState.SCHEDULED and later.runs == []
    clock.advance(1)
    assert later.start_times == [105.0]
    assert later.result(HANG_GUARD) == 42
    clock.advance(24)
    assert at.runs == []
    clock.advance(1)
    assert at.start_times == [130.0]
    assert at.result(HANG_GUARD) == 49


def test_a_scheduled_step(pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler) -> None:
    refresh = Sequence(Task(list, range(4)), Map(square), Task(sum), name="refresh")
    h = scheduler.every(60, refresh, count=2, pool=pool)
    clock.advance(60)
    assert h.runs[0].result(HANG_GUARD) == 14
    wait_between_runs(h)
    clock.advance(60)
    assert h.result(HANG_GUARD) == [14, 14]


def test_cancel_before_it_starts(pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler) -> None:
    with EventRecorder(pool, types=(JobStarted,)) as rec:
        h = scheduler.run_after(5, inc, 1, pool=pool)
        periodic = scheduler.every(1, inc, 2, pool=pool)
        assert h.cancel() and periodic.cancel()
        assert not h.cancel()
        clock.advance(10)
        assert h.state is TaskState.CANCELLED and h.runs == [] and h.next_start is None
        assert periodic.state is TaskState.CANCELLED and periodic.runs == []
        with pytest.raises(concurrent.futures.CancelledError):
            h.result(0)
        assert pool.run(inc, 0).result(HANG_GUARD) == 1  # a barrier on the event stream
        rec.wait(lambda e: isinstance(e, JobStarted), HANG_GUARD)
        assert len(rec.of(JobStarted)) == 1


@pytest.mark.local_only("the running run is interrupted")
def test_cancel_stops_a_running_periodic_task(
    pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler, tmp_path: Path
) -> None:
    h = scheduler.every(10, gated, 0, str(tmp_path), pool=pool)
    clock.advance(10)
    wait_for(lambda: Path(tmp_path, "started-0").exists(), HANG_GUARD, what="run 1 running")
    assert h.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        h.runs[0].result(HANG_GUARD)
    assert h.state is TaskState.CANCELLED


def test_a_failing_run_ends_the_schedule(pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler) -> None:
    h = scheduler.every(1, boom, 3, count=5, pool=pool)
    clock.advance(1)
    with pytest.raises(ValueError, match="boom 3") as info:
        h.result(HANG_GUARD)
    assert "in run 1 of scheduled 'boom'" in info.value.__notes__
    clock.advance(5)
    assert len(h.runs) == 1 and h.state is TaskState.FAILED


def test_close_cancels_what_is_scheduled(pool: orchestra.Pool, clock: FakeClock) -> None:
    s = Scheduler(clock)
    h = s.every(10, inc, 1, pool=pool)
    thread = s._thread
    assert thread is not None and thread.is_alive()
    s.close()
    assert h.cancelled()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        s.run_after(1, inc, 1, pool=pool)


def test_the_pool_statistics_list_what_is_scheduled_on_it(
    pool: orchestra.Pool, clock: FakeClock, scheduler: Scheduler, tmp_path: Path
) -> None:
    hourly = scheduler.every(10, gated, 0, str(tmp_path), count=3, pool=pool, name="refresh")
    once = scheduler.run_after(5, square, 3, pool=pool)
    elsewhere = scheduler.run_after(5, inc, 1)  # no pool given: the default pool's
    listed = pool.statistics().scheduled
    assert [t.id for t in listed] == [once.id, hourly.id]  # soonest first
    first, second = listed
    assert (first.name, first.state, first.interval, first.count, first.runs) == (
        "square",
        TaskState.SCHEDULED,
        None,
        1,
        0,
    )
    assert first.next_start == WALL + datetime.timedelta(seconds=5) and first.next_start_in == 5
    assert second == orchestra.ScheduledStatistics(
        id=hourly.id,
        name="refresh",
        state=TaskState.SCHEDULED,
        next_start=WALL + datetime.timedelta(seconds=10),
        next_start_in=10.0,
        interval=10,
        count=3,
        runs=0,
        skipped=0,
        overlap="skip",
    )
    assert pool.status()["scheduled"][1] == {
        "id": hourly.id,
        "name": "refresh",
        "state": "SCHEDULED",
        "next_start": "2030-01-01T12:00:10+00:00",
        "next_start_in": 10.0,
        "interval": 10,
        "count": 3,
        "runs": 0,
        "skipped": 0,
        "overlap": "skip",
    }
    # Work given no pool goes to the default pool: listed there (before it exists, too), not here.
    assert [t.id for t in orchestra._api.scheduled_on(None)] == [elsewhere.id]
    assert orchestra.cancel_scheduled(elsewhere.id)  # by id, from the default pool's view
    assert elsewhere.cancelled() and not once.done()

    clock.advance(10)  # `once` ran at 105 and is gone; `refresh` runs (gated): RUNNING
    assert once.result(HANG_GUARD) == 9
    wait_for(lambda: Path(tmp_path, "started-0").exists(), HANG_GUARD, what="run 1 running")
    (running,) = pool.statistics().scheduled
    assert (running.id, running.state, running.runs) == (hourly.id, TaskState.RUNNING, 1)
    assert running.next_start == WALL + datetime.timedelta(seconds=20)
    Path(tmp_path, "release-0").touch()
    wait_between_runs(hourly)
    (waiting,) = pool.statistics().scheduled
    assert (waiting.state, waiting.runs, waiting.next_start_in) == (TaskState.SCHEDULED, 1, 10.0)

    assert pool.cancel_scheduled("refresh")  # by name
    assert hourly.cancelled() and pool.statistics().scheduled == ()
    assert not pool.cancel_scheduled("refresh") and not pool.cancel_scheduled(hourly.id)


def test_cancelling_scheduled_work_by_a_bad_key_names_the_problem(
    pool: orchestra.Pool, scheduler: Scheduler
) -> None:
    twins = [scheduler.run_after(60, inc, i, pool=pool, name="twin") for i in range(2)]
    ids = f"{twins[0].id}, {twins[1].id}"
    with pytest.raises(ValueError, match=re.escape(f"2 scheduled tasks are named 'twin' (ids {ids})")):
        pool.cancel_scheduled("twin")
    with pytest.raises(TypeError, match=r"its id \(an int\) or its name"):
        pool.cancel_scheduled(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="its id"):
        orchestra.cancel_scheduled(True)  # type: ignore[arg-type]
    assert scheduler.cancel(twins[1].id) and not twins[0].done()
    assert scheduler.cancel("twin") and twins[0].cancelled()  # the only one left by that name
    assert scheduler.find("twin") is None


def test_bad_schedules_raise_naming_the_culprit(scheduler: Scheduler) -> None:
    with pytest.raises(ValueError, match="overlap"):
        scheduler.every(1, inc, 1, overlap="pile")
    with pytest.raises(ValueError, match="interval"):
        scheduler.every(0, inc, 1)
    with pytest.raises(ValueError, match="delay"):
        scheduler.run_after(-1, inc, 1)
    with pytest.raises(ValueError, match="count"):
        scheduler.every(1, inc, 1, count=0)
    with pytest.raises(TypeError, match="datetime"):
        scheduler.run_at(5, inc, 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot schedule"):
        scheduler.run_after(1, 42)  # type: ignore[arg-type]


def test_real_time(pool: orchestra.Pool) -> None:
    """On the system clock and the default scheduler: the runs happen, in order."""
    once = orchestra.run_after(0.05, inc, 1, pool=pool)
    periodic = orchestra.every(0.05, inc, 2, count=3, pool=pool)
    assert once.result(HANG_GUARD) == 2
    assert periodic.result(HANG_GUARD) == [3, 3, 3]
    assert len(periodic.start_times) + len(periodic.skipped_times) >= 3
    assert periodic.start_times == sorted(periodic.start_times)
    soon = orchestra.run_at(datetime.datetime.now() + datetime.timedelta(seconds=0.05), inc, 3, pool=pool)
    assert soon.result(HANG_GUARD) == 4
