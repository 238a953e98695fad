"""A ``run()`` handle is a future to asyncio: ``gather``, ``wait``, ``wait_for``, ``shield``,
task cancellation and ``run_until_complete`` treat it as one, and cancelling the asyncio
side stops the remote task too."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb.testing import wait_for

HANG_GUARD = 20.0


def inc(x: int) -> int:
    return x + 1


def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def block_until_interrupted(d: str) -> None:
    """Marks ``started``; ends only by an interrupt, which it marks ``interrupted``."""
    try:
        Path(d, "started").write_text(str(os.getpid()))
        time.sleep(600)
    except KeyboardInterrupt:
        Path(d, "interrupted").write_text(str(os.getpid()))
        raise


async def awaited(handle: orchestra.TaskHandle[int]) -> int:
    return await handle


async def test_handles_are_futures_to_gather_and_wait(apool: orchestra.Pool) -> None:
    handles = [apool.run(inc, i) for i in range(200)]
    assert all(asyncio.isfuture(h) for h in handles)
    assert await asyncio.gather(*handles) == list(range(1, 201))

    mixed = await asyncio.gather(apool.run(inc, 1), apool.run(fail, 2), return_exceptions=True)
    assert mixed[0] == 2
    assert isinstance(mixed[1], ValueError) and str(mixed[1]) == "bad 2"

    with pytest.raises(ValueError, match="bad 3"):
        await asyncio.gather(apool.run(inc, 1), apool.run(fail, 3))

    quick = apool.run(inc, 5)
    done, pending = await asyncio.wait([quick], timeout=HANG_GUARD)
    assert done == {quick} and not pending
    assert quick.result() == 6


async def test_a_handle_awaited_twice_and_shielded(apool: orchestra.Pool) -> None:
    h = apool.run(inc, 9)
    first, second = await asyncio.gather(awaited(h), awaited(h))
    assert first == second == 10
    assert await asyncio.shield(apool.run(inc, 1)) == 2


@pytest.mark.local_only("interrupts a running task")
async def test_wait_for_timeout_cancels_the_remote_task(apool: orchestra.Pool, tmp_path: Path) -> None:
    h = apool.run(block_until_interrupted, str(tmp_path))
    # Running first: under load, a timeout before the task started would cancel it unrun.
    await asyncio.to_thread(wait_for, (tmp_path / "started").exists, HANG_GUARD)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(h, timeout=0.5)
    wait_for(
        lambda: (tmp_path / "interrupted").exists(), timeout=HANG_GUARD, what="the remote task interrupted"
    )
    wait_for(h.done, timeout=HANG_GUARD, what="the handle settled")
    assert h.cancelled()
    assert await apool.run(inc, 1) == 2  # the pool keeps serving


@pytest.mark.local_only("interrupts a running task")
async def test_cancelling_the_awaiting_task_cancels_the_remote_task(
    apool: orchestra.Pool,
    tmp_path: Path,
) -> None:
    h = apool.run(block_until_interrupted, str(tmp_path))
    waiter = asyncio.ensure_future(awaited(h))
    await asyncio.sleep(0)
    await asyncio.to_thread(wait_for, (tmp_path / "started").exists, HANG_GUARD)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.to_thread(wait_for, (tmp_path / "interrupted").exists, HANG_GUARD)
    await asyncio.to_thread(wait_for, h.done, HANG_GUARD)
    assert h.cancelled()


def test_a_handle_in_run_until_complete_and_in_two_loops(pool: orchestra.Pool) -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(pool.run(inc, 1)) == 2
    finally:
        loop.close()
    h = pool.run(inc, 2)
    assert asyncio.run(awaited(h)) == 3
    assert asyncio.run(awaited(h)) == 3  # finished, awaited again from a new loop
