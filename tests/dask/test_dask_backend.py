"""The Dask backend against a real scheduler and real workers (separate processes, TCP).

Tests synchronise on events and marker files written by the tasks (see dask_tasks.py);
timeouts are hang guards only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import distributed
import numpy as np
import psutil
import pytest
from conftest import HANG_GUARD, Cluster, cluster_env, wait_gone
from dask_tasks import (
    add,
    cooperative,
    fail_on,
    flaky,
    gated,
    mark,
    record_pid,
    sleeper,
    square,
    stubborn,
    suicide,
)

import orchestra_nb as orchestra
from orchestra_nb import JobFinished, RemoteTraceback, TaskOutput, TaskState, TaskStateChanged, WorkerExited
from orchestra_nb.testing import EventRecorder, wait_for

pytestmark = [pytest.mark.dask, pytest.mark.timeout(120)]


def delivered(rec: EventRecorder, handle: orchestra.MapHandle[object]) -> None:
    """Wait until ``handle``'s JobFinished reached ``rec``: events come in order, so every
    event published before it has been recorded too."""
    rec.wait(lambda e: isinstance(e, JobFinished) and e.job_id == handle.job_id, HANG_GUARD)


def started_pid(d: Path, i: int) -> int:
    path = d / f"started-{i}"
    wait_for(path.exists, HANG_GUARD, what=f"task {i} started")
    return int(path.read_text())


# --- results ------------------------------------------------------------------------------


def test_map_ordered_streamed_and_run(dpool: orchestra.Pool) -> None:
    assert dpool.map(square, range(2000)).result(HANG_GUARD) == [x * x for x in range(2000)]
    assert list(dpool.map(square, range(50))) == [x * x for x in range(50)]
    unordered = dpool.map(square, range(100), ordered=False).result(HANG_GUARD)
    assert sorted(unordered) == [x * x for x in range(100)]
    assert dpool.map(add, range(5), range(10, 15)).result(HANG_GUARD) == [10, 12, 14, 16, 18]
    assert dpool.run(add, 2, y=3).result(HANG_GUARD) == 5
    lazy = (i for i in range(300))  # no len(): read as the work goes
    assert dpool.map(square, lazy).result(HANG_GUARD) == [x * x for x in range(300)]


async def test_await_map_and_run(dpool: orchestra.Pool) -> None:
    assert await dpool.map(square, range(20)) == [x * x for x in range(20)]
    assert await dpool.run(square, 7) == 49
    got = [x async for x in dpool.map(square, range(10))]
    assert got == [x * x for x in range(10)]


def test_errors_keep_their_type_and_remote_traceback(dpool: orchestra.Pool) -> None:
    with pytest.raises(KeyError, match="bad item 3") as info:
        dpool.map(fail_on, range(6), [3] * 6).result(HANG_GUARD)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)
    assert any("dask worker tcp://127.0.0.1:" in note for note in info.value.__notes__)
    values = dpool.map(fail_on, range(4), [1] * 4, return_exceptions=True).result(HANG_GUARD)
    assert values[0] == 0 and values[2:] == [2, 3] and isinstance(values[1], KeyError)


def test_cell_defined_functions_lambdas_closures_and_classes(dpool: orchestra.Pool) -> None:
    cell = textwrap.dedent("""
        scale = 3
        class Point:
            def __init__(self, x):
                self.x = x * scale
        def make(x):
            return Point(x)
        shift = lambda p, k=10: p.x + k
    """)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(cell, namespace)  # what a notebook cell defines: pickled by value
    points = dpool.map(namespace["make"], range(4)).result(HANG_GUARD)  # type: ignore[arg-type]
    assert [p.x for p in points] == [0, 3, 6, 9]
    assert type(points[0]).__name__ == "Point"
    offset = 5
    assert dpool.map(lambda p: p.x + offset, points).result(HANG_GUARD) == [5, 8, 11, 14]
    assert dpool.run(namespace["shift"], points[1]).result(HANG_GUARD) == 13  # type: ignore[arg-type]


def test_numpy_arrays_in_closures_items_and_results(dpool: orchestra.Pool) -> None:
    big = np.arange(2_000_000, dtype=np.float64)  # 16 MB, captured: scattered once
    sums = dpool.map(lambda i: float(big[i::4].sum()), range(8)).result(HANG_GUARD)
    assert sums == [float(big[i::4].sum()) for i in range(8)]
    chunks = [np.full(1000, i, dtype=np.int32) for i in range(6)]
    doubled = dpool.map(lambda a: a * 2, chunks).result(HANG_GUARD)
    assert all(np.array_equal(d, c * 2) for d, c in zip(doubled, chunks, strict=True))


def test_many_tiny_tasks_are_batched_and_all_accounted_for(dpool: orchestra.Pool) -> None:
    with EventRecorder(dpool, (TaskStateChanged, JobFinished)) as rec:
        handle = dpool.map(square, range(10_000))
        assert handle.result(HANG_GUARD) == [x * x for x in range(10_000)]
        delivered(rec, handle)
        events = [e for e in rec.of(TaskStateChanged) if e.job_id == handle.job_id]
    succeeded = sum(e.count for e in events if e.state is TaskState.SUCCEEDED)
    assert succeeded == 10_000
    assert handle.counts()[TaskState.SUCCEEDED] == 10_000
    # Batched: far fewer moves than items (each range event covers a chunk).
    assert len([e for e in events if e.state is TaskState.SUCCEEDED]) < 1000


def test_statistics_from_the_scheduler(dpool: orchestra.Pool) -> None:
    dpool.map(square, range(100)).result(HANG_GUARD)
    stats = wait_for(lambda: (s := dpool.statistics()) and len(s.workers) == 2 and s, HANG_GUARD)
    assert stats.backend == "dask"
    assert all(w.host and w.host.startswith("tcp://127.0.0.1:") for w in stats.workers)
    assert all(w.pid is not None and psutil.pid_exists(w.pid) for w in stats.workers)
    assert sorted(dpool.worker_pids()) == sorted(w.pid for w in stats.workers)
    assert dpool.status()["backend"] == "dask"


# --- events and output ----------------------------------------------------------------------


def test_running_when_a_task_really_starts_and_prints_while_it_runs(
    dpool: orchestra.Pool, tmp_path: Path,
) -> None:
    with EventRecorder(dpool) as rec:
        handle = dpool.map(gated, range(4), [str(tmp_path)] * 4)
        # One task per worker thread starts; two more are submitted and wait behind them.
        rec.wait(lambda e: isinstance(e, TaskStateChanged) and e.job_id == handle.job_id
                 and e.state is TaskState.RUNNING, HANG_GUARD)
        wait_for(lambda: handle.counts()[TaskState.RUNNING] == 2, HANG_GUARD, what="two running")
        running = {int(p.name.split("-")[1]) for p in tmp_path.glob("started-*")}
        assert handle.counts()[TaskState.PENDING] == 2  # submitted, but not started
        # The prints of the running tasks arrive while they still run, tagged with the item.
        for i in running:
            _, out = rec.wait(lambda e, i=i: isinstance(e, TaskOutput) and e.index == i, HANG_GUARD)
            assert out.text == f"item {i} says hello\n" and out.stream == "stdout"
            assert out.job_id == handle.job_id and out.worker_id >= 1
        assert not handle.done()
        mark(str(tmp_path), "go")
        assert handle.result(HANG_GUARD) == [0, 1, 2, 3]
        delivered(rec, handle)
        runs = [e for e in rec.of(TaskStateChanged) if e.job_id == handle.job_id
                and e.state is TaskState.RUNNING]
        assert sum(e.count for e in runs) == 4 and all(e.worker_id is not None for e in runs)


# --- cancel, timeouts, retries ---------------------------------------------------------------


@pytest.mark.pool_options(cancel_grace=1.0)
def test_cancel_stops_running_tasks(dpool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    polite = dpool.map(cooperative, range(1), [d])
    polite_pid = started_pid(tmp_path, 0)
    assert polite.cancel()
    wait_for((tmp_path / "stopped-0").exists, HANG_GUARD, what="the interrupt reached the task")
    assert int((tmp_path / "stopped-0").read_text()) == polite_pid  # the worker lives on
    assert polite.cancelled() and polite.counts()[TaskState.CANCELLED] == 1
    # The pool stays usable at once.
    assert dpool.run(square, 4).result(HANG_GUARD) == 16

    hard = tmp_path / "hard"
    hard.mkdir()
    rude = dpool.map(stubborn, range(1), [str(hard)])
    rude_pid = started_pid(hard, 0)
    with EventRecorder(dpool, (WorkerExited,)) as rec:
        rude.cancel()
        wait_for((hard / "ignored-0").exists, HANG_GUARD, what="the task swallowed the interrupt")
        # After the grace period its worker is restarted: the task runs no more.
        assert not wait_gone([rude_pid], HANG_GUARD), "the stubborn task's process still runs"
        _, exited = rec.wait(lambda e: True, HANG_GUARD)
        assert exited.reason.startswith("killed: ")
    assert dpool.map(square, range(10)).result(HANG_GUARD) == [x * x for x in range(10)]


def test_timeout_stops_the_task(dpool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    handle = dpool.map(cooperative, range(1), [d], timeout=0.5)
    with pytest.raises(orchestra.TaskTimeoutError, match=r"exceeded its timeout of 0\.5 s"):
        handle.result(HANG_GUARD)
    pid = started_pid(tmp_path, 0)
    wait_for((tmp_path / "stopped-0").exists, HANG_GUARD, what="the timeout interrupted it")
    assert psutil.pid_exists(pid)  # interrupted, not killed


@pytest.mark.pool_options(timeout_grace=0.5)
def test_timeout_restarts_a_worker_stuck_in_a_long_call(dpool: orchestra.Pool, tmp_path: Path) -> None:
    handle = dpool.map(sleeper, range(1), [str(tmp_path)], timeout=0.5)
    with pytest.raises(orchestra.TaskTimeoutError, match="was restarted"):
        handle.result(HANG_GUARD)
    assert not wait_gone([started_pid(tmp_path, 0)], HANG_GUARD)


def test_retries(dpool: orchestra.Pool, tmp_path: Path) -> None:
    with EventRecorder(dpool, (TaskStateChanged, JobFinished)) as rec:
        handle = dpool.map(flaky, range(3), [str(tmp_path)] * 3, retries=1)
        assert handle.result(HANG_GUARD) == [0, 1, 2]
        delivered(rec, handle)
    retrying = [e for e in rec.of(TaskStateChanged)
                if e.job_id == handle.job_id and e.state is TaskState.RETRYING]
    assert sorted(e.start for e in retrying) == [0, 1, 2]
    assert all(e.attempt == 1 and e.delay is not None for e in retrying)
    (tmp_path / "again").mkdir()
    with pytest.raises(ConnectionError, match="transient failure of item 0"):
        dpool.map(flaky, range(1), [str(tmp_path / "again")]).result(HANG_GUARD)


# --- workers that die, join, or do not fit ---------------------------------------------------


def test_a_worker_killed_mid_map_and_the_map_completes(dpool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    with EventRecorder(dpool) as rec:
        handle = dpool.map(gated, range(6), [d] * 6)
        victim = started_pid(tmp_path, 0)
        os.kill(victim, signal.SIGKILL)
        _, exited = rec.wait(lambda e: isinstance(e, WorkerExited), HANG_GUARD)
        assert exited.reason == "crashed" and exited.pid == victim
        mark(d, "go")
        assert handle.result(HANG_GUARD) == list(range(6))
        delivered(rec, handle)
        back = [e for e in rec.of(TaskStateChanged) if e.job_id == handle.job_id
                and e.state is TaskState.PENDING and e.previous is TaskState.RUNNING]
        assert back, "the killed worker's task went back to PENDING"


def test_a_task_that_kills_its_workers_fails_with_worker_crashed_error(dpool: orchestra.Pool) -> None:
    with pytest.raises(orchestra.WorkerCrashedError, match=r"dask worker tcp://127\.0\.0\.1:\d+") as info:
        dpool.run(suicide, 1).result(HANG_GUARD)
    assert "KilledWorker" in type(info.value.__cause__).__name__


def test_run_on_all_replays_on_a_joining_worker(dask_cluster: Cluster, dpool: orchestra.Pool,
                                                 tmp_path: Path) -> None:
    d = str(tmp_path)
    pids = dpool.run_on_all(record_pid, d, replay=True).result(HANG_GUARD)
    assert sorted(pids) == sorted(dpool.worker_pids())
    extra = dask_cluster.add_workers(1, name="joining")
    try:
        dask_cluster.wait_for_workers(3)
        new = wait_for(lambda: set(dpool.worker_pids()) - set(pids), HANG_GUARD, what="a new worker")
        (new_pid,) = new
        wait_for((tmp_path / f"replayed-{new_pid}").exists, HANG_GUARD, what="the replay on it")
        assert len(list(tmp_path.glob("replayed-*"))) == 3  # and only there: no second run
    finally:
        left = dask_cluster.stop(extra)
        assert not left


def test_version_mismatch_is_refused_at_connect(tmp_path: Path) -> None:
    fake = tmp_path / "fake" / "orchestra_nb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "0.0.1-other"\n')
    env = cluster_env()
    env["PYTHONPATH"] = str(tmp_path / "fake")
    cluster = Cluster(tmp_path, env)
    try:
        cluster.add_workers(1)
        cluster.wait_for_workers(1)
        with pytest.raises(orchestra.OrchestraError, match=r"orchestra_nb 0\.0\.1-other") as info:
            orchestra.Pool(backend="dask", address=cluster.address)
        assert "tcp://127.0.0.1:" in str(info.value) and 'pip install "orchestra_nb[dask]' in str(info.value)
    finally:
        left = []
        for proc in reversed(list(cluster.procs)):
            left += cluster.stop(proc)
        assert not left


def test_a_users_client_is_left_open(dask_cluster: Cluster) -> None:
    client = distributed.Client(dask_cluster.address, set_as_default=False)
    try:
        with orchestra.Pool(backend=client) as pool:
            assert pool.map(square, range(10)).result(HANG_GUARD) == [x * x for x in range(10)]
        assert client.status == "running"
        assert client.submit(square, 3).result(HANG_GUARD) == 9
    finally:
        client.close()


# --- a LocalCluster that orchestra owns --------------------------------------------------------


def test_local_cluster_is_started_and_stopped_with_the_pool() -> None:
    with orchestra.Pool(backend="dask", workers=1) as pool:
        pool.wait_started(timeout=HANG_GUARD)
        assert pool.map(square, range(20)).result(HANG_GUARD) == [x * x for x in range(20)]
        pids = pool.worker_pids()
        assert pids and all(psutil.Process(p).ppid() == os.getpid() for p in pids)
    assert not wait_gone(pids, HANG_GUARD)


def test_local_cluster_dies_with_its_kernel(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, orchestra_nb as orchestra
        pool = orchestra.Pool(backend="dask", workers=1)
        pool.wait_started(timeout=60)
        assert pool.run(abs, -1).result(60) == 1
        print(*pool.worker_pids(), flush=True)
        sys.stdin.read()  # until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=cluster_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids
        proc.send_signal(signal.SIGKILL)  # a kernel that dies without any clean-up
        proc.wait(HANG_GUARD)
        assert not wait_gone(pids, HANG_GUARD), "the LocalCluster's workers outlived their kernel"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_dask_installed_the_error_says_how_to_install() -> None:
    script = textwrap.dedent("""
        import sys
        sys.modules["distributed"] = None  # as if dask were not installed
        import orchestra_nb as orchestra
        try:
            orchestra.Pool(backend="dask")
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=cluster_env(), timeout=HANG_GUARD, check=True).stdout
    assert 'pip install "orchestra_nb[dask]"' in out


def test_cancel_one_run_call_leaves_the_others(dpool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    doomed = dpool.run(cooperative, 0, d)
    started_pid(tmp_path, 0)
    kept = dpool.run(square, 6)
    assert doomed.cancel()
    wait_for((tmp_path / "stopped-0").exists, HANG_GUARD, what="the interrupt reached the call")
    assert kept.result(HANG_GUARD) == 36
    assert doomed.cancelled() and doomed.state is TaskState.CANCELLED


def test_the_default_pool_can_be_a_dask_one(dask_cluster: Cluster) -> None:
    orchestra.configure(backend="dask", address=dask_cluster.address)
    try:
        assert orchestra.map(square, range(5)).result(HANG_GUARD) == [0, 1, 4, 9, 16]
        assert orchestra.status()["backend"] == "dask"
    finally:
        orchestra.configure()  # back to the local default for the tests after this one
        orchestra.shutdown()
