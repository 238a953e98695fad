"""busy_poll: a caller waiting on one short call reads its result without going to sleep.

Each test's window is a hang guard (20 s): the result of ``inc`` always arrives within it,
so the busy poll always catches it, and the outcome is deterministic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

import orchestra_nb as orchestra

HANG_GUARD = 20.0


def inc(x: int) -> int:
    return x + 1


@pytest.fixture
def polling_pool() -> Iterator[orchestra.Pool]:
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


async def test_without_busy_poll_an_awaited_call_waits_in_the_loop() -> None:
    async with orchestra.Pool(workers=1, busy_poll=0) as pool:
        assert await pool.run(inc, 0) == 1
        handle = pool.run(inc, 1)
        steps = handle.__await__()
        assert steps.send(None) is handle  # yielded: the Task would wait on the handle
        steps.close()
        assert await asyncio.wait_for(asyncio.shield(handle), HANG_GUARD) == 2


def test_a_blocking_result_is_read_by_its_caller(polling_pool: orchestra.Pool) -> None:
    """A loop that awaited and then stopped leaves the data socket unwatched by the I/O
    thread (see test_caller_drive): a blocking ``result()`` reads its own result."""
    loop = asyncio.new_event_loop()
    try:
        async def awaited() -> int:
            return await polling_pool.run(inc, 0)

        assert loop.run_until_complete(awaited()) == 1
        handle = polling_pool.run(inc, 1)
        settled_on: list[int] = []
        handle._future.add_done_callback(lambda _: settled_on.append(threading.get_ident()))
        assert handle.result(HANG_GUARD) == 2
        assert settled_on == [threading.get_ident()]
        assert polling_pool._core.take_backs == 0  # the I/O thread never had to step in
    finally:
        loop.close()


def test_a_negative_busy_poll_is_refused_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="busy_poll must be >= 0 seconds, got -1"):
        orchestra.Pool(workers=1, busy_poll=-1)
