"""The engine lock of the I/O thread: other threads may drive the engine, one at a time,
in call order, and work a busy caller loop left for later is picked up by the hot tick."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator

import pytest

from orchestra_nb._ioloop import HOT_WINDOW, TIMER_SLACK, IOThread
from orchestra_nb.testing import wait_for


@pytest.fixture
def io() -> Iterator[IOThread]:
    thread = IOThread()
    try:
        yield thread
    finally:
        thread.loop.call_soon_threadsafe(thread.loop.stop)
        thread.thread.join(5)
        thread.loop.close()


def test_run_now_runs_on_the_calling_thread_while_the_io_thread_waits(io: IOThread) -> None:
    ran_on: list[int] = []
    io_callbacks: list[str] = []

    def inside() -> None:
        ran_on.append(threading.get_ident())
        # A callback scheduled now may not run until the engine is given back.
        io.loop.call_soon(io_callbacks.append, "ran")
        assert io.loop.engine._is_owned()  # type: ignore[attr-defined]
        assert not io_callbacks

    io.run_now(inside)
    assert ran_on == [threading.get_ident()]
    wait_for(lambda: io_callbacks == ["ran"], timeout=5, what="the I/O thread woken for the callback")


def test_pending_calls_run_before_the_borrowers_own_work(io: IOThread) -> None:
    order: list[str] = []
    gate = threading.Event()
    io.run_now(lambda: None)  # hot now; keep the I/O thread busy so the calls stay queued
    io.loop.call_soon_threadsafe(gate.wait, 5)
    io.call(order.append, "first")
    io.call(order.append, "second")
    gate.set()
    io.run_now(order.append, "third")
    wait_for(lambda: len(order) == 3, timeout=5, what="all three calls")
    assert order == ["first", "second", "third"]


def test_deferred_callbacks_run_on_the_borrower_when_it_lets_go(io: IOThread) -> None:
    where: list[tuple[str, int]] = []

    def inside() -> None:
        io.loop.defer(lambda: where.append(("deferred", threading.get_ident())))
        where.append(("body", threading.get_ident()))

    io.run_now(inside)
    me = threading.get_ident()
    assert where == [("body", me), ("deferred", me)]


def test_a_call_from_a_busy_loop_is_run_by_the_hot_tick(io: IOThread) -> None:
    """From a running loop, a call does not wake the I/O thread: the loop would run it on
    its next turn. Here that turn never comes while we wait, so the hot tick must."""
    done = threading.Event()

    async def caller() -> None:
        io.run_now(lambda: None)  # the engine was just used: the I/O loop is hot
        io.call(done.set)
        # Block this loop synchronously: only the I/O thread can run the call now.
        assert done.wait(timeout=5), "the queued call was stranded behind a busy loop"

    asyncio.run(caller())


def test_the_loop_cools_down_and_calls_then_wake_it(io: IOThread) -> None:
    io.run_now(lambda: None)
    wait_for(lambda: not io.loop.hot, timeout=5 + 10 * HOT_WINDOW, what="the I/O loop cooling down")
    done = threading.Event()

    async def caller() -> None:
        io.call(done.set)
        assert done.wait(timeout=5), "a call made while the I/O loop was cold was not run"

    asyncio.run(caller())


class _InboxDrainedOnAppend(collections.deque[tuple[object, tuple[object, ...]]]):
    """An inbox drained by the engine the moment the first call is appended, before
    ``call()`` goes on: what a hot tick on the I/O thread may do at that instant."""

    def __init__(self, io: IOThread) -> None:
        super().__init__()
        self._io = io
        self._armed = True

    def append(self, item: tuple[object, tuple[object, ...]]) -> None:
        super().append(item)
        if self._armed:
            self._armed = False
            self._io.run_now(lambda: None)  # drains the inbox first, with the engine held


def test_a_drain_racing_a_call_from_a_hot_loop_leaves_later_calls_waking_the_engine(io: IOThread) -> None:
    """A drain between a call's append and its check of the drain flag must not leave the
    flag set: every later call would then skip waking the I/O thread, and once the loop
    cooled down nothing would ever run them (a streamed map hung on its backpressure
    nudge)."""
    first, later = threading.Event(), threading.Event()

    async def caller() -> None:
        io.run_now(lambda: None)  # hot: a call from this loop wakes nobody
        io._inbox = _InboxDrainedOnAppend(io)  # type: ignore[assignment]
        io.call(first.set)

    asyncio.run(caller())
    assert first.is_set()
    wait_for(lambda: not io.loop.hot, timeout=5 + 10 * HOT_WINDOW, what="the I/O loop cooling down")
    io.call(later.set)  # from a thread without a loop: must wake the I/O thread
    assert later.wait(timeout=5), "a call after the race was never run"


def test_a_busy_holder_is_asked_for_the_engine_at_once_for_events(io: IOThread) -> None:
    selector = io.loop.engine_selector
    asked: list[bool] = []

    def hold() -> None:
        io.loop.call_soon_threadsafe(lambda: None)  # an event: the self-pipe is written
        wait_for(lambda: selector.engine_wanted, timeout=5, what="the I/O thread waking up")
        asked.append(selector.wants_engine())  # at once, whatever the time

    io.run_now(hold)
    assert asked == [True]


def test_a_busy_holder_is_asked_for_the_engine_for_a_timer_only_after_the_slack(io: IOThread) -> None:
    """Hot ticks come every 5 ms: a busy poll lets them wait up to TIMER_SLACK rather than
    yield the engine to every one it meets."""
    selector = io.loop.engine_selector
    seen: dict[str, object] = {}
    io.call(io.loop.call_later, 0.01, lambda: None)
    io.flush()  # wakes the I/O thread once, to take the new timer into account ...
    io.run_sync(asyncio.sleep(0))  # ... which it has done once it ran this

    def hold() -> None:
        wait_for(lambda: selector.engine_wanted, timeout=5, interval=0, what="the timer coming due")
        if time.perf_counter() - selector._wanted_at < TIMER_SLACK * 0.9:
            seen["early"] = selector.wants_engine()
        wait_for(selector.wants_engine, timeout=5, what="the slack running out")
        seen["events"] = selector._events

    io.run_now(hold)
    assert seen["events"] is False
    assert seen.get("early", False) is False
