"""Faults while a caller busy-polls for its result (``Pool(busy_poll=...)``, ``_spin``).

A thread blocking in ``handle.result()`` and a coroutine awaiting one ``run()`` poll the
data socket under the engine lock for up to the pool's window before they sleep
(``ResultReaders.busy_poll``, in ``backends/_caller.py``). These tests check what reaches such a caller when the
task fails, is too slow, is cancelled, loses its worker or its pool meanwhile.

The windows are a hang guard (20 s), so the poll is certainly running when the fault
lands: the task announces that it started (a marker file), and the fault follows at once.
The poll must let the I/O thread in for the worker's exit, the cancel or the shutdown, so
each of these tests ends in milliseconds, not after the window.

An awaiting coroutine polls for at most ``backends._caller.LOOP_POLL_LIMIT`` (its loop runs
nothing else meanwhile); tests of the polling itself lift that cap (``uncapped``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultkit import assert_serves
from localkit import local_core, local_io

import orchestra_nb as orchestra
from orchestra_nb import (
    OrchestraError,
    PoolClosedError,
    RemoteTraceback,
    TaskState,
    WorkerCrashedError,
    _spin,
)
from orchestra_nb.backends import _caller
from orchestra_nb.testing import kill_pid, wait_for

HANG_GUARD = 20.0
SHORT_WINDOW = 0.001  # far shorter than NAP: every poll misses
NAP = 0.05


# --- task functions (module level: workers import this module) ---------------------------


class PollError(Exception):
    """Raised by a task; must come back as itself, not wrapped."""


def inc(x: int) -> int:
    return x + 1


def fail_after(seconds: float, message: str) -> None:
    time.sleep(seconds)  # the caller is polling by the time the error is sent
    raise PollError(message)


def nap(x: int) -> int:
    time.sleep(NAP)
    return x


def announce_then_sleep(marker: str, seconds: float) -> int:
    """Write this worker's pid to ``marker`` (atomically), then sleep."""
    tmp = f"{marker}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, marker)
    time.sleep(seconds)
    return os.getpid()


# --- helpers -------------------------------------------------------------------------------


def started(marker: Path) -> int:
    """Wait (hang guard) until the task has started; the pid of its worker."""
    wait_for(marker.exists, timeout=HANG_GUARD, what="the task started")
    return int(marker.read_text())


def when_started(marker: Path, fault: Callable[[int], Any]) -> concurrent.futures.Future[Any]:
    """On another thread: once the task has started, ``fault(pid of its worker)``."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fault")
    try:
        return executor.submit(lambda: fault(started(marker)))
    finally:
        executor.shutdown(wait=False)


def kill(pid: int) -> int:
    assert kill_pid(pid, signal.SIGKILL)
    return pid


def sleeper_polled_for(
    make_pool: Callable[..., orchestra.Pool], tmp_path: Path, **options: Any
) -> tuple[orchestra.Pool, int, orchestra.TaskHandle[Any], Path]:
    """A one-worker pool whose callers poll for 20 s, running a task that sleeps as long:
    ``(pool, its worker's pid, the task's handle, the marker the task writes at start)``."""
    pool = make_pool(workers=1, busy_poll=HANG_GUARD, **options)
    [pid] = pool.worker_pids()
    marker = tmp_path / "started"
    return pool, pid, pool.run(announce_then_sleep, str(marker), HANG_GUARD), marker


def assert_killed(info: pytest.ExceptionInfo[WorkerCrashedError], pid: int,
                  killed: concurrent.futures.Future[Any]) -> None:
    assert killed.result(HANG_GUARD) == pid
    assert info.value.pid == pid
    assert info.value.returncode == -signal.SIGKILL


async def awaited(handle: orchestra.TaskHandle[Any]) -> Any:
    return await handle


@pytest.fixture(autouse=True)
def patient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A poll that finds the CPUs busy gives up (``_spin.CONTENDED``); these tests need it
    to go on until the result, the fault or the timeout, whatever the machine's load."""
    monkeypatch.setattr(_spin, "CONTENDED", HANG_GUARD)


@pytest.fixture
def uncapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """An awaiting coroutine polls for the pool's whole window."""
    monkeypatch.setattr(_caller, "LOOP_POLL_LIMIT", HANG_GUARD)


# --- a task error through the poll ---------------------------------------------------------


