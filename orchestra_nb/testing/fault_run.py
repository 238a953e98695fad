"""A bounded randomised fault run.

``python -m orchestra_nb.testing.fault_run --seconds 60 --seed 1`` (CI: ``.ci/fault-run.sh``).

Many maps run back to back on one pool while a killer thread SIGKILLs random worker pids,
SIGSTOPs some (the pool replaces a stopped worker after its stall timeout), and makes some
respawns fail for lack of descriptors (the soft RLIMIT_NOFILE lowered for a moment). The
items themselves mix faults: plain values, exceptions, flaky calls that succeed on retry,
tasks spinning past their timeout (interrupted), tasks blocked in native code holding the
GIL (their worker killed), tasks raising KeyboardInterrupt or SystemExit (TaskExitError),
results that cannot be unpickled (SerializationError) and results that shared memory cannot
hold (a file size limit, as a full /dev/shm: they travel inline). Between maps come bursts
of ``run()`` calls with one of them cancelled, and maps over slow and raising generators.
At the end it checks that

* every task ended in exactly one final state (no RUNNING / PENDING / RETRYING left, the
  final counts add up to the map's size, nothing CANCELLED);
* every successful result is correct, and every failure is the one expected for its item
  (or ``WorkerCrashedError`` for an item that was itself hit by injected kills);
* every handle of a burst is final, the cancelled one cancelled (or done before the cancel);
* no handle hangs (each has a generous hang guard);
* no process, thread or open file is left behind;

and prints the counts (tasks, faults per kind, recovered, failed as expected, lost = 0,
hung = 0, leaked processes, files and threads = 0).
Exits 1 on any violation. Deterministic for a seed up to the timing of the kills.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["FaultRunReport", "fault_task", "run"]

OK, RAISE, FLAKY, SPIN, GIL = "ok", "raise", "flaky", "spin", "gil"
INTERRUPT, EXIT, UNPICKLABLE, SHM_FULL = "interrupt", "exit", "unpicklable", "shm_full"
TIMEOUT = 0.4
HANG_GUARD = 120.0
SHM_FULL_BYTES = 4 * 2**20


def fault_task(spec: tuple[str, int, str]) -> int:
    """The task of the fault run: behaves as ``spec[0]`` says, on value ``spec[1]``."""
    kind, x, marker = spec
    if kind == RAISE:
        raise ValueError(f"expected failure {x}")
    if kind == FLAKY and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        raise ConnectionError(f"flaky {x}")
    if kind == SPIN:
        while True:
            pass
    if kind == GIL:
        from . import hold_gil_sleep

        hold_gil_sleep(30)
    if kind == INTERRUPT:
        raise KeyboardInterrupt(f"task {x}")
    if kind == EXIT:
        raise SystemExit(x)
    if kind == UNPICKLABLE:
        from . import RaiseAtUnpickle

        return RaiseAtUnpickle(f"unpicklable {x}")  # type: ignore[return-value]
    if kind == SHM_FULL:
        import resource

        import numpy as np

        # Shared-memory files of this worker can no longer grow past 1 MiB (EFBIG: what a
        # full /dev/shm gives as ENOSPC): this result, and its later big ones, go inline.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))
        return int(np.full(SHM_FULL_BYTES, 1, dtype=np.uint8).sum()) and x * x + 1
    return x * x + 1


def big_result(x: int) -> Any:
    import numpy as np

    return np.full(SHM_FULL_BYTES, x % 251, dtype=np.uint8)


def slow_items(n: int, delay: float, fail_at: int | None = None) -> Any:
    """A generator yielding ``0..n-1`` slowly, raising ``LookupError`` at ``fail_at``."""
    for i in range(n):
        if i == fail_at:
            raise LookupError(f"input failed at {i}")
        time.sleep(delay)
        yield (OK, i, "")


class FaultRunReport:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []

    def violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(text)
        self.counts["violations"] += 1

    def summary(self) -> str:
        c = self.counts
        return (
            f"fault run: maps={c['maps']} tasks={c['tasks']} succeeded={c['succeeded']} "
            f"faults injected={c['faults']} (kills={c['kills']}, stops={c['stops']}, "
            f"respawn failures={c['emfile']}, raises={c['raise']}, flaky={c['flaky']}, "
            f"timeouts={c['spin'] + c['gil']}, interrupts={c['interrupt']}, "
            f"exits={c['exit']}, unpicklable={c['unpicklable']}, shm full={c['shm_full']}, "
            f"burst cancels={c['burst_cancels']}, slow inputs={c['slow_inputs']}, "
            f"raising inputs={c['raising_inputs']}) "
            f"recovered={c['recovered']} failed as expected={c['failed_expected']} "
            f"failed by injected kills={c['failed_by_kills']} lost={c['lost']} "
            f"hung={c['hung']} leaked processes={c['leaked']} leaked files={c['leaked_files']} "
            f"leaked threads={c['leaked_threads']} violations={c['violations']}"
        )


def _killer(pool: Any, rng: random.Random, stop: threading.Event, report: FaultRunReport,
            lock: threading.Lock) -> None:
    from . import kill_pid

    while not stop.wait(rng.uniform(0.1, 0.5)):  # pacing of the faults, not synchronisation
        try:
            pids = pool.worker_pids()
        except Exception:
            return
        if not pids:
            continue
        roll = rng.random()
        if roll < 0.1:
            _stop_one(rng.choice(pids), report, lock)
        elif roll < 0.2:
            _fail_respawn(pool, rng.choice(pids), report, lock)
        elif kill_pid(rng.choice(pids), signal.SIGKILL):
            with lock:
                report.counts["kills"] += 1
                report.counts["faults"] += 1


def _stop_one(pid: int, report: FaultRunReport, lock: threading.Lock) -> None:
    from . import stop_pid

    if stop_pid(pid):  # replaced after the stall timeout; its SIGKILL ends the stop
        with lock:
            report.counts["stops"] += 1
            report.counts["faults"] += 1


def _fail_respawn(pool: Any, pid: int, report: FaultRunReport, lock: threading.Lock) -> None:
    """Kill ``pid`` while this process has almost no descriptors left: its respawn fails
    (WorkerSpawnFailed) until the limit is back, a moment later."""
    import resource

    from . import kill_pid

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, used + 8), hard))
    try:
        if kill_pid(pid, signal.SIGKILL):
            with lock:
                report.counts["emfile"] += 1
                report.counts["faults"] += 1
            time.sleep(0.3)  # the length of the shortage, not a synchronisation
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(
    seconds: float = 60.0, seed: int = 0, workers: int = 3, verbose: bool = True,
    raising_inputs: bool = True, min_maps: int = 0,
) -> FaultRunReport:
    """Run maps with injected faults for ``seconds``, and on until ``min_maps`` maps have
    run (a loaded machine runs fewer in the same time; the caller bounds the wait)."""
    import psutil

    from .. import (
        Pool,
        RetryPolicy,
        SerializationError,
        TaskExitError,
        TaskState,
        TaskTimeoutError,
        WorkerCrashedError,
    )

    rng = random.Random(seed)
    report = FaultRunReport()
    lock = threading.Lock()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    threads_before = set(threading.enumerate())
    files_before = open_files()
    workdir = tempfile.mkdtemp(prefix="orchestra-fault-run-")
    pool = Pool(workers=workers, max_worker_crashes=3, timeout_grace=0.3,
                retry_random=random.Random(seed + 1).random, heartbeat=0.1, stall_timeout=1.0)
    stop = threading.Event()
    killer = threading.Thread(target=_killer, args=(pool, random.Random(seed + 2), stop, report,
                                                    lock), daemon=True)
    retry = RetryPolicy(retries=2, backoff=0.005, max_backoff=0.05, retry_on=(ConnectionError,))
    deadline = time.monotonic() + seconds
    try:
        pool.wait_started(timeout=60)
        killer.start()
        m = 0
        while time.monotonic() < deadline or m < min_maps:
            m += 1
            timed = rng.random() < 0.3
            n = rng.randint(5, 40) if timed else rng.randint(50, 2000)
            weights = ([88, 4, 4, 1.5, 0.5, 0.5, 0.5, 0.5, 0.5] if timed
                       else [90, 4, 4, 0, 0, 0.5, 0.5, 0.5, 0.1])
            kinds = rng.choices([OK, RAISE, FLAKY, SPIN, GIL, INTERRUPT, EXIT, UNPICKLABLE,
                                 SHM_FULL], weights, k=n)
            specs = [(k, i, os.path.join(workdir, f"m{m}-{i}")) for i, k in enumerate(kinds)]
            handle = pool.map(fault_task, specs, timeout=TIMEOUT if timed else None,
                              retries=retry, return_exceptions=True)
            try:
                results = handle.result(timeout=HANG_GUARD)
            except TimeoutError:
                report.counts["hung"] += 1
                report.violation(f"map {m}: not finished within {HANG_GUARD} s")
                handle.cancel()
                break
            _side_work(pool, rng, m, report, raising_inputs)
            counts = handle.counts()
            report.counts["maps"] += 1
            report.counts["tasks"] += n
            for state in (TaskState.PENDING, TaskState.RUNNING, TaskState.RETRYING,
                          TaskState.CANCELLED):
                if counts[state]:
                    report.violation(f"map {m}: {counts[state]} tasks left {state.name}")
            final = counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED]
            if final != n or len(results) != n:
                report.counts["lost"] += n - final
                report.violation(f"map {m}: {final} final states for {n} tasks")
            for (kind, x, _), result in zip(specs, results, strict=False):
                if kind != OK:
                    report.counts[kind] += 1
                    report.counts["faults"] += 1
                if isinstance(result, WorkerCrashedError) and _injected(result):
                    # This very item was running when injected kills hit its worker 3 times.
                    report.counts["failed_by_kills"] += 1
                    continue
                if kind in (OK, FLAKY):
                    if result != x * x + 1:
                        report.violation(f"map {m} item {x} ({kind}): wrong result {result!r}")
                    else:
                        report.counts["succeeded"] += 1
                        report.counts["recovered"] += kind == FLAKY
                elif kind == RAISE:
                    if isinstance(result, ValueError) and str(result) == f"expected failure {x}":
                        report.counts["failed_expected"] += 1
                    else:
                        report.violation(f"map {m} item {x}: expected ValueError, got {result!r}")
                elif kind in (INTERRUPT, EXIT):
                    if isinstance(result, TaskExitError):
                        report.counts["failed_expected"] += 1
                    else:
                        report.violation(f"map {m} item {x} ({kind}): expected TaskExitError, "
                                         f"got {result!r}")
                elif kind == UNPICKLABLE:
                    if isinstance(result, SerializationError):
                        report.counts["failed_expected"] += 1
                    else:
                        report.violation(f"map {m} item {x}: expected SerializationError, "
                                         f"got {result!r}")
                elif kind == SHM_FULL:
                    if result == x * x + 1:
                        report.counts["succeeded"] += 1
                    else:
                        report.violation(f"map {m} item {x} (shm_full): wrong result {result!r}")
                elif isinstance(result, TaskTimeoutError):  # SPIN, GIL
                    report.counts["failed_expected"] += 1
                else:
                    report.violation(f"map {m} item {x} ({kind}): expected a timeout, "
                                     f"got {result!r}")
    finally:
        stop.set()
        killer.join(timeout=10)
        pool.shutdown(cancel_pending=True)
        # Kills recovered: every kill was followed by a replacement (the maps completed).
        report.counts["recovered"] += report.counts["kills"]
        new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        _, alive = psutil.wait_procs(new, timeout=5)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        report.counts["leaked"] = len(alive)
        for p in alive:
            report.violation(f"process {p.pid} left alive")
            p.kill()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        report.counts["leaked_threads"] = len(_settle(
            lambda: [t for t in set(threading.enumerate()) - threads_before
                     if t.is_alive() and not t.name.startswith(("orchestra-io", "orchestra-events"))
                     and type(t).__name__ != "GarbageCollectorThread"]))
        report.counts["leaked_files"] = len(_settle(lambda: open_files() - files_before))
        for kind in ("leaked_threads", "leaked_files"):
            if report.counts[kind]:
                report.violation(f"{report.counts[kind]} {kind.replace('_', ' ')}")
    if verbose:
        print(report.summary(), flush=True)
        for v in report.violations:
            print("  VIOLATION:", v, flush=True)
    return report


def _side_work(pool: Any, rng: random.Random, m: int, report: FaultRunReport,
               raising_inputs: bool) -> None:
    """Between maps: a burst of run() calls with one cancelled, or a map over a slow or a
    raising generator; each must end (no hang) with the outcome its input implies."""
    from .. import TaskState, WorkerCrashedError

    roll = rng.random()
    if roll < 0.25:
        handles = [pool.run(fault_task, (OK, i, "")) for i in range(rng.choice((50, 200)))]
        victim = rng.randrange(len(handles))
        handles[victim].cancel()
        report.counts["burst_cancels"] += 1
        report.counts["faults"] += 1
        for i, h in enumerate(handles):
            try:
                value = h.result(timeout=HANG_GUARD)
            except TimeoutError:
                report.counts["hung"] += 1
                report.violation(f"burst after map {m}: call {i} hung")
                continue
            except BaseException as exc:
                if i == victim and h.cancelled():
                    continue
                report.counts["tasks"] += 1
                if isinstance(exc, WorkerCrashedError) and _injected(exc):
                    report.counts["failed_by_kills"] += 1
                else:
                    report.violation(f"burst after map {m}: call {i} raised {exc!r}")
                continue
            report.counts["tasks"] += 1
            if value == i * i + 1:
                report.counts["succeeded"] += 1
            else:
                report.violation(f"burst after map {m}: call {i} gave {value!r}")
    elif roll < 0.35:
        fail_at = rng.choice((None, 7)) if raising_inputs else None
        kind = "slow_inputs" if fail_at is None else "raising_inputs"
        report.counts[kind] += 1
        report.counts["faults"] += 1
        handle = pool.map(fault_task, slow_items(20, 0.002, fail_at), return_exceptions=True)
        try:
            results = handle.result(timeout=HANG_GUARD)
        except TimeoutError:
            report.counts["hung"] += 1
            report.violation(f"generator map after map {m}: hung")
            return
        except LookupError:
            if fail_at is None:
                report.violation(f"generator map after map {m}: a slow input failed")
            return
        if fail_at is not None and len(results) > fail_at:
            report.violation(f"generator map after map {m}: read past its failing input")
        counts = handle.counts()
        if counts[TaskState.RUNNING] or counts[TaskState.PENDING]:
            report.violation(f"generator map after map {m}: tasks left unfinished")
        for i, value in enumerate(results):
            report.counts["tasks"] += 1
            if value == i * i + 1:
                report.counts["succeeded"] += 1
            else:
                report.violation(f"generator map after map {m}: item {i} gave {value!r}")


def _injected(exc: BaseException) -> bool:
    """A crash of this very item's workers by the injected kills (and stops)."""
    return any(s in str(exc) for s in ("from outside the pool", "no heartbeat"))


def open_files() -> set[str]:
    """This process's open regular files and directories (not pipes, sockets, epolls):
    the leak checks of the fault run and of the test suite."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith("/") and not target.startswith("/dev/"):
                    found.add(f"{fd} -> {target}")
    return found


def _settle(check: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    left = check()
    while left and time.monotonic() < deadline:
        time.sleep(0.01)  # things close asynchronously: a bounded wait for them
        left = check()
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--no-raising-inputs", action="store_true",
                        help="leave out maps over generators that raise")
    args = parser.parse_args(argv)
    report = run(args.seconds, args.seed, args.workers,
                 raising_inputs=not args.no_raising_inputs)
    c = report.counts
    ok = not report.violations and not (c["lost"] or c["hung"] or c["leaked"]
                                        or c["leaked_files"] or c["leaked_threads"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
