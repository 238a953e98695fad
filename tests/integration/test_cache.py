"""Cached maps and runs on a real pool and a real store: hits never reach a worker (every
execution leaves a marker file in the worker), misses are computed once, results are
recorded as they finish, and the handle behaves like a MapHandle."""

from __future__ import annotations

import concurrent.futures
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import orchestra_nb as orchestra
from orchestra_nb import TasksCached, TaskState
from orchestra_nb._table import SEGMENT
from orchestra_nb.store import FingerprintError, ResultStore

HANG_GUARD = 60

CELL = textwrap.dedent("""\
    import os, uuid

    def mark(x):
        # One file per execution, written by the worker that runs it.
        open(os.path.join(MARKS, f"{x}-{os.getpid()}-{uuid.uuid4().hex}"), "x").close()

    def helper(x):
        return x * x

    def task(x):
        mark(x)
        if x == FAIL:
            raise ValueError(f"item {x} fails")
        return helper(x)
    """)


class Notebook:
    """Functions defined as in a notebook cell (module ``__main__``, shipped by value)."""

    def __init__(self, marks: Path) -> None:
        marks.mkdir()
        self.marks = marks
        self.ns: dict[str, Any] = {"__name__": "__main__", "MARKS": str(marks), "FAIL": None}
        self.run_cell(CELL)

    def run_cell(self, code: str) -> None:
        exec(compile(textwrap.dedent(code), "<cell>", "exec"), self.ns)

    def __getitem__(self, name: str) -> Any:
        return self.ns[name]

    def executions(self) -> list[int]:
        """The items executed so far, sorted (a repeated item appears once per execution)."""
        return sorted(int(p.name.split("-")[0]) for p in self.marks.iterdir())


@pytest.fixture
def nb(tmp_path: Path) -> Notebook:
    return Notebook(tmp_path / "marks")


@pytest.fixture
def store(tmp_path: Path) -> Any:
    path = tmp_path / "store.sqlite"
    orchestra.store.use(path)
    try:
        yield orchestra.store.current()
    finally:
        orchestra.store.use(None)
        orchestra.store.close_all()


