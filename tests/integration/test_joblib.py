"""The joblib backend: joblib's documented behaviours with ``backend="orchestra"``, on real
workers, and scikit-learn's ``n_jobs`` giving the same results as with loky.

Blocking tasks wait for a release file (or an interrupt); ``HANG_GUARD`` only bounds a hang.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import orchestra_nb as orchestra  # noqa: E402
import orchestra_nb.joblib  # noqa: E402  (registers backend="orchestra")
from orchestra_nb import JobCancelled, JobFinished, JobStarted, RemoteTraceback, SerializationError, TaskState  # noqa: E402
from orchestra_nb.testing import wait_for  # noqa: E402

pytestmark = pytest.mark.local_only("joblib batches on worker processes")

HANG_GUARD = 30.0


class Unlucky(Exception):
    """A user-defined error: it must come back as itself."""


def square(x: int) -> int:
    return x * x


def fail_at(x: int, bad: int) -> int:
    if x == bad:
        raise Unlucky(f"item {x}")
    return x


def mark(d: str, name: str) -> None:
    tmp = Path(d, f".tmp-{name}")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, Path(d, name))


def wait_release(d: str, i: int) -> int:
    try:
        mark(d, f"started-{i}")
        deadline = time.monotonic() + 120
        while not Path(d, "release").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("never released")
            time.sleep(0.005)
        return i
    except KeyboardInterrupt:
        if not Path(d, f"started-{i}").exists():  # interrupted while it said it started
            mark(d, f"started-{i}")
        mark(d, f"interrupted-{i}")
        raise


def fail_when_started(d: str, others: int) -> int:
    """Fails once ``others`` blocking tasks have started (so they are running, not queued)."""
    deadline = time.monotonic() + 60
    while len(list(Path(d).glob("started-*"))) < others and time.monotonic() < deadline:
        time.sleep(0.005)
    raise Unlucky("first error")


def inner_pids(n: int) -> tuple[int, list[int]]:
    """A nested joblib call inside a worker: which processes ran its items?"""
    return os.getpid(), Parallel(n_jobs=-1)(delayed(os.getpid)() for _ in range(n))


def inner_explicit(n: int) -> tuple[int, list[int]]:
    with parallel_config(backend="orchestra"):
        return os.getpid(), Parallel(n_jobs=-1)(delayed(os.getpid)() for _ in range(n))


def getpid(_: object = None) -> int:
    return os.getpid()


def markers(d: Path, prefix: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in d.glob(f"{prefix}-*") if p.stat().st_size}


def idle(pool: orchestra.Pool) -> bool:
    """No worker runs anything (nothing left running after an abort)."""
    return all(w.job is None for w in pool.statistics().workers)


@pytest.fixture
def on_pool(pool: orchestra.Pool, tmp_path: Path) -> Iterator[orchestra.Pool]:
    with parallel_config(backend="orchestra", pool=pool):
        try:
            yield pool
        finally:
            (tmp_path / "release").touch()


def test_results_in_order_with_auto_batching(on_pool: orchestra.Pool) -> None:
    out = Parallel(n_jobs=-1, batch_size="auto")(delayed(square)(i) for i in range(2000))
    assert out == [i * i for i in range(2000)]
    assert Parallel(n_jobs=2, batch_size=7)(delayed(square)(i) for i in range(50)) == [i * i for i in range(50)]


def test_runs_on_the_pools_workers(on_pool: orchestra.Pool) -> None:
    assert joblib.effective_n_jobs(-1) == on_pool.workers
    pids = set(Parallel(n_jobs=-1)(delayed(getpid)(i) for i in range(50)))
    assert pids <= set(on_pool.worker_pids())


def test_n_jobs_minus_one_is_the_default_in_the_block(on_pool: orchestra.Pool) -> None:
    parallel = Parallel()
    assert parallel.n_jobs == -1
    assert parallel(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


def test_cell_defined_functions_and_lambdas(on_pool: orchestra.Pool) -> None:
    offset = 3
    assert Parallel(n_jobs=-1)(delayed(lambda x: x + offset)(i) for i in range(5)) == [3, 4, 5, 6, 7]


def test_return_as_generator_yields_in_order(on_pool: orchestra.Pool) -> None:
    gen = Parallel(n_jobs=-1, return_as="generator")(delayed(square)(i) for i in range(100))
    assert not isinstance(gen, list)
    assert list(gen) == [i * i for i in range(100)]


def test_return_as_generator_unordered_yields_in_completion_order(
    on_pool: orchestra.Pool, tmp_path: Path
) -> None:
    d = str(tmp_path)
    # Item 0 blocks until released: the first result out must be another one.
    gen = Parallel(n_jobs=2, batch_size=1, return_as="generator_unordered")(
        [delayed(wait_release)(d, 0), *(delayed(square)(i) for i in range(1, 10))]
    )
    first = next(gen)
    assert first in {i * i for i in range(1, 10)}
    (tmp_path / "release").touch()
    assert sorted([first, *gen]) == sorted(i * i for i in range(10))


def test_errors_are_reraised_with_their_type(on_pool: orchestra.Pool) -> None:
    with pytest.raises(Unlucky, match="item 7") as info:
        Parallel(n_jobs=-1)(delayed(fail_at)(i, 7) for i in range(20))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_at" in str(info.value.__cause__)


def test_the_first_error_aborts_the_running_work(on_pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    on_pool.resize(3)  # the two blocking tasks and the failing one run at the same time
    wait_for(lambda: len(on_pool.worker_pids()) == 3, timeout=HANG_GUARD)
    pids = sorted(on_pool.worker_pids())
    tasks = [delayed(wait_release)(d, i) for i in range(2)] + [delayed(fail_when_started)(d, 2)]
    tasks += [delayed(wait_release)(d, i) for i in range(10, 20)]
    with pytest.raises(Unlucky, match="first error"):
        Parallel(n_jobs=3, batch_size=1, pre_dispatch="all")(tasks)
    # Every task that had started was interrupted (not left running, not killed with its
    # worker), and the queued ones were dropped. (One may have started on the failing
    # task's worker before the error reached joblib.)
    wait_for(lambda: idle(on_pool), timeout=HANG_GUARD)
    wait_for(lambda: markers(tmp_path, "interrupted") == markers(tmp_path, "started"), timeout=HANG_GUARD)
    assert {0, 1} <= markers(tmp_path, "started")
    assert len(markers(tmp_path, "started")) < 12
    assert sorted(on_pool.worker_pids()) == pids
    assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_timeout_raises_and_stops_the_work(on_pool: orchestra.Pool, tmp_path: Path) -> None:
    pids = sorted(on_pool.worker_pids())
    Parallel(n_jobs=-1)(delayed(square)(i) for i in range(4))  # workers import this module
    with pytest.raises(multiprocessing.TimeoutError):  # joblib's, as with loky
        Parallel(n_jobs=-1, timeout=1.0)(delayed(wait_release)(str(tmp_path), i) for i in range(2))
    # Not left running (they block until released, which never happens before the end).
    wait_for(lambda: idle(on_pool), timeout=HANG_GUARD)
    assert markers(tmp_path, "interrupted") == markers(tmp_path, "started")
    assert sorted(on_pool.worker_pids()) == pids


def test_nested_calls_run_sequentially_in_the_worker(on_pool: orchestra.Pool) -> None:
    for outer, inner in Parallel(n_jobs=-1)(delayed(inner_pids)(4) for _ in range(4)):
        assert inner == [outer] * 4  # no oversubscription: the worker ran them itself
    # ... also when the task asks for the orchestra backend by name (registered there too).
    for outer, inner in Parallel(n_jobs=-1)(delayed(inner_explicit)(3) for _ in range(2)):
        assert inner == [outer] * 3


def test_an_unpicklable_argument_fails_the_call_instead_of_hanging(on_pool: orchestra.Pool) -> None:
    with pytest.raises(SerializationError, match="argument"):
        Parallel(n_jobs=-1)(delayed(id)(threading.Lock()) for _ in range(3))


def test_a_generator_dropped_early_stops_the_work(on_pool: orchestra.Pool, tmp_path: Path) -> None:
    d = str(tmp_path)
    gen = Parallel(n_jobs=2, batch_size=1, return_as="generator")(delayed(wait_release)(d, i) for i in range(6))
    wait_for(lambda: markers(tmp_path, "started") == {0, 1}, timeout=HANG_GUARD)
    with pytest.warns(UserWarning, match="cancelled"):
        gen.close()
    wait_for(lambda: markers(tmp_path, "interrupted") == {0, 1}, timeout=HANG_GUARD)
    assert markers(tmp_path, "started") == {0, 1}


def napping_pid(_: object = None) -> int:
    time.sleep(0.002)
    return os.getpid()


def test_one_job_per_parallel_call_counting_its_calls(on_pool: orchestra.Pool) -> None:
    """What a progress view shows: one job for the whole call, fed as joblib dispatches
    its batches, with a task per call (not per batch)."""
    events: list[object] = []
    finished = threading.Event()

    def seen(event: object) -> None:
        events.append(event)
        if isinstance(event, JobFinished):
            finished.set()

    sub = on_pool.subscribe(seen, types=(JobStarted, JobFinished))
    try:
        out = Parallel(n_jobs=-1, batch_size="auto")(delayed(square)(i) for i in range(3000))
        assert finished.wait(HANG_GUARD)
    finally:
        sub.close()
    assert out == [i * i for i in range(3000)]
    started = [e for e in events if isinstance(e, JobStarted)]
    done = [e for e in events if isinstance(e, JobFinished)]
    assert [e.name for e in started] == ["joblib: square"]
    assert len(done) == 1 and done[0].job_id == started[0].job_id and not done[0].cancelled
    assert done[0].counts[TaskState.SUCCEEDED] == 3000 and sum(done[0].counts) == 3000


def test_a_large_batch_is_spread_over_the_workers(on_pool: orchestra.Pool) -> None:
    # One batch in flight at a time (pre_dispatch=1): first one call, then batches of 100.
    # joblib would hand each batch to one worker; the pool chunks it over both.
    pids = Parallel(n_jobs=2, batch_size=100, pre_dispatch=1)(delayed(napping_pid)(i) for i in range(201))
    assert set(pids[1:101]) == set(on_pool.worker_pids())


def test_cancelling_the_job_stops_the_call(on_pool: orchestra.Pool, tmp_path: Path) -> None:
    """What the Cancel button (or the side panel) does: cancel the call's job by its id."""
    d = str(tmp_path)
    jobs: list[JobStarted] = []
    sub = on_pool.subscribe(jobs.append, types=(JobStarted,))
    try:

        def cancel_once_started() -> None:
            wait_for(lambda: markers(tmp_path, "started") == {0, 1} and len(jobs) == 1, timeout=HANG_GUARD)
            assert on_pool.cancel_job(jobs[0].job_id)

        canceller = threading.Thread(target=cancel_once_started)
        canceller.start()
        try:
            with pytest.raises(JobCancelled):
                Parallel(n_jobs=2, batch_size=1)(delayed(wait_release)(d, i) for i in range(6))
        finally:
            canceller.join(HANG_GUARD)
    finally:
        sub.close()
    wait_for(lambda: idle(on_pool), timeout=HANG_GUARD)
    assert markers(tmp_path, "interrupted") == markers(tmp_path, "started") == {0, 1}
    assert Parallel(n_jobs=-1)(delayed(square)(i) for i in range(4)) == [0, 1, 4, 9]


