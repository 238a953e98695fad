"""The centre: one task state machine whose events are a journal, input read off the I/O
thread, and threads that end with the last pool. Every test here failed on the code before
the redesign (a hang, a stall of the whole pool, a leaked thread, counts that disagreed)."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import JobFinished, JobProgress, TaskState, TaskStateChanged, WorkerCrashedError
from orchestra_nb._events import replay_counts
from orchestra_nb._jobs import MAX_CHUNK, STREAM_WINDOW
from orchestra_nb._state import LEGAL

HANG_GUARD = 30.0


def square(x: int) -> int:
    return x * x


def times_ten(x: int) -> int:
    return x * 10


def _wait_file(path: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def first_then_gated(i: int, d: str) -> int:
    """Item 0 returns at once; the others wait for ``d/release``."""
    if i:
        _wait_file(os.path.join(d, "release"))
    return i


def record_and_scale(x: int, d: str) -> int:
    Path(d, f"got-{x}").touch()
    return x * 10


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def crash_on_two(x: int) -> int:
    if x == 2:
        os._exit(3)
    return x


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def package_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("orchestra")]


# --- input read off the I/O thread ----------------------------------------------------------


@pytest.mark.local_only("f's later items must block while g runs")
def test_a_map_fed_by_a_map_streams(pool: orchestra.Pool, tmp_path: Path) -> None:
    """``g`` receives ``f``'s first result while ``f``'s other items still wait: the inner
    handle is read as a stream by a feeder, never by the I/O thread (which used to hang)."""
    d = str(tmp_path)
    # Two workers: f's item 1 holds one of them until the release, the other is free for g.
    inner = pool.map(first_then_gated, range(2), [d] * 2, chunksize=1)
    outer = pool.map(record_and_scale, inner, [d] * 10, chunksize=1)
    wait_until(lambda: (tmp_path / "got-0").exists(), "g to get f's first result")
    assert not inner.done()  # f is not finished: its item 1 waits for the release
    (tmp_path / "release").touch()
    assert outer.result(timeout=HANG_GUARD) == [0, 10]


def test_a_chained_map_gives_the_right_results(pool: orchestra.Pool) -> None:
    inner = pool.map(square, range(50))
    assert pool.map(times_ten, inner).result(timeout=HANG_GUARD) == [x * x * 10 for x in range(50)]


def test_a_blocked_generator_delays_only_its_own_job(pool: orchestra.Pool) -> None:
    """While a lazy input is stuck in ``next()`` (a slow file, a cursor), another job's
    ``run()`` completes: only the stuck input's job waits."""
    release = threading.Event()
    reading = threading.Event()

    def slow_source() -> Iterator[int]:
        yield -1
        reading.set()
        release.wait(HANG_GUARD)  # the generator's next item is "slow"
        yield -2

    stuck = pool.map(abs, slow_source())
    assert reading.wait(HANG_GUARD)
    assert pool.run(abs, -7).result(timeout=HANG_GUARD) == 7
    assert not release.is_set() and not stuck.done()  # it finished while the input was stuck
    release.set()
    assert stuck.result(timeout=HANG_GUARD) == [1, 2]


def test_a_generator_that_raises_fails_its_job_and_keeps_what_was_read(pool: orchestra.Pool) -> None:
    def broken() -> Iterator[int]:
        yield from range(3)
        raise OSError("the input broke")

    h = pool.map(square, broken())
    with pytest.raises(OSError, match="the input broke") as info:
        h.result(timeout=HANG_GUARD)
    assert any("raised by the input of job" in note for note in info.value.__notes__)
    assert h.partial_results() == [0, 1, 4]
    assert h.counts()[TaskState.SUCCEEDED] == 3
    assert h.total == 3


async def test_an_async_iterator_is_an_input(apool: orchestra.Pool) -> None:
    async def numbers():
        for i in range(20):
            await asyncio.sleep(0)
            yield i

    assert await apool.map(square, numbers()) == [i * i for i in range(20)]