def test_hits_never_reach_a_worker(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    first = pool.map(nb["task"], range(50), cache=True)
    assert first.result(HANG_GUARD) == [x * x for x in range(50)]
    assert nb.executions() == list(range(50))
    assert first.cached == 0 and first.recorded == 50 and store.count() == 50

    again = pool.map(nb["task"], range(50), cache=True)
    assert again.result(HANG_GUARD) == [x * x for x in range(50)]
    assert nb.executions() == list(range(50))  # not one more execution
    assert again.cached == 50 and again.misses.total == 0
    assert again.counts()[TaskState.SUCCEEDED] == 50 and again.total == 50

    more = pool.map(nb["task"], range(60), cache=True)
    assert more.result(HANG_GUARD) == [x * x for x in range(60)]
    assert nb.executions() == list(range(60))  # exactly the 10 new items ran


def test_repeated_items_run_once(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    handle = pool.map(nb["task"], [3, 1, 3, 3, 2, 1], cache=True)
    assert handle.result(HANG_GUARD) == [9, 1, 9, 9, 4, 1]
    assert nb.executions() == [1, 2, 3]
    assert handle.counts()[TaskState.SUCCEEDED] == 6


def test_several_iterables_and_keywords(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    nb.run_cell("def add(a, b, c=0):\n    mark(a)\n    return a + b + c\n")
    assert pool.map(nb["add"], [1, 2], [10, 20], cache=True).result(HANG_GUARD) == [11, 22]
    assert pool.options(cache=True).run(nb["add"], 1, 10).result(HANG_GUARD) == 11  # same key as the map's
    assert nb.executions() == [1, 2]
    assert pool.options(cache=True).run(nb["add"], 1, 10, c=5).result(HANG_GUARD) == 16
    assert nb.executions() == [1, 1, 2]


def test_cached_run(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    first = pool.options(cache=True).run(nb["task"], 7)
    assert first.result(HANG_GUARD) == 49 and not first.from_store
    second = pool.options(cache=True).run(nb["task"], 7)
    assert second.result(HANG_GUARD) == 49 and second.from_store
    assert second.state == TaskState.SUCCEEDED
    assert nb.executions() == [7]


def test_a_burst_of_cached_runs_shares_one_writer(
    pool: orchestra.Pool, nb: Notebook, store: ResultStore
) -> None:
    cached = pool.options(cache=True)
    handles = [cached.run(nb["task"], x) for x in range(100)]
    assert [h.result(HANG_GUARD) for h in handles] == [x * x for x in range(100)]
    names = [t.name for t in threading.enumerate()]
    assert names.count("orchestra-store-writer") == 1
    assert not [n for n in names if n.startswith("orchestra-cache")]  # no thread per call
    assert store.count() == 100
    assert all(cached.run(nb["task"], x).from_store for x in range(100))
    assert len(nb.executions()) == 100


async def test_awaiting_and_streaming(apool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    assert await apool.map(nb["task"], range(0, 40, 2), cache=True) == [x * x for x in range(0, 40, 2)]
    # Half hits (even items), half misses: every way of reading gives every item.
    mixed = apool.map(nb["task"], range(40), cache=True)
    assert [x async for x in mixed] == [x * x for x in range(40)]
    assert sorted(await apool.map(nb["task"], range(45), cache=True, ordered=False)) == \
        sorted(x * x for x in range(45))
    streamed = apool.map(nb["task"], range(50), cache=True, ordered=False)
    assert sorted([x async for x in streamed]) == sorted(x * x for x in range(50))
    assert nb.executions() == list(range(50))


@pytest.mark.timeout(120)
def test_a_long_cached_map_consumed_as_a_stream_keeps_what_it_records(
    pool: orchestra.Pool, nb: Notebook, store: ResultStore
) -> None:
    """The recorder streams the misses while the caller iterates or awaits them too: a
    stream of more than a segment must not have them dropped (see test_streams)."""
    nb.run_cell("def plain_square(x):\n    return x * x\n")
    n = 2 * SEGMENT + 7
    h = pool.map(nb["plain_square"], range(n), cache=True)
    assert sum(h) == sum(x * x for x in range(n))
    assert h.result(HANG_GUARD) == [x * x for x in range(n)]
    assert store.count() == n


def test_sync_iteration_in_order(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    pool.map(nb["task"], range(0, 30, 3), cache=True).result(HANG_GUARD)
    assert list(pool.map(nb["task"], range(30), cache=True)) == [x * x for x in range(30)]
    assert nb.executions() == list(range(30))


def test_failures_are_not_cached(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    nb.ns["FAIL"] = 4
    handle = pool.map(nb["task"], range(8), cache=True, return_exceptions=True)
    results = handle.result(HANG_GUARD)
    assert isinstance(results[4], ValueError)
    assert results[:4] == [0, 1, 4, 9] and results[5:] == [25, 36, 49]
    assert set(handle.exceptions()) == {4}
    assert handle.counts()[TaskState.FAILED] == 1
    with pytest.raises(ValueError, match="item 4 fails"):
        pool.map(nb["task"], range(8), cache=True).result(HANG_GUARD)
    assert nb.executions() == sorted([*range(8), 4])  # only the failed item ran again
    nb.ns["FAIL"] = None  # a global the task reads: a new key for every item
    assert pool.map(nb["task"], range(8), cache=True).result(HANG_GUARD) == [x * x for x in range(8)]
    assert len(nb.executions()) == 17


def test_editing_a_helper_misses_and_an_unrelated_cell_hits(
    pool: orchestra.Pool, nb: Notebook, store: ResultStore
) -> None:
    pool.map(nb["task"], range(10), cache=True).result(HANG_GUARD)
    nb.run_cell("UNRELATED = 42\ndef other(y):\n    return y + 1\n")
    assert pool.map(nb["task"], range(10), cache=True).result(HANG_GUARD) == [x * x for x in range(10)]
    assert len(nb.executions()) == 10
    nb.run_cell("def helper(x):\n    return x * x + 1\n")
    assert pool.map(nb["task"], range(10), cache=True).result(HANG_GUARD) == [x * x + 1 for x in range(10)]
    assert len(nb.executions()) == 20


def test_a_cancelled_map_keeps_what_finished(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    nb.run_cell("import time\ndef slow(x):\n    mark(x)\n    time.sleep(0.02)\n    return -x\n")
    handle = pool.map(nb["slow"], range(200), cache=True, chunksize=1)
    deadline = time.monotonic() + HANG_GUARD
    while handle.recorded < 20:  # recorded as they finish, not at the end
        assert time.monotonic() < deadline
        time.sleep(0.005)
    handle.cancel()
    assert handle.wait_finished(HANG_GUARD)
    with pytest.raises(concurrent.futures.CancelledError):
        handle.result(HANG_GUARD)
    assert handle.cancelled()
    stored = store.count()
    ran_before = len(nb.executions())
    assert 20 <= stored < 200
    rerun = pool.map(nb["slow"], range(200), cache=True, chunksize=1)
    assert rerun.result(HANG_GUARD) == [-x for x in range(200)]
    assert rerun.cached == stored
    assert len(nb.executions()) - ran_before == 200 - stored  # exactly the missing ones


def test_checkpoints_list_and_delete_runs(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    pool.map(nb["task"], range(10), cache=True).result(HANG_GUARD)
    handle = pool.map(nb["task"], range(20), checkpoint="sweep-1")
    (run,) = orchestra.store.runs()  # recorded before any item runs
    assert (run.name, run.function, run.total) == ("sweep-1", "task", 20)
    handle.result(HANG_GUARD)
    (run,) = orchestra.store.runs()
    assert (run.done, run.missing) == (20, 0)
    assert orchestra.store.run_results("sweep-1") == [x * x for x in range(20)]
    with pytest.raises(KeyError, match="no run named 'sweep-2'"):
        orchestra.store.run_results("sweep-2")
    assert orchestra.store.delete_run("sweep-1", results=True)
    assert orchestra.store.runs() == [] and store.count() == 0


def test_the_store_event_is_published(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    pool.map(nb["task"], range(5), cache=True).result(HANG_GUARD)
    seen: list[TasksCached] = []
    subscription = pool.subscribe(seen.append, types=(TasksCached,))
    try:
        handle = pool.map(nb["task"], range(8), cache=True)
        handle.result(HANG_GUARD)
        deadline = time.monotonic() + HANG_GUARD
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        subscription.close()
    assert seen == [TasksCached(handle.job_id, 5, 8)]


def test_unfingerprintable_arguments_are_named(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    with pytest.raises(FingerprintError, match=r"item 2 of task: .*argument 0 \(type lock\)"):
        pool.map(nb["task"], [1, 2, threading.Lock()], cache=True)
    assert nb.executions() == []


def test_large_numpy_results(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    nb.run_cell("import numpy as np\ndef block(i):\n    mark(i)\n    return np.full((300, 300), float(i))\n")
    first = pool.map(nb["block"], range(4), cache=True).result(HANG_GUARD)
    second = pool.map(nb["block"], range(4), cache=True).result(HANG_GUARD)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert store.info().files == 4 and len(nb.executions()) == 4


def test_the_decorator(pool: orchestra.Pool, nb: Notebook, store: ResultStore) -> None:
    task = orchestra.cached(nb["task"], pool=pool)
    assert task(3) == 9  # in this process
    assert task(3) == 9
    assert task.map(range(5)).result(HANG_GUARD) == [0, 1, 4, 9, 16]
    assert pool.map(task, range(5)).result(HANG_GUARD) == [0, 1, 4, 9, 16]  # cached without cache=True
    assert task.run(4).result(HANG_GUARD) == 16
    assert nb.executions() == [0, 1, 2, 3, 4]  # 3 once, here; 0, 1, 2, 4 once, in workers
    assert task.clear() == 5
    assert store.count() == 0


def test_module_level_map_and_configure(nb: Notebook, tmp_path: Path) -> None:
    path = tmp_path / "configured.sqlite"
    orchestra.configure(workers=1, store=path)
    try:
        assert orchestra.map(nb["task"], range(3), cache=True).result(HANG_GUARD) == [0, 1, 4]
        assert orchestra.store.current().path == path.resolve()
        pids = orchestra.default_pool().worker_pids()
        orchestra.configure(store=path)  # only the store: the pool stays
        assert orchestra.default_pool().worker_pids() == pids
        assert orchestra.map(nb["task"], range(3), cache=True).cached == 3
    finally:
        orchestra.configure()
        orchestra.store.use(None)
        orchestra.store.close_all()


def test_a_size_cap_evicts_the_least_recently_used(
    pool: orchestra.Pool, nb: Notebook, store: ResultStore
) -> None:
    nb.run_cell("import numpy as np\ndef block(i):\n    mark(i)\n    return np.full((300, 300), float(i))\n")
    orchestra.configure(store_max_bytes="2MB")  # 720 kB per result: two fit
    try:
        pool.map(nb["block"], range(6), cache=True, chunksize=1).result(HANG_GUARD)
    finally:
        orchestra.configure(store_max_bytes=None)
    info = store.info()
    assert info.entries == 2 and info.bytes <= 2_000_000
    assert len(list(store.files.glob("*/*.bin"))) == 2


def test_unkeyed_arguments_are_passed_but_not_keyed(
    pool: orchestra.Pool, nb: Notebook, store: ResultStore
) -> None:
    nb.run_cell("def scaled(x, label):\n    mark(x)\n    return (x, label)\n")
    unkeyed = orchestra.store.unkeyed
    first = pool.map(nb["scaled"], [1, 2], [unkeyed("first"), unkeyed("first")], cache=True)
    assert first.result(HANG_GUARD) == [(1, "first"), (2, "first")]  # the function gets the value
    again = pool.map(nb["scaled"], [1, 2], [unkeyed("second"), unkeyed("second")], cache=True)
    assert again.result(HANG_GUARD) == [(1, "first"), (2, "first")] and again.cached == 2
    lock_free = orchestra.cached(nb["scaled"], pool=pool)
    with pytest.warns(RuntimeWarning, match="cannot be pickled.*returned but not cached"):
        assert lock_free(5, unkeyed(threading.Lock()))[0] == 5  # not fingerprintable, but unkeyed
    assert nb.executions() == [1, 2, 5]
