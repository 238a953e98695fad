"""What the inline backend promises beyond the shared API tests: tasks run in the thread
that waits for them, in this process, with nothing pickled, so a debugger works in them."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback

import pytest

import orchestra_nb as orchestra
from orchestra_nb import TaskState

HANG_GUARD = 30.0


def where() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def slow_abs(x: int) -> int:
    time.sleep(0.002)
    return abs(x)


def boom(x: int) -> int:
    raise KeyError(f"boom on {x}")


@pytest.fixture
def inline() -> orchestra.Pool:
    with orchestra.Pool(backend="inline") as pool:
        yield pool


def test_a_task_runs_in_the_thread_that_waits_for_it(inline: orchestra.Pool) -> None:
    assert inline.run(where).result(timeout=HANG_GUARD) == (os.getpid(), threading.get_ident())
    assert inline.backend == "inline" and inline.capabilities.in_process


async def test_an_awaited_task_runs_on_the_awaiting_loop(inline: orchestra.Pool) -> None:
    assert await inline.run(where) == (os.getpid(), threading.get_ident())
    assert await inline.map(abs, [-1, -2, -3]) == [1, 2, 3]


def test_nothing_is_pickled(inline: orchestra.Pool) -> None:
    lock = threading.Lock()  # cannot be pickled: the local pool refuses it by name
    seen: list[int] = []
    assert inline.run(lambda held, x: held.locked() or seen.append(x), lock, 5).result(HANG_GUARD) is None
    assert seen == [5]  # the very object, mutated in place


def test_errors_keep_their_own_traceback_and_name_the_item(inline: orchestra.Pool) -> None:
    with pytest.raises(KeyError, match="boom on 2") as info:
        inline.map(boom, [2]).result(timeout=HANG_GUARD)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "boom" in frames  # the task's own frame, not a copy from another process
    assert any("task 0" in note and "input 2" in note and "inline" in note
               for note in info.value.__notes__)


def test_what_it_cannot_do_is_refused_by_name(inline: orchestra.Pool) -> None:
    with pytest.raises(ValueError, match="inline backend cannot stop a running task"):
        inline.options(timeout=1)
    with pytest.raises(ValueError, match="inline backend runs one task at a time"):
        inline.resize(2)
    with pytest.raises(ValueError, match="cannot pin"):
        inline.options(worker=1)
    with pytest.raises(TypeError, match="memory_limit"):
        orchestra.Pool(backend="inline", memory_limit="1GB")


def test_a_background_map_progresses_while_its_loop_turns(inline: orchestra.Pool) -> None:
    """Submitted from a coroutine and not awaited, a map still runs: a stepper on the loop
    runs tasks between the loop's other callbacks."""

    async def main() -> list[int]:
        h = inline.map(slow_abs, range(-50, 0))  # 0.1 s of work: several steps
        ticks = 0
        while not h.done():
            ticks += 1
            await asyncio.sleep(0)
        assert ticks > 1  # the loop kept turning while the tasks ran
        return h.result()

    assert asyncio.run(main()) == list(range(50, 0, -1))


def test_a_keyboard_interrupt_in_a_task_cancels_its_job(inline: orchestra.Pool) -> None:
    def interrupted(x: int) -> int:
        if x == 3:
            raise KeyboardInterrupt  # what "Interrupt kernel" does to a task in the kernel
        return x

    h = inline.map(interrupted, range(10))
    with pytest.raises(KeyboardInterrupt):
        h.result(timeout=HANG_GUARD)
    assert h.wait_finished(HANG_GUARD)
    counts = h.counts()
    assert counts[TaskState.SUCCEEDED] == 3 and counts[TaskState.CANCELLED] == 7
    assert inline.run(abs, -1).result(timeout=HANG_GUARD) == 1  # the pool keeps serving


def test_unknown_backends_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown backend 'threads'"):
        orchestra.Pool(backend="threads")
