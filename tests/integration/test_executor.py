"""``orchestra.Executor``: the standard library's Executor contract, one test per promise,
on real worker processes.

Blocking tasks wait for a release file that the test creates (or for an interrupt), so the
order of events is set by the test, never by timing; ``HANG_GUARD`` only bounds a hang.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import contextlib
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

import orchestra_nb as orchestra
from orchestra_nb import PoolState, RemoteTraceback, SerializationError, WorkerCrashedError
from orchestra_nb.executor import BrokenWorkerError, Executor
from orchestra_nb.testing import wait_for

pytestmark = pytest.mark.local_only("worker crashes and process-pool semantics")

HANG_GUARD = 30.0
CALLBACK_THREAD = "orchestra-executor-callbacks"


def mark(d: str, name: str, text: str = "") -> None:
    tmp = Path(d, f".tmp-{name}")
    tmp.write_text(text)
    os.replace(tmp, Path(d, name))


def wait_release(d: str, value: object = None) -> object:
    """Block until ``d/release`` exists (or an interrupt); ``started`` marks the start."""
    try:
        mark(d, f"started-{os.getpid()}-{value}", str(os.getpid()))
        deadline = time.monotonic() + 120
        while not Path(d, "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.005)
        return value
    except KeyboardInterrupt:
        mark(d, f"interrupted-{value}")
        raise


def record_run(d: str, name: str) -> str:
    mark(d, f"ran-{name}")
    return name


def keywords(**kwargs: object) -> dict[str, object]:
    return kwargs


def divide(a: float, b: float) -> float:
    return a / b


def die(code: int) -> None:
    os._exit(code)


def getpid() -> int:
    return os.getpid()


@pytest.fixture
def executor(pool: orchestra.Pool, tmp_path: Path) -> Iterator[Executor]:
    ex = Executor(pool=pool)
    try:
        yield ex
    finally:
        release(tmp_path)  # whatever a failed test left blocked
        ex.shutdown(wait=True, cancel_futures=True)


def release(d: Path) -> None:
    (d / "release").touch()


def started(d: Path, value: object) -> bool:
    """The task's body has begun (``running()`` is true from when it is sent to a worker)."""
    return any(d.glob(f"started-*-{value}"))


def callback_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == CALLBACK_THREAD]


# --- the type contract ---------------------------------------------------------------------


def test_is_an_executor_returning_stdlib_futures(executor: Executor) -> None:
    assert isinstance(executor, concurrent.futures.Executor)
    future = executor.submit(pow, 2, 10)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(HANG_GUARD) == 1024
    assert future.done() and not future.cancelled() and not future.running()
    assert future.exception() is None


def test_fn_is_positional_only_in_submit(executor: Executor) -> None:
    assert executor.submit(keywords, fn=1, self=2).result(HANG_GUARD) == {"fn": 1, "self": 2}


def test_runs_functions_defined_at_run_time(executor: Executor) -> None:
    offset = 10
    assert executor.submit(lambda x: x + offset, 5).result(HANG_GUARD) == 15


# --- map ----------------------------------------------------------------------------------


def test_map_yields_results_in_order(executor: Executor) -> None:
    assert list(executor.map(divide, range(50), range(1, 51))) == [a / (a + 1) for a in range(50)]
    assert list(executor.map(abs, range(-20, 0), chunksize=7)) == list(range(20, 0, -1))
    assert list(executor.map(abs, [])) == []


def test_map_raises_a_tasks_error_at_its_place(executor: Executor) -> None:
    results = executor.map(divide, [1, 2, 3], [1, 0, 1])
    assert next(results) == 1.0
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_map_timeout_counts_from_the_call_and_raises_from_the_iterator(
    executor: Executor, tmp_path: Path
) -> None:
    called = time.monotonic()
    results = executor.map(wait_release, [str(tmp_path)] * 2, ["quick", "blocked"], timeout=0.5)
    # map() itself returns at once: the timeout is the iterator's business.
    wait_for(lambda: time.monotonic() > called + 0.5, timeout=HANG_GUARD)
    with pytest.raises(TimeoutError):
        next(results)  # the deadline, set at the call, has passed already
    release(tmp_path)