def test_an_async_iterator_outside_a_loop_is_refused_by_name(pool: orchestra.Pool) -> None:
    async def numbers():
        yield 1

    gen = numbers()
    with pytest.raises(TypeError, match="async iterable"):
        pool.map(square, gen)
    asyncio.run(gen.aclose())


def test_an_endless_input_is_read_only_a_little_ahead(pool: orchestra.Pool) -> None:
    read = 0

    def endless() -> Iterator[int]:
        nonlocal read
        while True:
            read += 1
            yield read

    h = pool.map(square, endless())
    first = []
    for value in h:
        first.append(value)
        if len(first) == 10:
            break
    h.cancel()
    assert h.wait_finished(HANG_GUARD)
    assert first == [i * i for i in range(1, 11)]
    # A streamed map runs at most STREAM_WINDOW items ahead of its consumer (plus the
    # feeder's read-ahead), not the millions an unbounded reader would pull.
    assert read <= STREAM_WINDOW + 2 * MAX_CHUNK + 10


# --- threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "inline"])
def test_opening_and_closing_20_pools_leaves_no_thread(backend: str) -> None:
    assert package_threads() == [], "a thread of the package was running before the test"
    for _ in range(20):
        with orchestra.Pool(workers=1, backend=backend) as p:
            p.subscribe(lambda event: None)  # starts the bus's delivery thread
            assert p.map(abs, [-1, -2]).result(timeout=HANG_GUARD) == [1, 2]
    assert package_threads() == []


def test_a_pool_killed_or_closed_from_async_code_leaves_no_thread() -> None:
    async def main() -> None:
        async with orchestra.Pool(workers=1) as p:
            p.subscribe(lambda event: None)
            assert await p.run(abs, -3) == 3

    asyncio.run(main())
    p = orchestra.Pool(workers=1)
    p.kill()
    assert package_threads() == []


def test_a_call_after_shutdown_fails_instead_of_hanging() -> None:
    p = orchestra.Pool(workers=1)
    p.shutdown()
    with pytest.raises(orchestra.PoolClosedError):
        p.run(abs, -1).result(timeout=HANG_GUARD)
    with pytest.raises(orchestra.PoolClosedError):
        p.map(abs, [1]).result(timeout=HANG_GUARD)
    with pytest.raises(orchestra.PoolClosedError):
        p.resize(2)


# --- the journal -----------------------------------------------------------------------------


class Journal:
    """Every event of a pool, recorded from before the job starts."""

    def __init__(self, pool: orchestra.Pool) -> None:
        self.events: list[object] = []
        self.finished = threading.Event()
        self.sub = pool.subscribe(self._record, maxlen=1_000_000)

    def _record(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, JobFinished):
            self.finished.set()

    def close(self) -> None:
        self.sub.close()


def check_journal(journal: Journal, handle: object) -> None:
    """The events alone give the job's exact counts, every move is legal, and the widget's
    sources (JobProgress, JobFinished) and the handle agree with them."""
    assert journal.finished.wait(HANG_GUARD), "no JobFinished event"
    job_id = handle.job_id  # type: ignore[attr-defined]
    assert handle.wait_finished(HANG_GUARD)  # type: ignore[attr-defined]
    replayed = replay_counts(journal.events, job_id)
    mine = [e for e in journal.events if getattr(e, "job_id", None) == job_id]
    finished = [e for e in mine if isinstance(e, JobFinished)]
    progress = [e for e in mine if isinstance(e, JobProgress)]
    assert len(finished) == 1
    counts = handle.counts()  # type: ignore[attr-defined]
    assert replayed == [counts[s] for s in TaskState]
    assert list(finished[0].counts) == replayed
    assert list(progress[-1].counts) == replayed
    assert sum(replayed) == handle.total  # type: ignore[attr-defined]
    for e in mine:
        if isinstance(e, TaskStateChanged) and e.previous is not None:
            assert (e.previous, e.state) in LEGAL, e


