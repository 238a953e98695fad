"""Run directories (issue 15): owned through a lock that any pool on the machine can check,
also from another PID namespace; removed when the pool's process is terminated (SIGTERM) or,
after a SIGKILL, by the next pool."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

import orchestra_nb as orchestra
from orchestra_nb.testing import wait_for

HANG_GUARD = 60.0


def all_gone(pids: list[int]) -> bool:
    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return bool(wait_for(lambda: all(gone(p) for p in pids), HANG_GUARD, what="workers gone"))


def unused_pid() -> int:
    """A pid no process has here: what a live pool of another PID namespace looks like."""
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def holder(run_dir: Path) -> subprocess.Popen[bytes]:
    """A process that makes ``run_dir`` and holds its owner lock (flock) until its stdin
    closes, like a live pool; ready once it printed. (Made just before the sweep under
    test: pools of older versions elsewhere on the machine would sweep it by its pid.)"""
    code = textwrap.dedent(f"""
        import fcntl, os, sys
        os.mkdir({str(run_dir)!r}, 0o700)
        fd = os.open({str(run_dir / "owner.lock")!r}, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"locked\n"
    return proc


def test_a_live_pool_of_another_pid_namespace_keeps_its_run_directory() -> None:
    other = Path(f"/dev/shm/orchestra-{unused_pid()}-test{os.getpid()}")
    proc = holder(other)
    try:
        with orchestra.Pool(workers=1) as pool:  # its start sweeps dead pools' directories
            pool.wait_started(timeout=HANG_GUARD)
            assert other.is_dir(), "the sweep deleted a live pool's run directory"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=HANG_GUARD)
    # Its owner is gone now (as after a SIGKILL): the next pool sweeps it.
    with orchestra.Pool(workers=1) as pool:
        pool.wait_started(timeout=HANG_GUARD)
    assert not other.exists()


PARENT = """
import os, signal, sys, time
import orchestra_nb as orchestra
if sys.argv[1] == "handler":
    def on_term(signum, frame):
        print("handler ran", flush=True)
        sys.exit(7)
    signal.signal(signal.SIGTERM, on_term)
pool = orchestra.Pool(workers=2)
pool.wait_started(timeout=60)
held = pool.run(bytes, 8 * 2**20).result(timeout=60)  # a result in shared memory, kept
print(" ".join(str(w.pid) for w in pool.statistics().workers), flush=True)
time.sleep(600)
"""


def run_parent(mode: str) -> tuple[subprocess.Popen[bytes], list[int], set[str]]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the parent died before its pool started"
    workers = [int(pid) for pid in line.split()]
    return proc, workers, set(glob.glob(f"/dev/shm/orchestra-{proc.pid}-*"))


def test_sigterm_of_the_pools_process_cleans_up_like_an_exit() -> None:
    proc, workers, dirs = run_parent("plain")
    assert len(dirs) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_GUARD) == -signal.SIGTERM  # still ended by the signal
    assert not any(os.path.exists(d) for d in dirs)
    assert all_gone(workers)


def test_sigterm_runs_the_programs_own_handler_and_still_cleans_up() -> None:
    proc, workers, dirs = run_parent("handler")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=HANG_GUARD) == 7  # the program's handler decided the exit
    assert proc.stdout is not None and proc.stdout.read() == b"handler ran\n"
    assert not any(os.path.exists(d) for d in dirs)
    assert all_gone(workers)