def test_map_validates_chunksize(executor: Executor) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            executor.map(abs, [1], chunksize=bad)
    with pytest.raises(TypeError, match="chunksize"):
        executor.map(abs, [1], chunksize="2")  # type: ignore[arg-type]


def test_leaving_map_early_cancels_the_tasks_not_started(pool: orchestra.Pool, tmp_path: Path) -> None:
    ex = Executor(pool=pool)
    d = str(tmp_path)
    blockers = [ex.submit(wait_release, d, i) for i in range(pool.workers)]
    wait_for(lambda: all(f.running() for f in blockers), timeout=HANG_GUARD)
    results = ex.map(record_run, [d] * 5, [f"m{i}" for i in range(5)])
    results.close()  # never iterated: the generator's exit cancels them all
    release(tmp_path)
    assert [f.result(HANG_GUARD) for f in blockers] == list(range(pool.workers))
    ex.shutdown(wait=True)
    assert not list(tmp_path.glob("ran-*"))


# --- lifecycle ------------------------------------------------------------------------------


def test_max_workers_is_validated_like_the_stdlib() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(max_workers=bad)
    with pytest.raises(TypeError, match="max_workers"):
        Executor(max_workers="2")  # type: ignore[arg-type]


def test_pool_and_pool_options_exclude_each_other(pool: orchestra.Pool) -> None:
    with pytest.raises(TypeError, match="pool"):
        Executor(2, pool=pool)
    with pytest.raises(TypeError, match="pool"):
        Executor(pool=pool, memory_limit="1GB")
    with pytest.raises(TypeError, match=r"orchestra_nb\.Pool"):
        Executor(pool=object())  # type: ignore[arg-type]


def test_max_workers_makes_a_pool_of_its_own_closed_at_shutdown() -> None:
    ex = Executor(max_workers=1)
    own = ex.pool
    assert own.workers == 1
    assert ex.submit(getpid).result(HANG_GUARD) in own.worker_pids()
    ex.shutdown(wait=True)
    assert own.state == PoolState.CLOSED


def test_default_shares_the_default_pool_and_leaves_it_open() -> None:
    ex = Executor()
    assert ex.pool is orchestra.default_pool()
    assert ex.submit(getpid).result(HANG_GUARD) in orchestra.default_pool().worker_pids()
    ex.shutdown(wait=True)
    assert orchestra.default_pool().state == PoolState.RUNNING


def test_submit_after_shutdown_raises_runtime_error(executor: Executor) -> None:
    executor.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.submit(abs, -1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(abs, [1])


def test_submit_to_a_closed_pool_raises_runtime_error() -> None:
    pool = orchestra.Pool(workers=1)
    ex = Executor(pool=pool)
    pool.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures"):
        ex.submit(abs, -1)


def test_with_block_waits_for_the_work(pool: orchestra.Pool) -> None:
    with Executor(pool=pool) as ex:
        futures = [ex.submit(divide, i, 2) for i in range(20)]
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i / 2 for i in range(20)]
    assert not callback_threads()  # shutdown(wait=True) joined it


def test_shutdown_cancel_futures_cancels_only_pending_ones(pool: orchestra.Pool, tmp_path: Path) -> None:
    ex = Executor(pool=pool)
    d = str(tmp_path)
    running = [ex.submit(wait_release, d, i) for i in range(pool.workers)]
    wait_for(lambda: all(f.running() for f in running), timeout=HANG_GUARD)
    pending = [ex.submit(record_run, d, f"p{i}") for i in range(5)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in pending)
    assert not any(f.done() for f in running)
    release(tmp_path)
    ex.shutdown(wait=True)
    assert [f.result() for f in running] == list(range(pool.workers))
    assert not list(tmp_path.glob("ran-*")), "a cancelled future's task ran"


def test_shutdown_without_wait_returns_while_work_finishes(pool: orchestra.Pool, tmp_path: Path) -> None:
    ex = Executor(pool=pool)
    future = ex.submit(wait_release, str(tmp_path), "x")
    ex.shutdown(wait=False)
    assert not future.done()
    release(tmp_path)
    assert future.result(HANG_GUARD) == "x"
    ex.shutdown(wait=True)


