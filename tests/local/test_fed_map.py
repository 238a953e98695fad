"""A map fed as it goes (``Pool._open_map``, what the joblib backend runs a call on): items
added later run as they come, the producer's thread sends them itself, and a worker keeps
one long chunk queued behind a running one (the producer keeps only a few in flight)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from localkit import local_core

import orchestra_nb as orchestra
from orchestra_nb.testing import wait_for

HANG_GUARD = 30.0


def wait_release(d: str, i: int) -> int:
    deadline = time.monotonic() + 120
    while not Path(d, "release").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("never released")
        time.sleep(0.005)
    return i


def nap(seconds: float, i: int) -> int:
    time.sleep(seconds)
    return i


def test_items_added_later_run_and_the_input_ends(pool: orchestra.Pool) -> None:
    handle, job, inlet = pool._open_map(nap, name="fed")
    assert inlet.put_many([(0.0, 0), (0.0, 1)])
    pool._input_added(job)
    wait_for(lambda: job.counts[orchestra.TaskState.SUCCEEDED] == 2, timeout=HANG_GUARD)
    assert inlet.put_many([(0.0, 2)])
    pool._input_added(job)
    inlet.end(None)
    assert handle.result(HANG_GUARD) == [0, 1, 2] and handle.total == 3
    assert not inlet.put_many([(0.0, 3)])  # closed with its job


def test_a_worker_keeps_one_long_chunk_queued_behind_a_running_one(
    pool: orchestra.Pool, tmp_path: Path
) -> None:
    d = str(tmp_path)
    handle, job, inlet = pool._open_map(wait_release, name="fed")
    try:
        # Learn how long a task takes (release at once), then feed blocking ones.
        (tmp_path / "release").touch()
        inlet.put_many([(d, 0)])
        pool._input_added(job)
        wait_for(lambda: job.counts[orchestra.TaskState.SUCCEEDED] == 1, timeout=HANG_GUARD)
        os.remove(tmp_path / "release")
        core = local_core(pool)
        core.dispatch.fn_time[job.digest] = 1.0  # "a second each": longer than any short chunk
        inlet.put_many([(d, i) for i in range(1, 7)])
        pool._input_added(job)
        # Both workers run one and hold one more (not all: chunks of one second each).
        wait_for(
            lambda: sorted(len(w.inflight) for w in core.workers.procs.values()) == [2, 2],
            timeout=HANG_GUARD,
            what="a second chunk queued on each worker",
        )
    finally:
        (tmp_path / "release").touch()
        inlet.end(None)
    assert handle.result(HANG_GUARD) == list(range(7))
