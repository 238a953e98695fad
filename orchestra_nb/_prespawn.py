"""Worker processes started before their pool exists (layer 2), so that a pool's start
overlaps the workers' interpreter start and imports with the parent's own.

A worker spends most of its start-up (tens of milliseconds) starting Python and importing
its modules before it reads its configuration from stdin; the parent, meanwhile, imports
the engine (ZeroMQ, the pool), starts its I/O thread and binds its sockets. Started one
after the other, the two add up: ``backends.create`` therefore starts the workers of a
plain local pool (default environment and interpreter) first, with :func:`prespawn`, and
:func:`claim` hands them to ``_procs.spawn_worker``, which sends the configuration as to a
worker it started itself. What the pool does not claim is killed (:func:`discard`).

Only stdlib imports here: this module is loaded before the engine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

__all__ = ["claim", "discard", "popen_worker", "prespawn", "worker_environ"]

# Above the glibc mmap threshold every allocation is mapped afresh and unmapped on free;
# workers keep this much freed memory in their heap instead (see _procs.spawn_worker).
KEEP_FREED_BYTES = 256 * 2**20

_lock = threading.Lock()
_waiting: list[tuple[subprocess.Popen[bytes], str, dict[str, str]]] = []  # (proc, python, environ)


def worker_environ(env: tuple[tuple[str, str], ...] | dict[str, str] = (), threads: int = 1) -> dict[str, str]:
    """The environment of a worker process: this one's, with the package importable, BLAS
    limited to ``threads`` threads, the allocator settings, and the pool's ``env``."""
    environ = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, environ.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        environ.setdefault(var, str(threads))  # N workers x N BLAS threads would oversubscribe
    # Pool(env={...}) overrides these; what the parent inherited does not (importing
    # distributed sets MALLOC_TRIM_THRESHOLD_ for its own workers in os.environ).
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        environ[var] = str(KEEP_FREED_BYTES)
    environ.update(dict(env))
    return environ


def popen_worker(python: str, environ: dict[str, str], out: int | object) -> subprocess.Popen[bytes]:
    """``python -m orchestra_nb._worker`` in its own session, stdin a pipe, output to ``out``."""
    return subprocess.Popen(
        [python, "-m", "orchestra_nb._worker"],
        stdin=subprocess.PIPE,
        stdout=out,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the kernel's SIGINT to its process group skips us
        close_fds=True,
        env=environ,
    )


def prespawn(count: int) -> None:
    """Start ``count`` workers of a local pool with default options, ahead of the pool.

    Only from the main thread: a worker asks to be killed when the *thread* that started
    it ends (PR_SET_PDEATHSIG), and only the main thread lives as long as the process.
    Their output goes nowhere until their configuration names their log file; one that
    fails before that exits, is not claimed, and the pool starts another, logged."""
    if count < 1 or threading.current_thread() is not threading.main_thread():
        return
    environ = worker_environ()
    started = []
    try:
        for _ in range(count):
            started.append((popen_worker(sys.executable, environ, subprocess.DEVNULL), sys.executable, environ))
    except OSError:  # out of processes or descriptors: the pool will say so, starting its own
        pass
    with _lock:
        _waiting.extend(started)


def claim(python: str, environ: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """A waiting worker started with this interpreter and environment, still alive."""
    with _lock:
        for i, (proc, its_python, its_environ) in enumerate(_waiting):
            if its_python == python and its_environ == environ and proc.poll() is None:
                del _waiting[i]
                return proc
    return None


def discard() -> None:
    """Kill the workers nobody claimed (the pool started fewer, or failed to start)."""
    with _lock:
        left = [proc for proc, _python, _environ in _waiting]
        _waiting.clear()
    for proc in left:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        proc.wait()
