"""Respawning survives failures (issue 15): a worker start that fails is retried with
backoff for as long as the pool is open, and workers killed from outside while starting are
crashes, not a broken environment."""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import orchestra_nb as orchestra
from orchestra_nb import WorkerExited, WorkerSpawnFailed, WorkerStarted, WorkerState
from orchestra_nb.testing import EventRecorder, kill_pid, wait_for

HANG_GUARD = 60.0


def square(x: int) -> int:
    return x * x


def ready_pids(pool: orchestra.Pool) -> list[int]:
    return [w.pid for w in pool.statistics().workers if w.state == WorkerState.READY]


def test_a_respawn_failing_for_lack_of_descriptors_is_retried_until_it_works() -> None:
    pool = orchestra.Pool(workers=1)
    try:
        pool.wait_started(timeout=HANG_GUARD)
        (pid,) = ready_pids(pool)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with EventRecorder(pool, (WorkerSpawnFailed, WorkerStarted, WorkerExited)) as rec:
            # Every descriptor this process may open is taken: the two the dead worker frees
            # (its pidfd and stdin pipe) leave no room for a new worker's pipes and log file.
            fillers: list[int] = []
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            try:
                with contextlib.suppress(OSError):
                    while True:
                        fillers.append(os.open(os.devnull, os.O_RDONLY))
                kill_pid(pid, signal.SIGKILL)
                _, failed = rec.wait(lambda e: isinstance(e, WorkerSpawnFailed), timeout=HANG_GUARD)
                assert "Too many open files" in failed.error, failed
                assert failed.alive == 0 and failed.target == 1
                assert pool.statistics().spawn_error == failed.error
                # Still failing: the pool keeps trying (a second failure is announced).
                rec.wait(lambda e: isinstance(e, WorkerSpawnFailed) and e is not failed,
                         timeout=HANG_GUARD)
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            rec.wait(lambda e: isinstance(e, WorkerStarted) and e.pid != pid, timeout=HANG_GUARD)
        assert pool.map(square, range(20)).result(timeout=HANG_GUARD) == [x * x for x in range(20)]
        assert pool.statistics().spawn_error is None
    finally:
        pool.shutdown()


def test_a_deleted_run_directory_is_made_again_for_new_workers() -> None:
    before = set(glob.glob(f"/dev/shm/orchestra-{os.getpid()}-*"))
    pool = orchestra.Pool(workers=1)
    try:
        pool.wait_started(timeout=HANG_GUARD)
        (run_dir,) = set(glob.glob(f"/dev/shm/orchestra-{os.getpid()}-*")) - before
        (pid,) = ready_pids(pool)
        shutil.rmtree(run_dir)  # what another machine's sweep did to live pools
        with EventRecorder(pool, (WorkerStarted,)) as rec:
            kill_pid(pid, signal.SIGKILL)
            rec.wait(lambda e: e.pid != pid, timeout=HANG_GUARD)
        assert pool.map(square, range(20)).result(timeout=HANG_GUARD) == [x * x for x in range(20)]
        assert os.path.isdir(run_dir)
    finally:
        pool.shutdown()
    assert not os.path.exists(run_dir)


def test_workers_killed_from_outside_before_their_handshake_do_not_break_the_pool(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    python = tmp_path / "slow-python"
    # Holds every worker before its interpreter starts until the test opens the gate.
    python.write_text(f'#!/bin/sh\nwhile [ ! -e "{gate}" ]; do sleep 0.01; done\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    pool = orchestra.Pool(workers=1, python=str(python))
    try:
        killed: list[int] = []
        with EventRecorder(pool, (WorkerExited,)) as rec:
            for _ in range(5):  # more than the 3 start failures that break a pool
                pid = wait_for(lambda: next(
                    (w.pid for w in pool.statistics().workers
                     if w.state == WorkerState.STARTING and w.pid not in killed), None),
                    HANG_GUARD, what="a starting worker")
                kill_pid(pid, signal.SIGKILL)
                killed.append(pid)
                rec.wait(lambda e, pid=pid: e.pid == pid, timeout=HANG_GUARD)
        assert pool.state == "running"
        gate.touch()
        pool.wait_started(timeout=HANG_GUARD)
        assert pool.map(square, range(5)).result(timeout=HANG_GUARD) == [0, 1, 4, 9, 16]
    finally:
        gate.touch()
        pool.shutdown()


OUT_OF_DESCRIPTORS = """
import errno, glob, os, resource
import orchestra_nb as orchestra
with orchestra.Pool(workers=1) as warm:  # the I/O thread's descriptors exist from here on
    warm.wait_started(timeout=60)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
before = sorted(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (24, hard))
try:
    orchestra.Pool(workers=4).wait_started(timeout=60)
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
    print("raised:", exc)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert sorted(os.listdir("/proc/self/fd")) == before, "descriptors leaked"
assert not glob.glob(f"/dev/shm/orchestra-{os.getpid()}-*"), "run directory left"
with orchestra.Pool(workers=2) as pool:
    assert pool.map(abs, range(-3, 0)).result(timeout=60) == [3, 2, 1]
print("ok")
"""


def test_a_pool_out_of_descriptors_at_start_leaves_nothing_and_the_next_pool_works() -> None:
    done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS], capture_output=True,
                          timeout=HANG_GUARD * 2,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    out = done.stdout.decode()
    assert done.returncode == 0, (done.returncode, out, done.stderr.decode()[-3000:])
    assert "raised: [Errno 24] Too many open files" in out
    assert out.endswith("ok\n")