def test_the_events_are_a_journal_of_a_successful_map(pool: orchestra.Pool) -> None:
    journal = Journal(pool)
    try:
        h = pool.map(square, range(500))
        h.result(timeout=HANG_GUARD)
        check_journal(journal, h)
        assert h.counts()[TaskState.SUCCEEDED] == 500
    finally:
        journal.close()


def test_the_events_are_a_journal_of_a_map_with_failures_and_retries(pool: orchestra.Pool) -> None:
    journal = Journal(pool)
    try:
        h = pool.map(fail_on_three, range(10), retries=1, retry_on=(ValueError,),
                     return_exceptions=True)
        h.result(timeout=HANG_GUARD)
        check_journal(journal, h)
        assert h.counts()[TaskState.FAILED] == 1
        states = [e.state for e in journal.events
                  if isinstance(e, TaskStateChanged) and e.start <= 3 < e.start + e.count]
        assert TaskState.RETRYING in states
    finally:
        journal.close()


@pytest.mark.local_only("cancels while tasks run")
def test_the_events_are_a_journal_of_a_map_cancelled_part_way(pool: orchestra.Pool, tmp_path: Path) -> None:
    journal = Journal(pool)
    try:
        d = str(tmp_path)
        h = pool.map(first_then_gated, range(400), [d] * 400, chunksize=1)
        wait_until(lambda: h.counts()[TaskState.SUCCEEDED] >= 1, "the first result")
        h.cancel()
        check_journal(journal, h)
        counts = h.counts()
        assert counts[TaskState.CANCELLED] >= 390
        assert counts[TaskState.SUCCEEDED] >= 1
        assert counts[TaskState.RUNNING] == counts[TaskState.PENDING] == 0
    finally:
        journal.close()


@pytest.mark.local_only("a worker process dies")
def test_the_events_are_a_journal_of_a_map_whose_worker_crashed(pool: orchestra.Pool) -> None:
    journal = Journal(pool)
    try:
        h = pool.map(crash_on_two, range(8), return_exceptions=True)
        out = h.result(timeout=HANG_GUARD)
        check_journal(journal, h)
        assert isinstance(out[2], WorkerCrashedError)
        assert h.counts()[TaskState.SUCCEEDED] + h.counts()[TaskState.FAILED] == 8
    finally:
        journal.close()


@pytest.mark.local_only("the test watches the job while its input is stuck")
def test_statistics_count_a_running_job_like_its_handle(pool: orchestra.Pool) -> None:
    release = threading.Event()

    def source() -> Iterator[int]:
        yield from range(5)
        release.wait(HANG_GUARD)

    h = pool.map(square, source())
    wait_until(lambda: h.counts()[TaskState.SUCCEEDED] == 5, "the five results")
    stats = pool.statistics()
    (job,) = [j for j in stats.jobs if j.id == h.job_id]
    assert job.counts == h.counts()
    assert job.done == 5 and job.total is None and not job.finished
    release.set()
    assert h.result(timeout=HANG_GUARD) == [0, 1, 4, 9, 16]


# --- item-level truth ------------------------------------------------------------------------


def test_worker_crashed_error_keeps_its_cause_through_pickling() -> None:
    exc = WorkerCrashedError(3, 1234, -9, 17, "killed by the OOM killer")
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc)
    assert again.cause == "killed by the OOM killer" and again.task_index == 17


def test_an_error_note_names_the_item_and_its_input(pool: orchestra.Pool) -> None:
    with pytest.raises(ValueError, match="three") as info:
        pool.map(fail_on_three, range(10), chunksize=5).result(timeout=HANG_GUARD)
    notes = " ".join(info.value.__notes__)
    assert "task 3 " in notes and "input 3" in notes
