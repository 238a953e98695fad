"""busy_poll: a caller waiting on one short call reads its result without going to sleep.

Each test's window is a hang guard (20 s): the result of ``inc`` always arrives within it,
so the busy poll always catches it, and the outcome is deterministic. For the same reason
the cap on an awaiting coroutine's poll (``backends._caller.LOOP_POLL_LIMIT``, 2 ms) is lifted, except in
the test of the cap itself, and so is the give-up on a busy CPU (``_spin.CONTENDED``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb import _spin
from orchestra_nb.backends import _caller

HANG_GUARD = 20.0


def inc(x: int) -> int:
    return x + 1


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture
def polling_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[orchestra.Pool]:
    monkeypatch.setattr(_caller, "LOOP_POLL_LIMIT", HANG_GUARD)
    # A poll that finds the CPUs busy gives up: deterministic here only if it never does.
    monkeypatch.setattr(_spin, "CONTENDED", HANG_GUARD)
    p = orchestra.Pool(workers=1, busy_poll=HANG_GUARD)
    p.wait_started(timeout=30)
    try:
        yield p
    finally:
        p.shutdown(cancel_pending=True)


async def test_an_awaited_call_completes_without_the_loop_waiting(
    polling_pool: orchestra.Pool,
) -> None:
    assert await polling_pool.run(inc, 0) == 1  # the function is defined on the worker
    handle = polling_pool.run(inc, 1)
    steps = handle.__await__()
    with pytest.raises(StopIteration) as finished:
        steps.send(None)  # one step: the coroutine never yielded to the loop
    assert finished.value.value == 2


def gated_inc(x: int, gate: str) -> int:
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.001)
    return x + 1


async def test_without_busy_poll_an_awaited_call_waits_in_the_loop(tmp_path: Path) -> None:
    async with orchestra.Pool(workers=1, busy_poll=0) as pool:
        assert await pool.run(inc, 0) == 1
        # Gated: its result cannot be there before the first step (a result that is, read
        # by the I/O thread meanwhile, would be taken at once, polling or not).
        gate = tmp_path / "gate"
        handle = pool.run(gated_inc, 1, str(gate))
        steps = handle.__await__()
        waited = steps.send(None)  # yielded: the Task would wait on the handle's future
        assert asyncio.isfuture(waited) and not waited.done()
        steps.close()
        gate.touch()
        assert await asyncio.wait_for(asyncio.shield(handle), HANG_GUARD) == 2
        poll = local_core(pool).readers.poll
        assert (poll.hits, poll.misses) == (0, 0)  # it never polled


def test_blocking_results_are_read_by_their_callers(polling_pool: orchestra.Pool) -> None:
    """A blocking ``result()`` polls for its result on its own thread. The I/O thread may
    still read one: when it wakes up for other work, the poll lets it have the engine. So
    this counts over many calls. Measured: 6-20 of 20 read here with busy polling, 0-2 of
    20 without (a result can come in while the caller sends, and be read then)."""
    me = threading.get_ident()
    read_here = 0
    for i in range(40):
        handle = polling_pool.run(inc, i)
        settled_on: list[int] = []
        handle._future.add_done_callback(lambda _, seen=settled_on: seen.append(threading.get_ident()))
        assert handle.result(HANG_GUARD) == i + 1
        read_here += settled_on == [me]
    assert read_here >= 8


def test_a_negative_busy_poll_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="busy_poll must be >= 0 seconds, got -1"):
        orchestra.Pool(workers=1, busy_poll=-1)


async def test_an_awaiting_loop_polls_briefly_and_keeps_running_its_other_tasks() -> None:
    """However long the pool's window, an awaiting coroutine polls for at most
    _LOOP_POLL_LIMIT: its loop runs nothing else meanwhile."""
    async with orchestra.Pool(workers=1, busy_poll=HANG_GUARD) as pool:
        assert await pool.run(inc, 0) == 1
        handle = pool.run(nap, 0.5)
        steps = handle.__await__()
        assert asyncio.isfuture(steps.send(None))  # yielded to the loop long before the result
        steps.close()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while not handle.done():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.ensure_future(ticker())
        assert await asyncio.wait_for(asyncio.shield(handle), HANG_GUARD) == 0.5
        await ticking
        assert ticks > 1  # the loop kept turning while the task ran
