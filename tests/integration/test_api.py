"""Every public call of the engine, against real worker processes and real sockets.

Tasks that must be *running* (or must finish in a given order) are gated on marker files in
a per-test directory, never on sleeps: a task creates ``started-<i>`` when it begins and
waits for ``release`` (with a hang guard) before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import JobPaused, MapHandle, PoolClosedError, TaskHandle, TaskState, TaskTimeoutError
from orchestra_nb.testing import wait_for

HANG_GUARD = 30.0


# --- tasks (module level: workers import this module to find them) ---------------------------


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def describe(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


def getpid(_: object = None) -> int:
    return os.getpid()


def fail_on(x: int, bad: int = 2) -> int:
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


def _wait_file(path: str, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def gated(i: int, d: str, gate: tuple[int, ...] = (0,)) -> int:
    """Marks itself started; items in ``gate`` wait for ``d/release`` before returning."""
    Path(d, f"started-{i}").touch()
    if i in gate:
        _wait_file(os.path.join(d, "release"))
    return i * i


def first_waits_for_second(i: int, d: str) -> int:
    """Item 0 finishes only after item 1 finished: a forced completion order."""
    if i == 0:
        _wait_file(os.path.join(d, "done-1"))
    else:
        Path(d, "done-1").touch()
    return i


def wait_forever(d: str) -> None:
    Path(d, "started").touch()
    _wait_file(os.path.join(d, "never"), timeout=600)


# --- helpers ------------------------------------------------------------------------------------


def wait_until(cond, timeout: float = HANG_GUARD, what: str = "condition") -> None:
    """Poll ``cond`` (a hang guard, not a synchronisation by time)."""
    wait_for(cond, timeout, what=what)


async def await_until(cond, timeout: float = HANG_GUARD, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def pids_gone(pids: list[int], timeout: float = 10.0) -> bool:
    import psutil

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def counts(handle: object) -> dict[str, int]:
    return {s.name: n for s, n in handle.counts().items() if n}  # type: ignore[attr-defined]


# --- the default pool -------------------------------------------------------------------------


async def test_default_pool_run_and_map() -> None:
    h = orchestra.run(add, 2, 3)
    assert isinstance(h, TaskHandle)
    assert await h == 5
    m = orchestra.map(square, range(10))
    assert isinstance(m, MapHandle)
    assert await m == [x * x for x in range(10)]
    assert orchestra.run(describe, 1, k="v").result(timeout=HANG_GUARD) == ((1,), {"k": "v"})
    # one pool, shared by every call, sized to the CPUs this process may use
    pool = orchestra.default_pool()
    assert pool is orchestra.default_pool()
    assert pool.workers == len(os.sched_getaffinity(0))
    pids = set(pool.worker_pids())
    assert set(await orchestra.map(getpid, range(20))) <= pids
    on_all = await orchestra.run_on_all(getpid)
    assert sorted(on_all) == sorted(pids)
    assert orchestra.options(timeout=20, name="named").run(add, 1, 1).result(HANG_GUARD) == 2
    st = orchestra.status()
    assert st["state"] == "running"
    assert sorted(w["pid"] for w in st["workers"]) == sorted(pids)


def test_default_pool_shutdown_and_configure() -> None:
    first = orchestra.default_pool()
    pids = first.worker_pids()
    orchestra.shutdown()
    assert first.state == "closed"
    assert pids_gone(pids)
    with pytest.raises(PoolClosedError):
        first.run(add, 1, 2).result(HANG_GUARD)
    # the next call starts a fresh default pool
    assert orchestra.run(add, 1, 2).result(HANG_GUARD) == 3
    second = orchestra.default_pool()
    assert second is not first
    try:
        orchestra.configure(workers=1)
        third = orchestra.default_pool()
        assert third is not second
        assert third.workers == 1
        assert orchestra.map(square, range(5)).result(HANG_GUARD) == [0, 1, 4, 9, 16]
    finally:
        orchestra.configure()
        orchestra.shutdown()
    assert pids_gone([*second.worker_pids(), *pids]) if second.state == "running" else True


def test_pools_lists_every_open_pool_until_it_closes() -> None:
    """orchestra.pools(): what the side panel shows (the default pool and every Pool(...)),
    oldest first, each with an id and a name; a closed pool drops out."""
    a = orchestra.Pool(1, name="sweep")
    b = orchestra.Pool(backend="inline")
    try:
        default = orchestra.default_pool()
        assert default.name == "default"
        assert [p for p in orchestra.pools() if p in (a, b, default)] == [a, b, default]
        assert a.id < b.id < default.id
        assert (a.name, b.name) == ("sweep", f"pool-{b.id}")
        assert repr(a).startswith("<orchestra_nb.Pool 'sweep' backend=local")
        a.shutdown()
        assert a not in orchestra.pools() and b in orchestra.pools()
    finally:
        a.shutdown()
        b.shutdown()
        orchestra.shutdown()
    assert not {a, b, default} & set(orchestra.pools())
    with pytest.raises(TypeError, match="a pool's name must be a string, got 3"):
        orchestra.Pool(1, name=3)  # type: ignore[arg-type]


# --- run ------------------------------------------------------------------------------------------


async def test_run_await_and_result(pool: orchestra.Pool) -> None:
    h = pool.run(add, 40, b=2)
    assert await h == 42
    assert h.result() == 42  # a finished handle answers again, at once
    assert h.done() and not h.cancelled()
    assert h.state == TaskState.SUCCEEDED
    assert h.total == 1
    assert counts(h) == {"SUCCEEDED": 1}
    assert h.exceptions() == {}
    assert pool.run(describe, 1, 2, x=3).result(timeout=HANG_GUARD) == ((1, 2), {"x": 3})


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_run_handle_states(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    h = pool.run(gated, 0, d)
    wait_until(lambda: (tmp_path / "started-0").exists(), what="the task to start")
    wait_until(lambda: h.state == TaskState.RUNNING, what="RUNNING")
    assert not h.done()
    assert counts(h) == {"RUNNING": 1}
    with pytest.raises(concurrent.futures.TimeoutError):
        h.result(timeout=0.01)
    (tmp_path / "release").touch()
    assert h.result(timeout=HANG_GUARD) == 0
    assert h.state == TaskState.SUCCEEDED and h.done()
    assert h.finished()


def test_run_error(pool: orchestra.Pool) -> None:
    h = pool.run(fail_on, 2)
    with pytest.raises(ValueError, match="bad item 2"):
        h.result(timeout=HANG_GUARD)
    assert h.done() and not h.cancelled()
    assert h.state == TaskState.FAILED
    assert set(h.exceptions()) == {0}
    assert isinstance(h.exceptions()[0], ValueError)


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
async def test_await_does_not_block_the_loop(apool: orchestra.Pool, tmp_path: Path) -> None:
    """The awaited task finishes only when another coroutine on the same loop releases it."""
    h = apool.run(gated, 0, str(tmp_path))

    async def release() -> None:
        await await_until(lambda: (tmp_path / "started-0").exists())
        (tmp_path / "release").touch()

    releaser = asyncio.ensure_future(release())
    assert await asyncio.wait_for(h, HANG_GUARD) == 0
    await releaser


@pytest.mark.local_only("timeout= stops a running task")
def test_options_run(pool: orchestra.Pool, tmp_path: Path) -> None:
    h = pool.options(timeout=20, name="custom").run(add, 1, 2)
    assert h.result(timeout=HANG_GUARD) == 3
    assert h.name == "custom"
    h = pool.options(timeout=0.3).run(wait_forever, str(tmp_path))
    with pytest.raises(TaskTimeoutError):
        h.result(timeout=HANG_GUARD)
    assert pool.options(retries=1).map(square, range(4)).result(HANG_GUARD) == [0, 1, 4, 9]
    with pytest.raises(ValueError):
        pool.options(timeout=0)


# --- map --------------------------------------------------------------------------------------------


async def test_map_ordered(apool: orchestra.Pool) -> None:
    data = list(range(200))
    h = apool.map(square, data)
    assert await h == [x * x for x in data]
    assert h.total == 200
    assert counts(h) == {"SUCCEEDED": 200}
    assert h.partial_results() == [x * x for x in data]
    assert await apool.map(square, []) == []


def test_map_star(pool: orchestra.Pool) -> None:
    assert pool.map(add, [1, 2, 3], [10, 20, 30]).result(HANG_GUARD) == [11, 22, 33]
    # like builtins.map: stops at the shortest iterable, lazy ones included
    h = pool.map(add, iter([1, 2, 3]), [10, 20])
    assert h.result(HANG_GUARD) == [11, 22]
    assert h.total == 2
    assert pool.map(describe, "ab", "cd", "ef").result(HANG_GUARD) == [
        (("a", "c", "e"), {}), (("b", "d", "f"), {})
    ]
    with pytest.raises(TypeError):
        pool.map(add)


def waits_for_release(i: int, d: str) -> int:
    """Item 0 returns once the test created ``release-0``; the others at once."""
    if i == 0:
        _wait_file(os.path.join(d, "release-0"))
    return i


@pytest.mark.local_only("two tasks must run at once")
def test_map_unordered(pool: orchestra.Pool, tmp_path: Path) -> None:
    # completion order: item 0 is released only once the pool has item 1's result (an
    # event, not a race between two workers' answers)
    d = str(tmp_path)
    h = pool.map(waits_for_release, [0, 1], [d, d], ordered=False, chunksize=1)
    wait_for(lambda: h.counts()[TaskState.SUCCEEDED] == 1, HANG_GUARD, what="item 1 done")
    Path(d, "release-0").touch()
    assert h.result(HANG_GUARD) == [1, 0]
    data = range(300)
    out = pool.map(square, data, ordered=False).result(HANG_GUARD)
    assert len(out) == 300
    assert sorted(out) == sorted(x * x for x in data)


def test_map_return_exceptions(pool: orchestra.Pool) -> None:
    out = pool.map(fail_on, range(5), return_exceptions=True).result(HANG_GUARD)
    assert out[:2] == [0, 1] and out[3:] == [3, 4]
    assert isinstance(out[2], ValueError) and "bad item 2" in str(out[2])

    h = pool.map(fail_on, range(5))
    with pytest.raises(ValueError, match="bad item 2"):
        h.result(HANG_GUARD)
    assert h.done()
    assert counts(h) == {"SUCCEEDED": 4, "FAILED": 1}
    assert list(h.exceptions()) == [2]
    partial = h.partial_results(fill="-")
    assert partial[:2] == [0, 1] and partial[3:] == [3, 4]


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_partial_results_fill_failed_and_cancelled(pool: orchestra.Pool, tmp_path: Path) -> None:
    """``fill`` stands in for every task without a value: failed and cancelled ones too,
    unless ``return_exceptions=True``, which gives their exceptions instead."""
    h = pool.map(fail_on, range(4))
    with pytest.raises(ValueError, match="bad item 2"):
        h.result(HANG_GUARD)
    assert h.partial_results(fill="-") == [0, 1, "-", 3]
    assert h.partial_results() == [0, 1, orchestra.MISSING, 3]
    assert h.partial_results(fill=None) == [0, 1, None, 3]

    h = pool.map(fail_on, range(4), return_exceptions=True)
    h.result(HANG_GUARD)
    partial = h.partial_results(fill="-")
    assert partial[:2] == [0, 1] and partial[3] == 3
    assert isinstance(partial[2], ValueError)

    for return_exceptions in (False, True):
        d = tmp_path / str(return_exceptions)
        d.mkdir()
        # Every item waits for a release that never comes: all end cancelled.
        h = pool.map(gated, range(4), [str(d)] * 4, [(0, 1, 2, 3)] * 4, chunksize=1,
                     return_exceptions=return_exceptions)
        wait_until(lambda d=d: any(d.glob("started-*")), what="a started item")
        h.cancel()
        # done() is true at once; finished() once the running items' interrupts came back.
        wait_until(h.finished, what="the cancelled map's tasks all final")
        partial = h.partial_results(fill="-")
        assert counts(h).get("SUCCEEDED", 0) == 0
        if return_exceptions:
            assert all(isinstance(p, BaseException) for p in partial), partial
        else:
            assert partial == ["-"] * 4


@pytest.mark.local_only("chunk sizes are the transport's concern")
def test_map_chunksize(pool: orchestra.Pool) -> None:
    from orchestra_nb import TaskStateChanged

    sizes: list[int] = []
    sub = pool.subscribe(
        lambda e: sizes.append(e.count) if e.state == TaskState.RUNNING else None,
        types=(TaskStateChanged,),
    )
    try:
        h = pool.map(square, range(50), chunksize=7)
        assert h.result(HANG_GUARD) == [x * x for x in range(50)]
        wait_until(lambda: sum(sizes) >= 50, what="the RUNNING events")
    finally:
        sub.close()
    assert sorted(sizes) == [1] + [7] * 7
    assert counts(h) == {"SUCCEEDED": 50}  # still accounted for item by item
    with pytest.raises(ValueError):
        pool.map(square, range(3), chunksize=0)


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_map_handle_while_running(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    h = pool.map(gated, range(4), [d] * 4, [(3,)] * 4, chunksize=1)
    wait_until(lambda: h.counts()[TaskState.SUCCEEDED] == 3, what="three results")
    assert not h.done()
    assert h.total == 4
    assert counts(h) == {"SUCCEEDED": 3, "RUNNING": 1}
    assert h.partial_results(fill="x") == [0, 1, 4, "x"]
    assert "running" in repr(h)
    (tmp_path / "release").touch()
    assert h.result(HANG_GUARD) == [0, 1, 4, 9]
    assert h.done() and h.finished()


# --- streaming ----------------------------------------------------------------------------------


def _gen(n: int):
    yield from range(n)


async def test_stream_async_for(apool: orchestra.Pool) -> None:
    got = [x async for x in apool.map(square, _gen(300))]
    assert got == [x * x for x in range(300)]
    got = [x async for x in apool.map(square, _gen(300), ordered=False)]
    assert sorted(got) == [x * x for x in range(300)]
    assert [x async for x in apool.map(square, _gen(0))] == []


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
async def test_stream_async_for_unordered_yields_as_completed(
    apool: orchestra.Pool, tmp_path: Path
) -> None:
    """Item 0 is held until the stream has produced item 1: only a stream that yields
    results as they complete (not in input order) can get past the first value."""
    d = str(tmp_path)
    got = []
    async for value in apool.map(gated, _gen(3), [d] * 3, ordered=False, chunksize=1):
        got.append(value)
        if len(got) == 1:
            (tmp_path / "release").touch()
    assert got[0] in (1, 4) and sorted(got) == [0, 1, 4]


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_stream_sync_for_unordered_yields_as_completed(pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    got = []
    for value in pool.map(gated, _gen(3), [d] * 3, ordered=False, chunksize=1):
        got.append(value)
        if len(got) == 1:
            (tmp_path / "release").touch()
    assert got[0] in (1, 4) and sorted(got) == [0, 1, 4]


def test_stream_sync_for(pool: orchestra.Pool) -> None:
    assert list(pool.map(square, _gen(300))) == [x * x for x in range(300)]
    got = list(pool.map(square, _gen(300), ordered=False))
    assert sorted(got) == [x * x for x in range(300)]


@pytest.mark.local_only("two tasks must run at once")
def test_stream_sync_for_ordered_waits_for_slow_item(pool: orchestra.Pool, tmp_path: Path) -> None:
    """Ordered streaming yields item 0 first even though item 1 completed before it."""
    d = str(tmp_path)
    it = iter(pool.map(first_waits_for_second, _gen(2), [d, d]))
    assert next(it) == 0
    assert list(it) == [1]


def test_stream_raises_task_error(pool: orchestra.Pool) -> None:
    it = iter(pool.map(fail_on, _gen(5), chunksize=1))
    assert next(it) == 0 and next(it) == 1
    with pytest.raises(ValueError, match="bad item 2"):
        next(it)
    got = list(pool.map(fail_on, _gen(5), return_exceptions=True))
    assert isinstance(got[2], ValueError) and got[:2] == [0, 1]


# --- explicit pools -----------------------------------------------------------------------------


async def test_pool_async_with() -> None:
    async with orchestra.Pool(workers=2) as p:
        await asyncio.wait_for(p.started(), HANG_GUARD)
        pids = p.worker_pids()
        assert len(pids) == 2
        assert await p.map(square, range(10)) == [x * x for x in range(10)]
        assert await p.run(add, 1, 2) == 3
    assert p.state == "closed"
    assert pids_gone(pids)
    with pytest.raises(PoolClosedError):
        await p.run(add, 1, 2)


def test_pool_with() -> None:
    with orchestra.Pool(workers=1) as p:
        p.wait_started(HANG_GUARD)
        pids = p.worker_pids()
        assert len(pids) == 1 and p.workers == 1
        assert p.map(square, range(10)).result(HANG_GUARD) == [x * x for x in range(10)]
    assert p.state == "closed"
    assert pids_gone(pids)
    with pytest.raises(PoolClosedError):
        p.map(square, range(3)).result(HANG_GUARD)
    with pytest.raises(PoolClosedError):
        p.wait_started(HANG_GUARD)


def test_pool_with_error_cancels_pending(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="inside"):  # noqa: SIM117
        with orchestra.Pool(workers=1) as p:
            h = p.run(wait_forever, str(tmp_path))
            wait_until(lambda: (tmp_path / "started").exists())
            raise RuntimeError("inside")
    assert p.state == "closed"
    assert h.done()
    if not h.cancelled():
        with pytest.raises(PoolClosedError):
            h.result(timeout=0)


def test_pool_rejects_zero_workers() -> None:
    with pytest.raises(ValueError):
        orchestra.Pool(workers=0)


def test_shutdown_finishes_work_first(tmp_path: Path) -> None:
    p = orchestra.Pool(workers=2)
    h = p.map(square, range(100))
    p.shutdown()  # graceful: the pending map completes
    assert h.result(timeout=0) == [x * x for x in range(100)]
    assert p.state == "closed"
    with pytest.raises(PoolClosedError):
        p.run(add, 1, 2).result(HANG_GUARD)


def test_shutdown_cancel_pending(tmp_path: Path) -> None:
    p = orchestra.Pool(workers=1)
    running = p.run(wait_forever, str(tmp_path))
    wait_until(lambda: (tmp_path / "started").exists())
    queued = p.map(square, range(10))
    pids = p.worker_pids()
    p.shutdown(cancel_pending=True)
    assert running.cancelled() and queued.cancelled()
    assert pids_gone(pids)


async def test_aclose(tmp_path: Path) -> None:
    p = orchestra.Pool(workers=2)
    h = p.map(square, range(50))
    await p.aclose()
    assert h.done() and await h == [x * x for x in range(50)]
    assert p.state == "closed"
    with pytest.raises(PoolClosedError):
        await p.map(square, range(3))


def test_kill(tmp_path: Path) -> None:
    p = orchestra.Pool(workers=2)
    p.wait_started(HANG_GUARD)
    pids = p.worker_pids()
    h = p.run(wait_forever, str(tmp_path))
    wait_until(lambda: (tmp_path / "started").exists())
    p.kill()
    assert pids_gone(pids, timeout=5)
    with pytest.raises(PoolClosedError):
        h.result(HANG_GUARD)
    assert p.state == "closed"
    with pytest.raises(PoolClosedError):
        p.run(add, 1, 2).result(HANG_GUARD)


async def test_started_and_wait_started() -> None:
    p = orchestra.Pool(workers=2)
    try:
        await asyncio.wait_for(p.started(), HANG_GUARD)
        st = p.status()
        assert [w["state"] for w in st["workers"]] == ["ready", "ready"]
        assert len(p.worker_pids()) == 2
        p.wait_started(timeout=HANG_GUARD)  # again: returns at once
    finally:
        await p.aclose()


@pytest.mark.local_only("the test watches a task while it runs; inline tasks run only in the thread that waits")
def test_status(pool: orchestra.Pool, tmp_path: Path) -> None:
    h = pool.run(gated, 0, str(tmp_path))
    wait_until(lambda: (tmp_path / "started-0").exists())
    st = pool.status()
    assert st["state"] == "running"
    assert st["target_workers"] == 2
    assert sorted(w["pid"] for w in st["workers"]) == sorted(pool.worker_pids())
    assert [j["id"] for j in st["jobs"]] == [h.job_id]
    assert st["jobs"][0]["counts"]["RUNNING"] == 1
    busy = [w for w in st["workers"] if w["current"] is not None]
    assert len(busy) == 1 and busy[0]["current"][0] == h.job_id
    (tmp_path / "release").touch()
    h.result(HANG_GUARD)
    assert pool.status()["jobs"] == []


def test_pause_job_by_id_and_its_events(pool: orchestra.Pool, tmp_path: Path) -> None:
    """Pool.pause_job(job_id): the handle's pause()/resume() for a job known by id; a
    JobPaused event says when it took effect, and the statistics show it."""
    d = str(tmp_path)
    seen: list[object] = []
    sub = pool.subscribe(seen.append, types=(JobPaused,))
    try:
        h = pool.map(gated, range(4), [d] * 4, chunksize=1)  # item 0 waits for d/release
        # known by id once the pool lists it (the local pool takes a job on its I/O thread)
        wait_until(lambda: h.job_id in {j.id for j in pool.statistics().jobs}, what="the job listed")
        assert pool.pause_job(h.job_id) is True
        wait_until(lambda: JobPaused(h.job_id, True) in seen, what="JobPaused(paused=True)")
        assert h.paused
        assert [j.paused for j in pool.statistics().jobs if j.id == h.job_id] == [True]
        assert [j["paused"] for j in pool.status()["jobs"] if j["id"] == h.job_id] == [True]
        assert pool.pause_job(h.job_id) is True  # paused already: no second event
        assert pool.pause_job(h.job_id, paused=False) is True
        wait_until(lambda: JobPaused(h.job_id, False) in seen, what="JobPaused(paused=False)")
        assert not h.paused
        Path(d, "release").touch()
        assert h.result(HANG_GUARD) == [0, 1, 4, 9]
    finally:
        sub.close()
    assert seen == [JobPaused(h.job_id, True), JobPaused(h.job_id, False)]
    assert pool.pause_job(h.job_id) is False  # finished: nothing to pause
    assert pool.pause_job(10**9) is False  # never existed
    with pytest.raises(TypeError, match="job_id"):
        pool.pause_job("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="paused must be True or False, got 1"):
        pool.pause_job(h.job_id, 1)  # type: ignore[arg-type]


@pytest.mark.local_only("worker processes")
def test_worker_pids_and_run_on_all(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    assert len(pids) == 2 and len(set(pids)) == 2
    assert os.getpid() not in pids
    h = pool.run_on_all(getpid)
    assert isinstance(h, MapHandle)
    assert sorted(h.result(HANG_GUARD)) == sorted(pids)
    assert pool.run_on_all(add, 1, b=2).result(HANG_GUARD) == [3, 3]


@pytest.mark.local_only("worker processes")
def test_resize(pool: orchestra.Pool) -> None:
    before = pool.worker_pids()
    pool.resize(3)
    assert pool.workers == 3
    pool.wait_started(HANG_GUARD)
    grown = pool.worker_pids()
    assert len(grown) == 3 and set(before) <= set(grown)
    assert sorted(pool.run_on_all(getpid).result(HANG_GUARD)) == sorted(grown)
    pool.resize(1)
    assert pool.workers == 1
    wait_until(lambda: len(pool.worker_pids()) == 1, what="the pool to shrink")
    (left,) = pool.worker_pids()
    assert pids_gone([p for p in grown if p != left])
    assert set(pool.map(getpid, range(20)).result(HANG_GUARD)) == {left}
    with pytest.raises(ValueError):
        pool.resize(0)


def _malloc_settings(_: object = None) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}


def test_workers_keep_freed_memory_for_the_next_task_unless_told_otherwise() -> None:
    """glibc would unmap a large array when it is freed and page-fault the next one afresh:
    workers keep up to 256 MiB of freed memory instead, and Pool(env=...) overrides it."""
    kept = str(256 * 2**20)
    with orchestra.Pool(workers=1) as p:
        assert p.run(_malloc_settings).result(HANG_GUARD) == {
            "MALLOC_MMAP_THRESHOLD_": kept, "MALLOC_TRIM_THRESHOLD_": kept}
    with orchestra.Pool(workers=1, env={"MALLOC_TRIM_THRESHOLD_": "0"}) as p:
        assert p.run(_malloc_settings).result(HANG_GUARD)["MALLOC_TRIM_THRESHOLD_"] == "0"