def test_a_task_error_reaches_a_blocking_caller_through_its_poll_as_itself(make_pool) -> None:
    pool = make_pool(workers=1, busy_poll=HANG_GUARD)
    assert pool.run(inc, 0).result(HANG_GUARD) == 1
    poll = local_core(pool).readers.poll
    misses = poll.misses
    handle = pool.run(fail_after, 0.1, "bad input 7")
    with pytest.raises(PollError, match="bad input 7") as info:
        handle.result(HANG_GUARD)
    assert type(info.value) is PollError  # the original type, not a RemoteError
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_after" in str(info.value.__cause__)
    assert poll.misses == misses  # the poll did not give up (20 s): the error ended it
    assert pool.run(inc, 1).result(HANG_GUARD) == 2


async def test_a_task_error_reaches_an_awaiting_coroutine_through_its_poll_as_itself(
    make_pool, uncapped: None
) -> None:
    pool = make_pool(workers=1, busy_poll=HANG_GUARD)
    assert await pool.run(inc, 0) == 1  # this loop now reads the pool's results itself
    handle = pool.run(fail_after, 0.1, "bad input 8")
    steps = handle.__await__()
    with pytest.raises(PollError, match="bad input 8") as info:
        steps.send(None)  # one step: the poll read the error; the coroutine never yielded
    assert type(info.value) is PollError
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert await pool.run(inc, 1) == 2


# --- the caller's timeout bounds the poll ----------------------------------------------------


def test_a_result_timeout_ends_the_poll_long_before_the_window(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=1, busy_poll=HANG_GUARD, cancel_grace=HANG_GUARD)
    [pid] = pool.worker_pids()
    handle = pool.run(announce_then_sleep, str(tmp_path / "started"), HANG_GUARD)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        handle.result(timeout=0.2)
    assert time.monotonic() - t0 < HANG_GUARD / 2  # a hang guard, not a timing test
    assert not isinstance(info.value, OrchestraError)  # the wait timed out, not the task
    assert local_core(pool).readers.poll.misses == 1  # the poll ran, and gave up at the timeout
    assert not handle.done()
    assert handle.state == TaskState.RUNNING  # still running: a timed-out wait stops nothing
    assert handle.cancel()
    assert handle.wait_finished(HANG_GUARD)
    assert handle.state == TaskState.CANCELLED
    assert_serves(pool)
    assert pool.worker_pids() == [pid]  # the task was interrupted, its worker kept


# --- a poll that misses --------------------------------------------------------------------


def test_polls_that_miss_back_off_and_results_arrive_the_normal_way(make_pool) -> None:
    pool = make_pool(workers=1, busy_poll=SHORT_WINDOW)
    poll = local_core(pool).readers.poll
    settled_on: list[int] = []
    results = []
    for i in range(3):
        handle = pool.run(nap, i)
        handle._future.add_done_callback(lambda _: settled_on.append(threading.get_ident()))
        results.append(handle.result(HANG_GUARD))
    assert results == [0, 1, 2]
    # Polled and missed; skipped (backing off after the miss); polled and missed again.
    assert (poll.hits, poll.misses) == (0, 2)
    assert settled_on == [local_io(pool).thread.ident] * 3  # read by the I/O thread, not the caller


async def test_an_awaited_poll_that_misses_leaves_the_wait_to_the_loop(make_pool) -> None:
    pool = make_pool(workers=1, busy_poll=SHORT_WINDOW)
    handle = pool.run(nap, 7)
    steps = handle.__await__()
    assert asyncio.isfuture(steps.send(None))  # the poll gave up: the coroutine yields to its loop
    steps.close()
    assert await asyncio.wait_for(asyncio.shield(handle), HANG_GUARD) == 7
    assert (local_core(pool).readers.poll.hits, local_core(pool).readers.poll.misses) == (0, 1)


# --- a worker killed while the caller polls --------------------------------------------------


