"""One (system, workload) group, run in its own interpreter.

Started by __main__.py as ``python -c "from benchmarks.runner import cli; cli()" ...`` so that
``__main__`` has no file (as in a notebook kernel) and a crashing peer takes down only this
process. Raw numbers go to the JSON file named by ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

from benchmarks.config import FULL, QUICK
from benchmarks.record import Recorder, short_reason
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOAD_FUNCS, kill_tree


def helper_pids() -> set[int]:
    """Per-interpreter helpers that live until this process exits (they watch a pipe to
    it): multiprocessing's forkserver and resource trackers. Not leaks."""
    pids: set[int] = set()
    try:
        from multiprocessing import forkserver, resource_tracker

        pids.add(getattr(forkserver._forkserver, "_forkserver_pid", None) or 0)
        pids.add(getattr(resource_tracker._resource_tracker, "_pid", None) or 0)
    except ImportError:
        pass
    if "loky" in sys.modules:
        from loky.backend import resource_tracker as loky_tracker

        pids.add(getattr(loky_tracker._resource_tracker, "_pid", None) or 0)
    if "joblib.externals.loky" in sys.modules:  # joblib's own copy of loky
        from joblib.externals.loky.backend import resource_tracker as joblib_tracker

        pids.add(getattr(joblib_tracker._resource_tracker, "_pid", None) or 0)
    return pids


def reap_children(rec: Recorder) -> None:
    """Children still alive after a clean shutdown are a leak: record and kill them."""
    me = psutil.Process()
    helpers = helper_pids()
    children = [p for p in me.children(recursive=True) if p.pid not in helpers]
    if children:
        _, alive = psutil.wait_procs(children, timeout=5)
        if alive:
            names = ", ".join(sorted({p.name() for p in alive if p.is_running()}))
            rec.note(f"leak: {len(alive)} process(es) left after shutdown ({names}); killed")
            for p in alive:
                kill_tree(p.pid)


def cli() -> None:
    ap = argparse.ArgumentParser(prog="benchmarks.runner")
    ap.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    ap.add_argument("--workload", required=True, choices=sorted(WORKLOAD_FUNCS))
    ap.add_argument("--repeat", type=int, required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    cls = SYSTEMS[args.system]
    rec = Recorder(args.out)
    missing = cls.missing()
    if missing:
        rec.set_status(f"skipped: {missing} not installed")
        return
    t0 = time.perf_counter()
    try:
        WORKLOAD_FUNCS[args.workload](cls, rec, QUICK if args.quick else FULL, args.repeat)
    except Exception as exc:  # e.g. the pool did not start: the whole cell failed
        rec.fail("_group", exc)
        rec.set_status("failed: " + short_reason(exc))
    finally:
        reap_children(rec)
        rec.data["elapsed_s"] = time.perf_counter() - t0
        rec.flush()
