"""The workloads, each written once against the System interface (issue #17 added the
machine's raw limits, the widget, many small maps, a broadcast argument and numpy work).

A workload function runs inside the group subprocess of one system (see runner.py), starts
and closes the system itself and records raw numbers per repetition in a Recorder.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psutil

from benchmarks import tasks
from benchmarks.config import BROADCAST_RECORD, HEAVY, JOBLIB_BACKENDS, Sizes
from benchmarks.record import Recorder
from benchmarks.systems.base import WORKERS, System, _count_sum

MB = 2**20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Workload = Callable[[type[System], Recorder, Sizes, int], None]


# -- helpers ---------------------------------------------------------------------------
@contextmanager
def opened(cls: type[System]) -> Iterator[System]:
    system = cls()
    try:
        system.start()
        yield system
    finally:
        system.dispose()


def do_call(s: System, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """One call through the system's measured path (await for orchestra, sync for peers)."""
    if s.prefer_async:
        return s.aio(asyncio.wait_for(s.acall(fn, *args), timeout))
    return s.call(fn, *args, timeout=timeout)


def do_map(s: System, fn: Callable[[Any], Any], items: Sequence[Any], chunksize: int | None) -> list[Any]:
    if s.prefer_async:
        return s.aio(s.amap(fn, items, chunksize))
    return s.map(fn, items, chunksize)