def in_function(thread: threading.Thread, name: str) -> bool:
    """``thread`` is now inside a function called ``name`` (somewhere up its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


def test_pool_shutdown_waits_for_the_callbacks_of_an_executor_never_shut_down(
    make_pool: Any, tmp_path: Path
) -> None:
    """The executor is dropped without shutdown: its pool's shutdown() returns only once
    that pool's futures have run their callbacks and the callback thread has ended."""
    p = make_pool()
    ex = Executor(pool=p)
    in_callback, gate, callback_done = threading.Event(), threading.Event(), threading.Event()

    def slow_callback(_: concurrent.futures.Future[object]) -> None:
        in_callback.set()
        gate.wait(HANG_GUARD)
        callback_done.set()

    future = ex.submit(wait_release, str(tmp_path), "x")
    future.add_done_callback(slow_callback)  # (before the task can end: not run here)
    del ex, future
    release(tmp_path)
    assert in_callback.wait(HANG_GUARD)
    closer = threading.Thread(target=p.shutdown, name="closer")
    closer.start()
    # The callback goes on once shutdown() waits for it, or once shutdown() returned.
    wait_for(lambda: not closer.is_alive() or in_function(closer, "_settle_all_of"), timeout=HANG_GUARD)
    returned_first = not closer.is_alive()
    gate.set()
    closer.join(HANG_GUARD)
    assert not returned_first, "pool.shutdown() returned while a callback of its work was running"
    assert callback_done.is_set()
    assert not callback_threads()


# --- cancel ---------------------------------------------------------------------------------


def test_cancel_stops_pending_work_and_leaves_running_work(executor: Executor, tmp_path: Path) -> None:
    d = str(tmp_path)
    running = [executor.submit(wait_release, d, i) for i in range(2)]
    wait_for(lambda: all(f.running() for f in running), timeout=HANG_GUARD)
    pending = executor.submit(record_run, d, "pending")
    assert not pending.running()
    assert pending.cancel() is True
    assert pending.cancelled() and pending.done()
    with pytest.raises(concurrent.futures.CancelledError):
        pending.result()
    assert running[0].cancel() is False  # running: the stdlib leaves it alone, so do we
    release(tmp_path)
    assert [f.result(HANG_GUARD) for f in running] == [0, 1]
    assert running[0].cancel() is False  # finished
    executor.shutdown(wait=True)
    assert not Path(d, "ran-pending").exists()


def test_interrupt_stops_running_work_and_the_pool_stays_warm(
    pool: orchestra.Pool, executor: Executor, tmp_path: Path
) -> None:
    pids = sorted(pool.worker_pids())
    future = executor.submit(wait_release, str(tmp_path), "run")
    wait_for(lambda: started(tmp_path, "run"), timeout=HANG_GUARD)
    executor.interrupt([future])
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(HANG_GUARD)
    wait_for(lambda: Path(tmp_path, "interrupted-run").exists(), timeout=HANG_GUARD)
    assert executor.submit(abs, -3).result(HANG_GUARD) == 3
    assert sorted(pool.worker_pids()) == pids


def test_keyboard_interrupt_while_waiting_stops_the_task(executor: Executor, tmp_path: Path) -> None:
    future = executor.submit(wait_release, str(tmp_path), "kbd")
    wait_for(lambda: started(tmp_path, "kbd"), timeout=HANG_GUARD)
    main = threading.main_thread()
    assert main is threading.current_thread()

    def interrupt_once_blocked() -> None:
        # The notebook's "interrupt kernel": SIGINT to the thread blocked in result() (once
        # it is: a SIGINT that arrives before would not be the one this test is about).
        wait_for(lambda: in_function(main, "result") and in_function(main, "wait"), timeout=HANG_GUARD)
        signal.pthread_kill(main.ident or 0, signal.SIGINT)

    sender = threading.Thread(target=interrupt_once_blocked, name="interrupter")
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            future.result(HANG_GUARD)
    finally:
        sender.join()
    assert future.cancelled()
    wait_for(lambda: Path(tmp_path, "interrupted-kbd").exists(), timeout=HANG_GUARD)


