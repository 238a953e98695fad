"""A bounded randomised fault run.

``python -m orchestra_nb.testing.fault_run --seconds 60 --seed 1`` (CI: ``.ci/fault-run.sh``).

Many maps run back to back on one pool while a killer thread SIGKILLs random worker pids. The
items themselves mix faults: plain values, exceptions, flaky calls that succeed on retry,
tasks spinning past their timeout (interrupted) and tasks blocked in native code holding the
GIL (their worker killed). At the end it checks that

* every task ended in exactly one final state (no RUNNING / PENDING / RETRYING left, the
  final counts add up to the map's size, nothing CANCELLED);
* every successful result is correct, and every failure is the one expected for its item
  (or ``WorkerCrashedError`` for an item that was itself hit by injected kills);
* no process is left behind;

and prints the counts (tasks, faults injected, recovered, failed as expected, lost = 0).
Exits 1 on any violation. Deterministic for a seed up to the timing of the kills.
"""

from __future__ import annotations

import argparse
import collections
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
TIMEOUT = 0.4


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
    return x * x + 1


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
            f"faults injected={c['faults']} (kills={c['kills']}, raises={c['raise']}, "
            f"flaky={c['flaky']}, timeouts={c['spin'] + c['gil']}) "
            f"recovered={c['recovered']} failed as expected={c['failed_expected']} "
            f"failed by injected kills={c['failed_by_kills']} lost={c['lost']} "
            f"leaked processes={c['leaked']} violations={c['violations']}"
        )


def _killer(pool: Any, rng: random.Random, stop: threading.Event, report: FaultRunReport,
            lock: threading.Lock) -> None:
    from . import kill_pid

    while not stop.wait(rng.uniform(0.1, 0.5)):  # pacing of the faults, not synchronisation
        try:
            pids = pool.worker_pids()
        except Exception:
            return
        if pids and kill_pid(rng.choice(pids), signal.SIGKILL):
            with lock:
                report.counts["kills"] += 1
                report.counts["faults"] += 1


def run(
    seconds: float = 60.0, seed: int = 0, workers: int = 3, verbose: bool = True
) -> FaultRunReport:
    import psutil

    from .. import Pool, RetryPolicy, TaskState, TaskTimeoutError, WorkerCrashedError

    rng = random.Random(seed)
    report = FaultRunReport()
    lock = threading.Lock()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    workdir = tempfile.mkdtemp(prefix="orchestra-fault-run-")
    pool = Pool(workers=workers, max_worker_crashes=3, timeout_grace=0.3,
                retry_random=random.Random(seed + 1).random, stall_timeout=None)
    stop = threading.Event()
    killer = threading.Thread(target=_killer, args=(pool, random.Random(seed + 2), stop, report,
                                                    lock), daemon=True)
    retry = RetryPolicy(retries=2, backoff=0.005, max_backoff=0.05, retry_on=(ConnectionError,))
    deadline = time.monotonic() + seconds
    try:
        pool.wait_started(timeout=60)
        killer.start()
        m = 0
        while time.monotonic() < deadline:
            m += 1
            timed = rng.random() < 0.3
            n = rng.randint(5, 40) if timed else rng.randint(50, 2000)
            weights = [90, 4, 4, 1.5, 0.5] if timed else [92, 4, 4, 0, 0]
            kinds = rng.choices([OK, RAISE, FLAKY, SPIN, GIL], weights, k=n)
            specs = [(k, i, os.path.join(workdir, f"m{m}-{i}")) for i, k in enumerate(kinds)]
            handle = pool.map(fault_task, specs, timeout=TIMEOUT if timed else None,
                              retries=retry, return_exceptions=True)
            results = handle.result(timeout=120)
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
                injected = "from outside the pool"
                if isinstance(result, WorkerCrashedError) and injected in str(result):
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
    if verbose:
        print(report.summary(), flush=True)
        for v in report.violations:
            print("  VIOLATION:", v, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    report = run(args.seconds, args.seed, args.workers)
    ok = not report.violations and report.counts["lost"] == 0 and report.counts["leaked"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
