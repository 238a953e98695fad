"""A loop awaiting ``run()`` drives the engine itself, and nothing waits on that loop.

The awaiting loop sends the call and reads the result on its own thread (no hand-over to
the I/O thread and back). If that loop then stops turning (a long synchronous cell), the
I/O thread's hot checks send what it queued and read what it left unread.

Tests of that fallback use pools with ``busy_poll=0``: a caller that busy-polls reads its
own result before it gets stuck, which would leave the fallback untested.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb.backends import _caller
from orchestra_nb.testing import wait_for

HANG_GUARD = 20.0


def inc(x: int) -> int:
    return x + 1


async def awaited(handle: orchestra.TaskHandle[int]) -> int:
    return await handle


# Callers and workers sleep while they wait: no busy polling.
sleeping = pytest.mark.pool_options(busy_poll=0)


async def test_results_of_an_awaited_run_are_read_on_the_awaiting_thread(
    apool: orchestra.Pool,
) -> None:
    me = threading.get_ident()
    for i in range(3):  # the first attaches the loop; the next ones find it attached
        handle = apool.run(inc, i)
        settled_on: list[int] = []
        handle._future.add_done_callback(lambda _, seen=settled_on: seen.append(threading.get_ident()))
        assert await handle == i + 1
        assert settled_on == [me]


@sleeping
async def test_a_result_left_unread_by_a_stuck_loop_is_read_by_the_io_thread(
    apool: orchestra.Pool,
) -> None:
    await apool.run(inc, 0)  # warm: the function is defined on the workers
    handle = apool.run(inc, 41)
    waiter = asyncio.ensure_future(awaited(handle))
    await asyncio.sleep(0)  # the waiter attaches this loop to the data socket, and sends
    assert local_core(apool).readers.attached == 1
    # Now this loop is stuck: it cannot read the result it is waiting for.
    wait_for(handle.done, timeout=HANG_GUARD, what="the result read while the loop was stuck")
    assert handle.result() == 42
    assert await waiter == 42


async def test_a_run_from_a_stuck_loop_starts_at_once(apool: orchestra.Pool) -> None:
    await apool.run(inc, 0)  # the engine was just used here: the I/O loop is hot
    handle = apool.run(inc, 1)  # queued for this loop's next turn, which does not come...
    wait_for(handle.done, timeout=HANG_GUARD, what="the call sent and answered")  # ...meanwhile
    assert handle.result() == 2


@sleeping
async def test_the_io_thread_watches_the_socket_again_when_nothing_is_awaited(
    apool: orchestra.Pool,
) -> None:
    assert await apool.run(inc, 1) == 2
    # With nothing awaited, the loop lets go at its next waker tick (0.1 s).
    async with asyncio.timeout(HANG_GUARD):
        while local_core(apool).readers.attached:  # noqa: ASYNC110  # no event announces it
            await asyncio.sleep(0.01)
    # Results now reach a synchronous waiter through the I/O thread alone.
    handle = apool.run(inc, 2)
    wait_for(handle.done, timeout=HANG_GUARD, what="the result read by the I/O thread")
    assert handle.result() == 3


def test_a_sync_caller_and_an_async_caller_share_the_pool(pool: orchestra.Pool) -> None:
    results: list[int] = []

    def sync_side() -> None:
        results.extend(pool.run(inc, i).result(timeout=HANG_GUARD) for i in range(50))

    async def async_side() -> list[int]:
        return [await pool.run(inc, i) for i in range(50)]

    thread = threading.Thread(target=sync_side)
    thread.start()
    got = asyncio.run(async_side())
    thread.join(HANG_GUARD)
    assert got == list(range(1, 51))
    assert results == list(range(1, 51))


@sleeping
def test_the_io_thread_takes_the_socket_back_from_a_loop_that_stopped(
    pool: orchestra.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop that awaited a run() and then stopped (run_until_complete returned) never gets
    to let go of the data socket: the first result left unread through a hot tick makes the
    I/O thread watch the socket again, so later synchronous callers are not held up. A loop
    that awaits again reads its results itself, however long it waits for a CPU."""
    # The loop lets go by itself once idle for IDLE_DETACH of its own time, which under
    # load can pass before run_until_complete returns: not what this test is about.
    monkeypatch.setattr(_caller, "IDLE_DETACH", HANG_GUARD)
    assert local_core(pool).readers.poll.window == 0  # the pool_options marker took effect
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(awaited(pool.run(inc, 1))) == 2
        assert local_core(pool).readers.attached == 1  # still attached: the loop is not turning
        core = local_core(pool)

        def taken_back() -> int:
            # Read by the I/O thread's check, which takes the socket back; or, under load,
            # right after the I/O thread's own send of the call (then the next one's is left).
            assert pool.run(inc, 2).result(HANG_GUARD) == 3
            return core.readers.take_backs

        wait_for(taken_back, HANG_GUARD, what="the socket taken back")
        assert core.readers.take_backs == 1 and core.readers.io_reads
        assert [pool.run(inc, i).result(HANG_GUARD) for i in range(20)] == list(range(1, 21))
        # The loop awaits again: it reads its results itself once more.
        assert loop.run_until_complete(awaited(pool.run(inc, 3))) == 4
        assert not local_core(pool).readers.io_reads
    finally:
        loop.close()


# --- a thread that serves work of its own (the joblib backend) ------------------------------


def test_an_attached_thread_reads_its_results_itself(pool: orchestra.Pool) -> None:
    me = threading.get_ident()
    drain = pool._attach_thread()
    assert drain is not None
    try:
        assert local_core(pool).readers.attached == 1  # the I/O thread leaves the socket to it
        for i in range(3):
            handle = pool.run(inc, i)
            settled_on: list[int] = []
            handle._future.add_done_callback(lambda _, seen=settled_on: seen.append(threading.get_ident()))
            while not handle.done():
                assert drain.wait(handle.done)
            assert handle.result() == i + 1
            assert settled_on == [me]
    finally:
        drain.close()
    assert local_core(pool).readers.attached == 0
    assert pool.run(inc, 9).result(HANG_GUARD) == 10  # the I/O thread reads again


def inc_once_released(x: int, d: str) -> int:
    Path(d, "started").touch()
    deadline = time.monotonic() + 120
    while not Path(d, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    return x + 1


@sleeping
def test_a_result_left_unread_by_a_busy_attached_thread_is_read_by_the_io_thread(
    pool: orchestra.Pool, tmp_path: Path
) -> None:
    assert pool.run(inc, 0).result(HANG_GUARD) == 1  # warm
    drain = pool._attach_thread()
    assert drain is not None
    try:
        handle = pool.run(inc_once_released, 41, str(tmp_path))
        pool._flush()
        # The engine reads the socket once after each send on it (edge-triggered FD): on a
        # loaded machine that read could meet the result. So the task answers only after it.
        core = local_core(pool)
        wait_for(lambda: (tmp_path / "started").exists() and not core.wire.data_drain_due, timeout=HANG_GUARD)
        (tmp_path / "release").touch()
        # This thread is busy elsewhere: the I/O thread takes the socket back.
        wait_for(handle.done, timeout=HANG_GUARD, what="the result read while the thread was busy")
        assert handle.result() == 42 and local_core(pool).readers.take_backs >= 1
        # ... and the next wait hands the socket to the thread again.
        later = pool.run(inc, 1)
        while not later.done():
            assert drain.wait(later.done)
        assert later.result() == 2
    finally:
        drain.close()
    assert local_core(pool).readers.attached == 0