@pytest.mark.parametrize("waiter", ["executor future", "pool handle"])
def test_an_interrupt_due_before_the_wait_blocks_is_not_held_back(
    pool: orchestra.Pool, executor: Executor, tmp_path: Path, waiter: str
) -> None:
    # A SIGINT that lands after the interpreter's last check but before the main thread
    # blocks (between the GIL's release and sem_timedwait: just when the thread woken by that
    # release sends it) wakes nothing; _thread.interrupt_main() makes exactly that state on
    # purpose: SIGINT's handler due, no signal to break the blocked call. The wait must
    # still raise long before its timeout, not when it ends.
    if waiter == "executor future":
        wait = executor.submit(wait_release, str(tmp_path), "due").result
    else:
        wait = pool.run(wait_release, str(tmp_path), "due").result
    wait_for(lambda: started(tmp_path, "due"), timeout=HANG_GUARD)
    main = threading.main_thread()
    left_the_wait = threading.Event()

    def interrupt_once_blocked() -> None:
        wait_for(lambda: in_function(main, "result") and in_function(main, "wait"), timeout=HANG_GUARD)
        _thread.interrupt_main()
        with contextlib.suppress(TimeoutError):  # a generous hang guard, not a latency check
            wait_for(lambda: not in_function(main, "result"), timeout=HANG_GUARD)
            left_the_wait.set()

    sender = threading.Thread(target=interrupt_once_blocked, name="interrupter")
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            wait(HANG_GUARD * 1.5)  # longer than the sender's guard
    finally:
        sender.join()
    assert left_the_wait.is_set(), "the due interrupt was raised only when the wait timed out"
    wait_for(lambda: Path(tmp_path, "interrupted-due").exists(), timeout=HANG_GUARD)


# --- errors and crashes ---------------------------------------------------------------------


def test_exceptions_keep_their_type_and_remote_traceback(executor: Executor) -> None:
    future = executor.submit(divide, 1, 0)
    with pytest.raises(ZeroDivisionError) as info:
        future.result(HANG_GUARD)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "divide" in str(info.value.__cause__)
    assert isinstance(future.exception(), ZeroDivisionError)


def test_unpicklable_argument_raises_from_submit(executor: Executor) -> None:
    with pytest.raises(SerializationError, match="argument 0"):
        executor.submit(id, threading.Lock())


@pytest.mark.pool_options(max_worker_crashes=0)
def test_a_crash_fails_only_its_future_with_a_broken_executor_error(
    pool: orchestra.Pool, executor: Executor
) -> None:
    bad = executor.submit(die, 3)
    with pytest.raises(concurrent.futures.BrokenExecutor) as info:
        bad.result(HANG_GUARD)
    error = info.value
    assert isinstance(error, BrokenWorkerError)
    assert isinstance(error, BrokenProcessPool)
    assert isinstance(error, WorkerCrashedError)
    assert isinstance(error.__cause__, WorkerCrashedError)
    assert "exit code 3" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is BrokenWorkerError and again.returncode == 3
    # ... and the executor keeps serving, on a replacement worker.
    assert list(executor.map(abs, range(-5, 0))) == [5, 4, 3, 2, 1]
    wait_for(lambda: len(pool.worker_pids()) == pool.workers, timeout=HANG_GUARD)


# --- callbacks, wait, as_completed -----------------------------------------------------------


def test_callbacks_never_run_on_the_io_thread(executor: Executor, tmp_path: Path) -> None:
    seen: list[tuple[str, object]] = []
    called = threading.Event()

    def callback(f: concurrent.futures.Future[object]) -> None:
        seen.append((threading.current_thread().name, f.result()))
        called.set()

    future = executor.submit(wait_release, str(tmp_path), "cb")
    future.add_done_callback(callback)
    release(tmp_path)
    assert called.wait(HANG_GUARD)
    assert seen == [(CALLBACK_THREAD, "cb")]
    assert seen[0][0] != "orchestra-io"


def test_a_callback_added_after_completion_runs_at_once(executor: Executor) -> None:
    future = executor.submit(abs, -4)
    assert future.result(HANG_GUARD) == 4
    seen: list[str] = []
    future.add_done_callback(lambda f: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]


