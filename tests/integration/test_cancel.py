"""Cancellation: running tasks interrupted, nothing started after, the pool warm.

Every task writes marker files in a per-test directory: ``started-<i>`` when it begins,
``interrupted-<i>`` when it sees the KeyboardInterrupt. Blocking tasks wait on a file that is
never created, so only an interrupt (or a kill) can end them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import TaskState, WorkerExited
from orchestra_nb.testing import wait_for

HANG_GUARD = 30.0


def mark(d: str, name: str, text: str = "") -> None:
    """Create ``d/name`` atomically: a test that sees it exist sees its content too."""
    tmp = Path(d, f".tmp-{name}")
    tmp.write_text(text)
    os.replace(tmp, Path(d, name))


def blocking(i: int, d: str, block_below: int = 2) -> int:
    """Items below ``block_below`` block until interrupted; the others return at once."""
    try:  # the marker is written inside the try: an interrupt may come right after it
        mark(d, f"started-{i}", str(os.getpid()))
        if i < block_below:
            time.sleep(600)  # ends only by an interrupt
        return i
    except KeyboardInterrupt:
        mark(d, f"interrupted-{i}", str(os.getpid()))
        raise


def stubborn(d: str) -> None:
    """Swallows every interrupt: only a kill ends it."""
    started = False
    while True:
        try:
            if not started:
                mark(d, "started", str(os.getpid()))
                started = True
            time.sleep(600)
        except KeyboardInterrupt:
            mark(d, "ignored")


def getpid(_: object = None) -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def wait_until(cond, timeout: float = HANG_GUARD, what: str = "condition") -> None:
    wait_for(cond, timeout, what=what)


def markers(d: Path, prefix: str) -> set[int]:
    """Indices whose marker is written (a file still empty is being written)."""
    return {int(p.name.split("-")[1]) for p in d.glob(f"{prefix}-*") if p.stat().st_size}


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_cancel_running_map(pool: orchestra.Pool, tmp_path: Path) -> None:
    pids = sorted(pool.worker_pids())
    exits: list[WorkerExited] = []
    sub = pool.subscribe(exits.append, types=(WorkerExited,))
    try:
        n = 20
        h = pool.map(blocking, range(n), [str(tmp_path)] * n, chunksize=1)
        wait_until(lambda: markers(tmp_path, "started") == {0, 1}, what="both workers busy")
        assert h.cancel() is True
        assert h.wait_finished(HANG_GUARD)
        # the running tasks were interrupted inside (KeyboardInterrupt), on their workers
        assert markers(tmp_path, "interrupted") == {0, 1}
        assert {int((tmp_path / f"interrupted-{i}").read_text()) for i in (0, 1)} == set(pids)
        assert h.cancelled() and h.done()
        with pytest.raises(concurrent.futures.CancelledError):
            h.result(HANG_GUARD)
        assert h.counts()[TaskState.CANCELLED] == n
        assert h.total == n
        # nothing started after the cancel; the next job drains the workers' queues first
        again = pool.map(getpid, range(40))
        assert set(again.result(HANG_GUARD)) <= set(pids)
        assert markers(tmp_path, "started") == {0, 1}
        # the pool is warm: the same worker processes, none exited
        assert sorted(pool.worker_pids()) == pids
        assert sorted(pool.run_on_all(getpid).result(HANG_GUARD)) == pids
        assert exits == []
        assert h.cancel() is False  # already finished
    finally:
        sub.close()


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_cancel_job_by_id(pool: orchestra.Pool, tmp_path: Path) -> None:
    """Pool.cancel_job(job_id) does what the handle's cancel() does, for a job known by id."""
    n = 10
    h = pool.map(blocking, range(n), [str(tmp_path)] * n, chunksize=1)
    wait_until(lambda: markers(tmp_path, "started") == {0, 1}, what="both workers busy")
    assert h.job_id in {job.id for job in pool.statistics().jobs}
    assert pool.cancel_job(h.job_id) is True
    assert h.wait_finished(HANG_GUARD)
    assert markers(tmp_path, "interrupted") == {0, 1}
    assert h.cancelled()
    assert h.counts()[TaskState.CANCELLED] == n
    assert pool.cancel_job(h.job_id) is False  # finished: nothing to cancel
    assert pool.cancel_job(10**9) is False  # never existed
    with pytest.raises(TypeError, match="job_id"):
        pool.cancel_job("1")  # type: ignore[arg-type]


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_cancel_generator_map(pool: orchestra.Pool, tmp_path: Path) -> None:
    pulled = []

    def items():
        for i in range(1_000_000):
            pulled.append(i)
            yield i

    d = str(tmp_path)
    h = pool.map(blocking, items(), iter(lambda: d, None), chunksize=1)
    wait_until(lambda: markers(tmp_path, "started") == {0, 1})
    h.cancel()
    assert h.wait_finished(HANG_GUARD)
    assert h.cancelled()
    assert len(pulled) < 100  # the rest of the input is never read
    assert h.total == sum(h.counts().values())  # every task read is accounted for
    c = h.counts()
    assert c[TaskState.CANCELLED] == h.total and c[TaskState.RUNNING] == 0
    assert markers(tmp_path, "interrupted") == {0, 1}


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_cancel_run(pool: orchestra.Pool, tmp_path: Path) -> None:
    pids = sorted(pool.worker_pids())
    h = pool.run(blocking, 0, str(tmp_path))
    wait_until(lambda: (tmp_path / "started-0").exists())
    assert h.state == TaskState.RUNNING
    h.cancel()
    assert h.wait_finished(HANG_GUARD)
    assert (tmp_path / "interrupted-0").exists()
    assert h.state == TaskState.CANCELLED and h.cancelled()
    assert sorted(pool.worker_pids()) == pids