def test_register_under_another_name(pool: orchestra.Pool) -> None:
    orchestra_nb.joblib.register("orchestra-tests")
    with parallel_config(backend="orchestra-tests", pool=pool):
        assert Parallel(n_jobs=-1)(delayed(getpid)() for _ in range(4)) != []
    with pytest.raises(TypeError):
        orchestra_nb.joblib.register("")


# --- scikit-learn --------------------------------------------------------------------------

SKLEARN_CASE = """
import json, sys
from sklearn.datasets import load_iris
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.svm import SVC
X, y = load_iris(return_X_y=True)
grid = GridSearchCV(SVC(), {"C": [0.1, 1, 10], "gamma": [0.01, 0.1, 1]}, cv=3, n_jobs=-1).fit(X, y)
scores = cross_val_score(SVC(C=1), X, y, cv=5, n_jobs=-1)
out = {
    "best_params": grid.best_params_,
    "mean_test_score": [float(s) for s in grid.cv_results_["mean_test_score"]],
    "cross_val": [float(s) for s in scores],
}
"""


@pytest.mark.timeout(300)  # (a hang guard: loky in a subprocess, 54 s on a loaded machine)
def test_scikit_learn_gives_the_same_results_as_loky(on_pool: orchestra.Pool) -> None:
    pytest.importorskip("sklearn")
    # loky's figures from a child interpreter: its workers and resource tracker end with it.
    code = (
        "import joblib\nwith joblib.parallel_config(backend='loky', n_jobs=2):\n"
        + "".join("    " + line + "\n" for line in SKLEARN_CASE.strip().splitlines())
        + "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    loky = json.loads(proc.stdout.strip().splitlines()[-1])
    namespace: dict[str, object] = {}
    exec(SKLEARN_CASE, namespace)  # inside the fixture's parallel_config(backend="orchestra")
    ours = json.loads(json.dumps(namespace["out"]))
    assert ours == loky


def blas_threads(_: object = None) -> list[int]:
    import numpy  # noqa: F401  (loads the BLAS library)
    import threadpoolctl

    return sorted({lib["num_threads"] for lib in threadpoolctl.threadpool_info()})


@pytest.mark.pool_options(env={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"})
def test_inner_max_num_threads_limits_native_pools_while_a_batch_runs(pool: orchestra.Pool) -> None:
    pytest.importorskip("threadpoolctl")
    assert pool.run_on_all(blas_threads).result(HANG_GUARD)[0] == [2]  # numpy now loaded there
    with parallel_config(backend="orchestra", pool=pool, inner_max_num_threads=1):
        inside = Parallel(n_jobs=-1)(delayed(blas_threads)(i) for i in range(4))
    assert inside == [[1]] * 4
    # ... only while the batch runs: the worker's own setting is back afterwards.
    assert pool.run_on_all(blas_threads).result(HANG_GUARD) == [[2]] * pool.workers


def test_workers_native_pools_share_the_cpus_by_default(pool: orchestra.Pool) -> None:
    pytest.importorskip("threadpoolctl")
    share = max(1, len(os.sched_getaffinity(0)) // pool.workers)
    with parallel_config(backend="orchestra", pool=pool):
        inside = Parallel(n_jobs=-1)(delayed(blas_threads)(i) for i in range(4))
    assert inside == [[share]] * 4