def test_a_worker_killed_while_a_blocking_caller_polls_fails_the_call(make_pool, tmp_path: Path) -> None:
    pool, pid, handle, marker = sleeper_polled_for(make_pool, tmp_path, max_worker_crashes=1)
    killed = when_started(marker, kill)
    t0 = time.monotonic()
    with pytest.raises(WorkerCrashedError) as info:
        handle.result(HANG_GUARD)
    elapsed = time.monotonic() - t0
    assert_killed(info, pid, killed)
    # The task starts and is killed within milliseconds. A poll that kept the engine to
    # itself would hide the worker's exit from the I/O thread until the window's end.
    assert elapsed < HANG_GUARD / 2  # a hang guard: it takes milliseconds
    assert info.value.task_index == 0
    assert handle.state == TaskState.FAILED
    assert_serves(pool)
    assert pid not in pool.worker_pids()  # replaced


async def test_a_worker_killed_while_a_coroutine_polls_fails_the_await(
    make_pool, tmp_path: Path, uncapped: None
) -> None:
    pool, pid, handle, marker = sleeper_polled_for(make_pool, tmp_path, max_worker_crashes=1)
    killed = when_started(marker, kill)
    with pytest.raises(WorkerCrashedError) as info:
        await asyncio.wait_for(awaited(handle), HANG_GUARD)
    assert_killed(info, pid, killed)
    assert await pool.run(inc, 1) == 2
    assert_serves(pool)
    assert pid not in pool.worker_pids()


# --- a cancel while the caller polls ---------------------------------------------------------


def test_a_cancel_from_another_thread_while_the_caller_polls_stops_the_task(make_pool, tmp_path: Path) -> None:
    # cancel_grace=HANG_GUARD: the task must stop on the interrupt; its worker is not killed.
    pool, pid, handle, marker = sleeper_polled_for(make_pool, tmp_path, cancel_grace=HANG_GUARD)
    cancelled = when_started(marker, lambda _: handle.cancel())
    # A call's future settles once the call is final: here, once the worker interrupted it.
    with pytest.raises(concurrent.futures.CancelledError):
        handle.result(HANG_GUARD)
    assert cancelled.result(HANG_GUARD) is True
    assert handle.cancelled()
    assert handle.state == TaskState.CANCELLED
    assert_serves(pool)
    assert pool.worker_pids() == [pid]  # interrupted, not killed


async def test_a_cancel_from_another_task_while_a_coroutine_polls_stops_the_task(
    make_pool, tmp_path: Path
) -> None:
    # The awaiting coroutine's poll is capped (backends._caller.LOOP_POLL_LIMIT), so the canceller, on the
    # same loop, gets to run although the pool's window is 20 s.
    pool, pid, handle, marker = sleeper_polled_for(make_pool, tmp_path, cancel_grace=HANG_GUARD)

    async def cancel_once_started() -> bool:
        await asyncio.to_thread(started, marker)
        return handle.cancel()

    canceller = asyncio.ensure_future(cancel_once_started())
    waiter = asyncio.ensure_future(awaited(handle))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, HANG_GUARD)
    assert await canceller is True
    assert await asyncio.to_thread(handle.wait_finished, HANG_GUARD)
    assert handle.state == TaskState.CANCELLED  # the remote task was stopped too
    assert await pool.run(inc, 1) == 2
    assert_serves(pool)
    assert pool.worker_pids() == [pid]


# --- the pool shut down while the caller polls -----------------------------------------------


def test_a_shutdown_from_another_thread_while_the_caller_polls(make_pool, tmp_path: Path) -> None:
    pool, _, handle, marker = sleeper_polled_for(make_pool, tmp_path)
    closed = when_started(marker, lambda _: pool.shutdown(cancel_pending=True))
    with pytest.raises(concurrent.futures.CancelledError):
        handle.result(HANG_GUARD)
    closed.result(HANG_GUARD)  # shutdown returned: every worker has exited
    assert handle.state == TaskState.CANCELLED
    assert pool.state == "closed"
    assert pool.worker_pids() == []
    with pytest.raises(PoolClosedError):
        pool.run(inc, 1).result(HANG_GUARD)


# --- the poll lets the I/O thread in; the caller's timeout bounds it ------------------------


def test_a_result_timeout_counts_the_poll_against_the_timeout(make_pool, tmp_path: Path) -> None:
    pool = make_pool(workers=1, busy_poll=HANG_GUARD)
    handle = pool.run(announce_then_sleep, str(tmp_path / "started"), HANG_GUARD)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        handle.result(timeout=1.0)
    elapsed = time.monotonic() - t0
    handle.cancel()
    # Polling for the timeout, then waiting on the future for the whole timeout again,
    # would take at least 2 s.
    assert elapsed < 1.8