def do_submit(s: System, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if s.prefer_async:
        return s.aio(s.asubmit_many(fn, items))
    return s.submit_many(fn, items)


def reps_for(cls: type[System], workload: str, repeat: int, rec: Recorder) -> int:
    if cls.slow and workload in HEAVY and repeat > 1:
        rec.note("slow system: 1 repetition of this workload (tens of seconds each)")
        return 1
    return repeat


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(f"wrong result: {what}")


def subprocess_env() -> dict[str, str]:
    """Children must import benchmarks.* (task functions) from the repository root.

    Bytecode caching stays on, as on a user's machine: some sandboxes set
    PYTHONDONTWRITEBYTECODE, which makes every import of a source checkout (but not of the
    peers, compiled when pip installed them) recompile, and skews the cold-start figures.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def precompile() -> None:
    """Write the .pyc files of this checkout, as ``pip install`` does for installed peers."""
    import compileall

    for package in ("orchestra_nb", "benchmarks"):
        compileall.compile_dir(os.path.join(REPO_ROOT, package), quiet=1)


# -- 1 cold start ----------------------------------------------------------------------
def run_cold_once(cls: type[System], timeout: float) -> float:
    code = (
        cls.cold_preamble
        + "import time\n_t0 = time.perf_counter()\n"
        + cls.cold_code()
        + "_dt = time.perf_counter() - _t0\n"
        + "print('COLD_S', _dt, first, flush=True)\n"
        + "cleanup()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
        cwd=REPO_ROOT,
        start_new_session=True,  # its own process group, so a hang can be killed whole
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise TimeoutError(f"cold start did not finish in {timeout:.0f} s") from None
    for line in out.splitlines():
        if line.startswith("COLD_S "):
            _, dt, first = line.split()
            check(first == "1", f"abs(-1) gave {first}")
            return float(dt)
    last = (err.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"exit {proc.returncode}: {last}")


def kill_tree(pid: int) -> None:
    """Kill a process we started and all its descendants, by pid."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=5)


def wl_cold(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    for _ in range(repeat):
        rec.measure(("cold_s",), lambda: {"cold_s": run_cold_once(cls, sizes.group_timeout_s / 2)})
    if cls.key != "orchestra":
        return
    # The pool warmed in the background (as after %load_ext), then one call is timed.
    for _ in range(repeat):

        def first_call() -> dict[str, float]:
            with opened(cls) as s:
                t0 = time.perf_counter()
                value = s.aio(s.acall(abs, -1))
                dt = time.perf_counter() - t0
            check(value == 1, f"abs(-1) gave {value!r}")
            return {"warm_first_call_s": dt}

        rec.measure(("warm_first_call_s",), first_call)


# -- 2 round trip ----------------------------------------------------------------------
def wl_rtt(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    n = sizes.rtt_calls

    async def await_loop(s: System, count: int) -> list[float]:
        out = []
        for i in range(count):
            t0 = time.perf_counter_ns()
            v = await s.acall(tasks.inc, i)
            out.append((time.perf_counter_ns() - t0) / 1000)
            if v != i + 1:
                check(False, f"inc({i}) gave {v!r}")
        return out

    def sync_loop(s: System, count: int) -> list[float]:
        out = []
        for i in range(count):
            t0 = time.perf_counter_ns()
            v = s.call(tasks.inc, i)
            out.append((time.perf_counter_ns() - t0) / 1000)
            if v != i + 1:
                check(False, f"inc({i}) gave {v!r}")
        return out

    with opened(cls) as s:
        s.aio(await_loop(s, 50))  # warm-up: code paths, caches, connections
        sync_loop(s, 50)
        for _ in range(repeat):

            def measure_await() -> dict[str, float]:
                us = s.aio(await_loop(s, n))
                return {"await_med_us": statistics.median(us), "await_p99_us": percentile(us, 99)}

            def measure_sync() -> dict[str, float]:
                us = sync_loop(s, n)
                return {"sync_med_us": statistics.median(us), "sync_p99_us": percentile(us, 99)}

            rec.measure(("await_med_us", "await_p99_us"), measure_await)
            rec.measure(("sync_med_us", "sync_p99_us"), measure_sync)


# -- 3 tiny-task map -------------------------------------------------------------------
def wl_map(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    items = list(range(sizes.map_items))
    expected = [x + 1 for x in items]

    def timed(chunksize: int | None) -> float:
        t0 = time.perf_counter()
        out = do_map(s, tasks.inc, items, chunksize)
        dt = time.perf_counter() - t0
        check(out == expected, "map results differ from [x + 1 for x in items]")
        return len(items) / dt

    with opened(cls) as s:
        for _ in range(reps_for(cls, "map", repeat, rec)):
            rec.measure(("default_items_s",), lambda: {"default_items_s": timed(None)})
        for _ in range(repeat):
            rec.measure(("chunk_items_s",), lambda: {"chunk_items_s": timed(sizes.map_chunksize)})


# -- 4 per-task submissions ------------------------------------------------------------
def wl_submit(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    items = list(range(sizes.submit_items))

    def timed() -> dict[str, float]:
        t0 = time.perf_counter()
        out = do_submit(s, tasks.inc, items)
        dt = time.perf_counter() - t0
        check(out == [x + 1 for x in items], "results differ")
        return {"tasks_s": len(items) / dt}

    with opened(cls) as s:
        do_submit(s, tasks.inc, items[:200])  # warm-up
        for _ in range(reps_for(cls, "submit", repeat, rec)):
            rec.measure(("tasks_s",), timed)


# -- 5 CPU scaling ---------------------------------------------------------------------
def wl_scaling(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    n = tasks.calibrate_burn(sizes.scaling_task_s)
    # Serial reference in this process: median of single tasks, times the task count, so
    # that one noisy task does not skew every ratio.
    singles = []
    for _ in range(sizes.scaling_tasks):
        t0 = time.perf_counter()
        tasks.burn(n)
        singles.append(time.perf_counter() - t0)
    serial = statistics.median(singles) * sizes.scaling_tasks

    def timed() -> dict[str, float]:
        t0 = time.perf_counter()
        out = do_map(s, tasks.burn, [n] * sizes.scaling_tasks, 1)
        dt = time.perf_counter() - t0
        check(len(out) == sizes.scaling_tasks, "missing results")
        return {"speedup": serial / dt, "parallel_s": dt, "serial_s": serial}

    with opened(cls) as s:
        do_map(s, tasks.burn, [1000, 1000], 1)
        for _ in range(repeat):
            rec.measure(("speedup", "parallel_s", "serial_s"), timed)


# -- 6 data transfer -------------------------------------------------------------------
def wl_transfer(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    import numpy as np

    n = sizes.transfer_mb * MB // 8
    arr = np.ones(n, dtype=np.float64)

    def send() -> dict[str, float]:
        t0 = time.perf_counter()
        total = do_call(s, tasks.array_sum, arr)
        dt = time.perf_counter() - t0
        check(total == float(n), f"sum {total!r} != {n}")
        return {"send_mb_s": sizes.transfer_mb / dt}

    def receive() -> dict[str, float]:
        t0 = time.perf_counter()
        out = do_call(s, tasks.make_array, n)
        dt = time.perf_counter() - t0
        check(getattr(out, "shape", None) == (n,), "wrong array returned")
        return {"return_mb_s": sizes.transfer_mb / dt}

    with opened(cls) as s:
        small = np.ones(1024)
        do_call(s, tasks.array_sum, small)  # warm-up: numpy imported in the worker
        do_call(s, tasks.make_array, 1024)
        for _ in range(repeat):
            rec.measure(("send_mb_s",), send)
            rec.measure(("return_mb_s",), receive)


# -- 7 event-loop lag ------------------------------------------------------------------
def wl_lag(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    items = list(range(sizes.lag_items))
    tick = sizes.lag_tick_s

    async def during_map(s: System) -> dict[str, float]:
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(tick)
                lags.append((time.perf_counter() - t0 - tick) * 1000)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker is sleeping before the map starts
        t0 = time.perf_counter()
        try:
            out = await s.amap(tasks.inc, items)
        finally:
            wall = time.perf_counter() - t0
            done.set()
            await task
        check(out == [x + 1 for x in items], "map results differ")
        check(bool(lags), "ticker never ran")
        return {"lag_p99_ms": percentile(lags, 99), "lag_max_ms": max(lags), "map_s": wall}

    with opened(cls) as s:
        for _ in range(reps_for(cls, "lag", repeat, rec)):
            rec.measure(("lag_p99_ms", "lag_max_ms", "map_s"), lambda: s.aio(during_map(s)))


# -- 9 scale ---------------------------------------------------------------------------
class PeakRSS:
    """Samples this process's RSS in a thread; ``growth`` is peak minus the start, bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.proc = psutil.Process()
        self.stop = threading.Event()
        self.base = self.peak = 0

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def wl_scale(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    n = sizes.scale_items_slow if cls.slow else sizes.scale_items
    if n != sizes.scale_items:
        rec.note(f"slow system: {n:,} items, not {sizes.scale_items:,} (that would take minutes)")
    chunksize = cls.scale_chunksize
    if chunksize is None:
        rec.set_status("skipped: cannot map a generator of this size")
        return
    if not cls.prefer_async:
        rec.note(f"peer: its own map over the generator with chunksize={chunksize}")

    def timed() -> dict[str, float]:
        gen = (i for i in range(n))
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if s.prefer_async:
                count, total = s.aio(s.astream_sum(tasks.inc, gen, chunksize))
            else:
                count, total = _count_sum(s.stream(tasks.inc, gen, chunksize))
            dt = time.perf_counter() - t0
        check(count == n and total == n * (n + 1) // 2, f"{count} results, sum {total}")
        return {"wall_s": dt, "items_s": n / dt, "rss_growth_mb": rss.growth / MB}

    with opened(cls) as s:
        for _ in range(repeat):
            rec.measure(("wall_s", "items_s", "rss_growth_mb"), timed)


def wl_main(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    from benchmarks.mainfuncs import run_main_cases

    run_main_cases(cls, rec, sizes)


# -- 10 joblib backends -------------------------------------------------------------------
def wl_joblib(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    """joblib with ``backend="orchestra"`` (on the adapter's pool) against ``backend="loky"``:
    a Parallel call of tiny calls, and a scikit-learn grid search. Both backends are warm
    when measured; ``first_call_s`` is the session's first Parallel call (loky starts its
    workers there, orchestra's pool is running already, as after ``%load_ext``)."""
    backend = JOBLIB_BACKENDS.get(cls.key)
    if backend is None:
        rec.set_status("skipped: not a joblib backend")
        return
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    x, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1, 10, 100, 1000], "gamma": [0.001, 0.01, 0.1, 1]}  # 20 candidates
    reference = GridSearchCV(SVC(), grid, cv=5, n_jobs=1).fit(x, y).cv_results_["mean_test_score"]
    n = sizes.joblib_calls
    expected = [i + 1 for i in range(n)]

    with opened(cls) as s:
        if backend == "orchestra":
            import orchestra_nb.joblib  # noqa: F401  (registers the backend)

            def config() -> Any:
                return joblib.parallel_config(backend="orchestra", pool=s.pool)  # type: ignore[attr-defined]  # s is an Orchestra adapter
        else:

            def config() -> Any:
                return joblib.parallel_config(backend=backend)

        def tiny(count: int = n) -> float:
            with config():
                t0 = time.perf_counter()
                out = joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(tasks.inc)(i) for i in range(count))
                dt = time.perf_counter() - t0
            check(out == expected[:count], "Parallel results differ from [i + 1 ...]")
            return dt

        def search() -> dict[str, float]:
            with config():
                t0 = time.perf_counter()
                found = GridSearchCV(SVC(), grid, cv=5, n_jobs=WORKERS).fit(x, y)
                dt = time.perf_counter() - t0
            check(
                list(found.cv_results_["mean_test_score"]) == list(reference),
                "GridSearchCV scores differ from the sequential run",
            )
            return {"gridsearch_s": dt}

        try:
            rec.measure(("first_call_s",), lambda: {"first_call_s": tiny(100)})
            tiny()  # warm-up: code paths, batch-size learning, imports in the workers
            search()
            for _ in range(repeat):
                rec.measure(("tiny_calls_s",), lambda: {"tiny_calls_s": tiny()})
                rec.measure(("gridsearch_s",), search)
        finally:
            if backend == "loky":  # its reusable executor outlives the calls: stop it here
                from joblib.externals.loky import reusable_executor

                executor = getattr(reusable_executor, "_executor", None)
                if executor is not None:
                    executor.shutdown(wait=True, kill_workers=True)


# -- 11 raw limits of the machine --------------------------------------------------------
def wl_raw(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    """Not a system's figure: run once per run (the system is not started)."""
    from benchmarks import raw

    raw.measure(rec, sizes.raw_round_trips, sizes.raw_copy_mb, repeat, timeout=30)


# -- 12 the progress widget in a real kernel ------------------------------------------------
def wl_widget(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    if cls.key != "orchestra":
        rec.set_status("skipped: orchestra only")
        return
    from benchmarks import widget

    widget.measure(rec, sizes.widget_items, sizes.widget_repeat, timeout=sizes.group_timeout_s / 2)


# -- 13 many small maps ---------------------------------------------------------------------
def wl_smallmaps(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    """Interactive exploration: small maps one after the other, each awaited (orchestra) or
    the peer's own ``map`` with its default settings; the figure is the time per map."""
    maps = sizes.small_maps if not cls.slow else max(10, sizes.small_maps // 10)
    if maps != sizes.small_maps:
        rec.note(f"slow system: {maps} maps, not {sizes.small_maps}")
    items = list(range(sizes.small_map_items))
    expected = [x + 1 for x in items]

    async def awaited(s: System) -> None:
        for _ in range(maps):
            out = await s.amap(tasks.inc, items)
            if out != expected:
                check(False, "map results differ from [x + 1 for x in items]")

    def blocking(s: System) -> None:
        for _ in range(maps):
            out = s.map(tasks.inc, items)
            if out != expected:
                check(False, "map results differ from [x + 1 for x in items]")

    def timed() -> dict[str, float]:
        t0 = time.perf_counter()
        if s.prefer_async:
            s.aio(awaited(s))
        else:
            blocking(s)
        dt = time.perf_counter() - t0
        return {"per_map_ms": dt / maps * 1000, "total_s": dt}

    with opened(cls) as s:
        do_map(s, tasks.inc, items, None)  # warm-up
        for _ in range(reps_for(cls, "smallmaps", repeat, rec)):
            rec.measure(("per_map_ms", "total_s"), timed)


# -- 14 one big array used by every item --------------------------------------------------
def worker_processes() -> list[psutil.Process]:
    """This process's descendants, less multiprocessing's and loky's helper processes."""
    from benchmarks.runner import helper_pids

    helpers = helper_pids()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in helpers]


_READ_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?(?:read|readv|pread64|preadv2?|recvfrom|recvmsg)\b.*= (\d+)$")


class SyscallBytes:
    """Bytes the given processes read through read()/recv() (every thread, sockets, pipes
    and files), counted by ``strace`` attached for the duration of the block.

    ``/proc/PID/io`` would be cheaper, but its ``rchar`` leaves out recv() on sockets
    (ZeroMQ's transport) while it counts read() on pipes (multiprocessing's): strace sees
    both alike. It slows the traced processes: never used on a timed run.
    """

    def __init__(self, procs: Sequence[psutil.Process], timeout: float = 30.0) -> None:
        self.pids = [p.pid for p in procs]
        self.timeout = timeout
        self.total = 0

    def __enter__(self) -> SyscallBytes:
        self._dir = tempfile.TemporaryDirectory(prefix="orchestra-bench-strace-")
        self._out = os.path.join(self._dir.name, "trace")
        cmd = [
            "strace",
            "-f",
            "-qq",
            "-s",
            "0",
            "-e",
            "signal=none",
            "-o",
            self._out,
            "-e",
            "trace=read,readv,pread64,preadv,preadv2,recvfrom,recvmsg",
        ]
        for pid in self.pids:
            cmd += ["-p", str(pid)]
        self._strace = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout
        while not self._attached():  # every thread of every process is traced from here on
            if self._strace.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"strace could not attach to {self.pids}")
            time.sleep(0.01)
        return self

    def _attached(self) -> bool:
        for pid in self.pids:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/status") as f:
                        if any(line.startswith("TracerPid:\t0") for line in f):
                            return False
            except OSError:  # that process has gone: nothing more to attach
                continue
        return True

    def _stop(self) -> None:
        if self._strace.poll() is None:
            self._strace.terminate()  # detaches and flushes its output
            try:
                self._strace.wait(self.timeout)
            except subprocess.TimeoutExpired:
                kill_tree(self._strace.pid)

    def __exit__(self, *exc: object) -> None:
        try:
            self._stop()
            with open(self._out) as f:
                self.total = sum(int(m.group(1)) for line in f if (m := _READ_CALL.match(line.strip())))
        finally:
            self._dir.cleanup()


def wl_broadcast(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    """A ``broadcast_mb`` array used by every one of ``broadcast_items`` items (each sums its
    own share of it), captured by the function or passed as the same argument to each.

    Timed runs are plain. "Copies read per worker" comes from one more run of each form with
    ``strace`` on the workers (:class:`SyscallBytes`): the bytes they read through read() and
    recv() (sockets, pipes, files), per worker, over the array's size. Pages of a
    memory-mapped file (loky's memmapping, orchestra's shared-memory segments) are shared
    with the parent, not copied into the worker, and not counted. A fresh pool and a fresh
    array (other values) for each repetition: nothing is reused from the one before.
    """
    import numpy as np

    parts = sizes.broadcast_items
    length = sizes.broadcast_mb * MB // 8
    rec.note(cls.broadcast_how)
    reps = repeat if cls.key in BROADCAST_RECORD else 1
    if reps < repeat:
        rec.note("1 repetition (the comparison of record is orchestra against joblib's memmapping)")
    traced = shutil.which("strace") is not None
    if not traced:
        rec.note("strace is not installed: no copies counted")
    for rep in range(reps + traced):  # the last pool: one traced run of each form
        value = float(rep + 1)
        with opened(cls) as s:
            s.broadcast_warm()
            small = np.ones(parts)  # numpy and the task imported in every worker (their reads)
            for form in s.broadcast_forms:
                s.broadcast(tasks.slice_sum, small, parts, captured=form == "captured")
            big = np.full(length, value)
            expected = [value * (length // parts)] * parts
            _broadcast_once(s, rec, big, parts, expected, count_copies=rep == reps)


def _broadcast_once(
    s: System, rec: Recorder, big: Any, parts: int, expected: list[float], count_copies: bool
) -> None:
    for form in s.broadcast_forms:
        captured = form == "captured"

        def timed(captured: bool = captured, form: str = form) -> dict[str, float]:
            t0 = time.perf_counter()
            out = s.broadcast(tasks.slice_sum, big, parts, captured=captured)
            dt = time.perf_counter() - t0
            check(out == expected, f"the {form} map's sums differ")
            return {f"{form}_s": dt}

        def copies(captured: bool = captured, form: str = form) -> dict[str, float]:
            with SyscallBytes(worker_processes()) as read:
                out = s.broadcast(tasks.slice_sum, big, parts, captured=captured)
            check(out == expected, f"the {form} map's sums differ")
            return {f"{form}_copies": read.total / WORKERS / big.nbytes}

        if count_copies:
            rec.measure((f"{form}_copies",), copies)
        else:
            rec.measure((f"{form}_s",), timed)


# -- 15 realistic CPU work ------------------------------------------------------------------
def wl_montecarlo(cls: type[System], rec: Recorder, sizes: Sizes, repeat: int) -> None:
    """``mc_tasks`` numpy Monte Carlo estimates of ``mc_samples`` each, a fixed amount of
    work for every system. The speedup is against one worker running them one by one: each
    repetition first sends 8 of the tasks one at a time through the same system (their
    median x the task count), then the whole map, so that both see the same workers (their
    allocator settings, for one: orchestra's keep freed memory, which numpy's temporaries
    gain from) and about the same load on a shared machine."""
    samples = sizes.mc_samples
    seeds = list(range(sizes.mc_tasks))
    fn = functools.partial(tasks.monte_carlo, samples=samples)
    reference = {seed: tasks.monte_carlo(seed, samples) for seed in seeds[:2]}

    def timed(rep: int) -> dict[str, float]:
        singles = []
        for seed in seeds[rep * 8 % len(seeds) :][:8]:
            t0 = time.perf_counter()
            reference[seed] = do_call(s, fn, seed)
            singles.append(time.perf_counter() - t0)
        serial = statistics.median(singles) * len(seeds)
        t0 = time.perf_counter()
        out = do_map(s, fn, seeds, 1)
        dt = time.perf_counter() - t0
        check(len(out) == len(seeds), "missing results")
        check(all(out[k] == v for k, v in reference.items()), "the map's estimates differ from the calls'")
        return {"speedup": serial / dt, "parallel_s": dt, "serial_s": serial}

    with opened(cls) as s:
        check(do_map(s, fn, [0, 1], 1) == [reference[0], reference[1]], "estimates differ from this process's")
        for rep in range(reps_for(cls, "montecarlo", repeat, rec)):
            rec.measure(("speedup", "parallel_s", "serial_s"), lambda rep=rep: timed(rep))
        serial = rec.data["metrics"].get("serial_s")
        if serial:
            per_task_ms = statistics.median(serial) / len(seeds) * 1000
            rec.note(f"one task took {per_task_ms:.0f} ms on a worker (alone, median)")


WORKLOAD_FUNCS: dict[str, Workload] = {
    "cold": wl_cold,
    "rtt": wl_rtt,
    "map": wl_map,
    "submit": wl_submit,
    "scaling": wl_scaling,
    "transfer": wl_transfer,
    "lag": wl_lag,
    "main": wl_main,
    "scale": wl_scale,
    "joblib": wl_joblib,
    "raw": wl_raw,
    "widget": wl_widget,
    "smallmaps": wl_smallmaps,
    "broadcast": wl_broadcast,
    "montecarlo": wl_montecarlo,
}