def test_stubborn_task_is_killed_and_replaced(tmp_path: Path) -> None:
    with orchestra.Pool(workers=1, cancel_grace=0.3) as pool:
        pool.wait_started(HANG_GUARD)
        (old,) = pool.worker_pids()
        exits: list[WorkerExited] = []
        sub = pool.subscribe(exits.append, types=(WorkerExited,))
        h = pool.run(stubborn, str(tmp_path))
        wait_until(lambda: (tmp_path / "started").exists() and (tmp_path / "started").stat().st_size)
        assert int((tmp_path / "started").read_text()) == old
        h.cancel()
        assert h.wait_finished(HANG_GUARD)
        assert h.cancelled()
        assert (tmp_path / "ignored").exists()  # it did get the interrupt, and ignored it
        wait_until(lambda: len(pool.worker_pids()) == 1 and pool.worker_pids() != [old],
                   what="a replacement worker")
        pool.wait_started(HANG_GUARD)
        (new,) = pool.worker_pids()
        assert new != old
        assert pool.run(getpid).result(HANG_GUARD) == new
        wait_until(lambda: len(exits) == 1, what="the WorkerExited event")
        assert exits[0].pid == old and "ignored the interrupt" in exits[0].reason
        sub.close()


def test_cancel_kill_true(tmp_path: Path) -> None:
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(HANG_GUARD)
        (old,) = pool.worker_pids()
        h = pool.run(stubborn, str(tmp_path))
        wait_until(lambda: (tmp_path / "started").exists())
        h.cancel(kill=True)
        assert h.wait_finished(HANG_GUARD) and h.cancelled()
        pool.wait_started(HANG_GUARD)
        assert pool.run(getpid).result(HANG_GUARD) not in (old, None)


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
async def test_cancelling_the_await_cancels_remote_work(apool: orchestra.Pool, tmp_path: Path) -> None:
    pids = sorted(apool.worker_pids())
    h = apool.map(blocking, range(10), [str(tmp_path)] * 10, chunksize=1)
    waiter = asyncio.ensure_future(_await(h))
    deadline = time.monotonic() + HANG_GUARD
    while markers(tmp_path, "started") != {0, 1}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.get_running_loop().run_in_executor(None, h.wait_finished, HANG_GUARD)
    assert h.cancelled()
    assert markers(tmp_path, "interrupted") == {0, 1}
    assert markers(tmp_path, "started") == {0, 1}
    assert h.counts()[TaskState.CANCELLED] == 10
    assert sorted(apool.worker_pids()) == pids