def test_a_failing_callback_does_not_stop_the_others(executor: Executor, tmp_path: Path) -> None:
    later = threading.Event()

    def broken(_: object) -> None:
        raise RuntimeError("callback bug (expected in this test)")

    future = executor.submit(wait_release, str(tmp_path), 1)
    future.add_done_callback(broken)
    future.add_done_callback(lambda _: later.set())
    release(tmp_path)
    assert later.wait(HANG_GUARD)
    assert executor.submit(abs, -1).result(HANG_GUARD) == 1


def test_a_callback_may_wait_for_another_future(executor: Executor, tmp_path: Path) -> None:
    """The callback thread settles futures; one of its callbacks blocking in result() on a
    future it has not settled yet must not deadlock."""
    outcome: list[object] = []
    done = threading.Event()
    slow = executor.submit(wait_release, str(tmp_path), "slow")
    first = executor.submit(abs, -1)

    def callback(_: object) -> None:
        outcome.append(slow.result(HANG_GUARD))
        done.set()

    first.add_done_callback(callback)
    first.result(HANG_GUARD)
    release(tmp_path)
    assert done.wait(HANG_GUARD)
    assert outcome == ["slow"]


def test_a_thousand_futures_through_as_completed(executor: Executor) -> None:
    futures = {executor.submit(divide, i, 1): i for i in range(1000)}
    seen = [futures[f] for f in concurrent.futures.as_completed(futures, timeout=120)]
    assert sorted(seen) == list(range(1000))
    assert all(f.result() == futures[f] for f in futures)


def test_wait_first_completed_and_all_completed(executor: Executor, tmp_path: Path) -> None:
    slow = executor.submit(wait_release, str(tmp_path), "slow")
    fast = executor.submit(abs, -1)
    done, not_done = concurrent.futures.wait(
        [slow, fast], timeout=HANG_GUARD, return_when=concurrent.futures.FIRST_COMPLETED
    )
    assert done == {fast} and not_done == {slow}
    failing = executor.submit(divide, 1, 0)
    done, not_done = concurrent.futures.wait(
        [slow, failing], timeout=HANG_GUARD, return_when=concurrent.futures.FIRST_EXCEPTION
    )
    assert done == {failing}
    release(tmp_path)
    done, not_done = concurrent.futures.wait([slow, fast, failing], timeout=HANG_GUARD)
    assert not not_done and slow.result() == "slow"


def test_wait_and_as_completed_see_cancelled_futures(executor: Executor, tmp_path: Path) -> None:
    d = str(tmp_path)
    running = [executor.submit(wait_release, d, i) for i in range(2)]
    wait_for(lambda: all(f.running() for f in running), timeout=HANG_GUARD)
    pending = executor.submit(record_run, d, "never")
    assert pending.cancel()
    done, _ = concurrent.futures.wait([pending, *running], timeout=HANG_GUARD,
                                      return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {pending}
    assert next(concurrent.futures.as_completed([pending], timeout=HANG_GUARD)) is pending
    release(tmp_path)


# --- asyncio --------------------------------------------------------------------------------


async def test_run_in_executor_in_a_coroutine() -> None:
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(Executor(), divide, 6, 3) == 2.0
    results = await asyncio.gather(*[loop.run_in_executor(Executor(), abs, -i) for i in range(10)])
    assert results == list(range(10))
    # An executor dropped without shutdown leaves no thread behind: its callback thread
    # ends with its last future.
    wait_for(lambda: not callback_threads(), timeout=HANG_GUARD)


async def test_cancelling_an_awaited_run_in_executor_cancels_pending_work(
    pool: orchestra.Pool, tmp_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    ex = Executor(pool=pool)
    d = str(tmp_path)
    blockers = [ex.submit(wait_release, d, i) for i in range(pool.workers)]
    await asyncio.to_thread(wait_for, lambda: all(f.running() for f in blockers), HANG_GUARD)
    waiting = loop.run_in_executor(ex, record_run, d, "awaited")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release(tmp_path)
    await asyncio.to_thread(ex.shutdown, True)
    assert not await asyncio.to_thread(Path(d, "ran-awaited").exists)