async def _await(h: object) -> object:
    return await h  # type: ignore[misc]


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
async def test_cancelling_async_for_cancels_remote_work(apool: orchestra.Pool, tmp_path: Path) -> None:
    h = apool.map(blocking, range(10), [str(tmp_path)] * 10, [1] * 10, chunksize=1)

    async def consume() -> list[int]:
        return [x async for x in h]

    task = asyncio.ensure_future(consume())
    deadline = time.monotonic() + HANG_GUARD
    while not (tmp_path / "started-0").exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.get_running_loop().run_in_executor(None, h.wait_finished, HANG_GUARD)
    assert h.cancelled()
    assert (tmp_path / "interrupted-0").exists()


def held(i: int, d: str) -> int:
    """Item 0 waits for ``d/release``; an interrupt would leave a marker."""
    try:
        mark(d, f"started-{i}")
        if i == 0:
            deadline = time.monotonic() + 60
            while not os.path.exists(os.path.join(d, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError("never released")
                time.sleep(0.005)
        return i
    except KeyboardInterrupt:
        Path(d, f"interrupted-{i}").touch()
        raise


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_cancel_leaves_other_job_alone(pool: orchestra.Pool, tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    pids = sorted(pool.worker_pids())
    a = pool.run(blocking, 0, str(a_dir))
    wait_until(lambda: (a_dir / "started-0").exists(), what="job A running")
    # job B, on the same pool at the same time: item 0 held (on the other worker)
    b = pool.map(held, range(30), [str(b_dir)] * 30, chunksize=1)
    wait_until(lambda: (b_dir / "started-0").exists(), what="job B running")
    a.cancel()
    assert a.wait_finished(HANG_GUARD) and a.cancelled()
    assert (a_dir / "interrupted-0").exists()
    assert not b.done()
    assert b.counts()[TaskState.CANCELLED] == 0 and b.counts()[TaskState.FAILED] == 0
    (b_dir / "release").touch()
    assert b.result(HANG_GUARD) == list(range(30))
    assert not b.cancelled()
    assert b.counts()[TaskState.SUCCEEDED] == 30
    assert not list(b_dir.glob("interrupted-*"))
    assert sorted(pool.worker_pids()) == pids
    assert pool.map(square, range(10)).result(HANG_GUARD) == [x * x for x in range(10)]


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_calls_cancelled_before_they_are_sent_never_run(pool: orchestra.Pool, tmp_path: Path) -> None:
    """Calls of one burst share a job (a call batch); cancelling some before any worker is
    free must keep them from running at all, and leave the others to run."""
    d = str(tmp_path)
    busy = pool.map(blocking, range(2), [d] * 2, chunksize=1)
    wait_until(lambda: markers(tmp_path, "started") == {0, 1}, what="both workers busy")
    calls = [pool.run(blocking, i, d) for i in range(10, 50)]
    for handle in calls[::2]:
        assert handle.cancel() is True
    busy.cancel()  # frees the workers: the batch is sent now
    assert [h.result(HANG_GUARD) for h in calls[1::2]] == list(range(11, 50, 2))
    for handle in calls[::2]:
        with pytest.raises(concurrent.futures.CancelledError):
            handle.result(HANG_GUARD)
    assert markers(tmp_path, "started") == {0, 1, *range(11, 50, 2)}
