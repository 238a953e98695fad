"""Worker processes as the pool sees them (layer 2): spawning, the run directory, exits.

:class:`WorkerProc` is the pool's record of one worker process. :func:`spawn_worker` starts
one (its configuration, with the pool's key, goes on stdin), :class:`RunDir` creates the
pool's private run directory (after sweeping those of dead pools), and :func:`crash_cause`
explains an exit. Nothing here touches a job's task tables: that stays with the engine
(``_pool`` and its parts; ``_pool_workers.WorkerSet`` owns the processes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _protocol as proto
from ._jobs import Chunk
from ._prespawn import claim, popen_worker, worker_environ
from ._state import WorkerState

__all__ = [
    "RunDir",
    "WorkerProc",
    "check_descriptors",
    "crash_cause",
    "delete_worker_buffers",
    "install_sigterm_cleanup",
    "oom_kill_count",
    "register_run_dir",
    "spawn_worker",
    "unregister_run_dir",
]


class WorkerProc:
    def __init__(self, worker_id: int, proc: subprocess.Popen[bytes], log_path: str, ident: bytes) -> None:
        self.id = worker_id
        self.ident = ident
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.state = WorkerState.STARTING  # -> READY -> STOPPING -> DEAD
        self.inflight: collections.deque[Chunk] = collections.deque()
        self.assigned: collections.deque[Chunk] = collections.deque()  # must run here, first
        self.functions: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.started = time.monotonic()
        self.last_seen = self.started
        self.stalled = False
        self.tasks_done = 0
        self.kill_kind: str | None = None  # "timeout", "cancel", "memory", "stall", "close"
        self.kill_reason = ""
        self.retire = False  # stop once idle (resize, recycling)
        self.timers: list[asyncio.TimerHandle] = []
        self.pidfd: int | None = None
        self.held: set[str] = set()  # the pool's argument segments this worker may map
        self.spill: proto.Spill | None = None  # where its messages above the frame limit go
        self.sys_path_version = 0  # of the pool's sys.path this worker has (see WorkerSet)
        self.oom_kills = oom_kill_count()  # to tell the OOM killer from a kill -9 later
        self._ps: Any = None  # psutil.Process, made by the first sample()

    def sample(self) -> tuple[float | None, int | None]:
        """(CPU percent since the last sample, resident bytes), None where unknown."""
        import psutil

        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
                self._ps.cpu_percent(None)
            with self._ps.oneshot():
                return self._ps.cpu_percent(None), self._ps.memory_info().rss
        except psutil.Error:
            return None, None

    @property
    def running_chunk(self) -> Chunk | None:
        return self.inflight[0] if self.inflight else None

    def kill(self, kind: str, reason: str) -> None:
        """SIGKILL the process; the first ``kind`` and ``reason`` given are the ones kept."""
        if self.state == "dead":
            return
        if self.kill_kind is None:
            self.kill_kind, self.kill_reason = kind, reason
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close_stdin(self) -> None:
        """Its EOF tells the worker that the pool is done with it."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


START_DESCRIPTORS = 32  # free descriptors a pool needs to start (context, sockets, first workers)
WORKER_DESCRIPTORS = 12  # ... and to start one more worker (pipes, pidfd, its connections)


def check_descriptors(needed: int, what: str) -> None:
    """Raise EMFILE unless ``needed`` more descriptors can be opened.

    ZeroMQ's I/O thread aborts the whole process when it cannot accept a connection for
    lack of descriptors (a dead kernel, in a notebook): so the pool never starts a worker,
    whose connections it would have to accept, without room for them.
    """
    import resource

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir used
    except OSError:
        return
    if soft - used < needed:
        raise OSError(
            errno.EMFILE,
            f"Too many open files: {used} of this process's limit of "
            f"{soft} are open, and {what} needs {needed} more "
            "(ulimit -n raises the limit)",
        )


def spawn_worker(
    worker_id: int,
    run_dir: str,
    key: bytes,
    shm_dir: str | None,
    *,
    python: str,
    env: tuple[tuple[str, str], ...],
    threads: int,
    heartbeat: float,
    max_result_bytes: int | None,
    busy_poll: float,
    sys_path: list[str] | None = None,
) -> WorkerProc:
    """Start worker ``worker_id`` (``python -m orchestra_nb._worker``) in its own session."""
    check_descriptors(WORKER_DESCRIPTORS, "starting a worker")
    # Unpredictable: a process of the same user cannot connect under a worker's name.
    ident = f"w{worker_id}-{secrets.token_hex(8)}"
    config = {
        "worker_id": worker_id,
        "ident": ident,
        "key": key.hex(),
        "data_addr": f"ipc://{run_dir}/data",
        "ctrl_addr": f"ipc://{run_dir}/ctrl",
        "run_dir": run_dir,
        "parent_pid": os.getpid(),
        "sys_path": sys.path if sys_path is None else sys_path,
        "cwd": os.getcwd(),
        "shm_dir": shm_dir,
        "heartbeat": heartbeat,
        "max_result_bytes": max_result_bytes,
        "busy_poll": busy_poll,
    }
    environ = worker_environ(env, threads)
    log_path = os.path.join(run_dir, f"worker-{worker_id}.log")
    proc = claim(python, environ)  # started ahead of the pool (see _prespawn)
    if proc is not None:
        config["log_path"] = log_path  # it sends its output there from now on
        open(log_path, "wb").close()  # (created here, as for the others)
    else:
        with open(log_path, "wb") as log:
            proc = popen_worker(python, environ, log)
    assert proc.stdin is not None
    # The key travels on stdin, never in argv or the environment. stdin stays open:
    # its EOF tells the worker that the pool is gone.
    with contextlib.suppress(BrokenPipeError):  # died at once: its pidfd will tell
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
    return WorkerProc(worker_id, proc, log_path, ident.encode())


def crash_cause(w: WorkerProc, returncode: int) -> str:
    """Why ``w`` most likely died with ``returncode`` (for ``WorkerCrashedError``)."""
    if w.kill_reason:
        return w.kill_reason
    if returncode == -signal.SIGKILL:
        if oom_kill_count() > w.oom_kills:
            return (
                "killed by the kernel's OOM killer: the machine ran out of memory; "
                "memory_limit= lets the pool stop a worker before that happens"
            )
        return "killed by SIGKILL from outside the pool (a kill -9, or the OOM killer)"
    if returncode == -signal.SIGSEGV:
        return "a segmentation fault, usually in native code"
    if returncode == -signal.SIGABRT:
        return "aborted, usually a failed assertion in native code"
    return "the worker process exited during the task"


def oom_kill_count() -> int:
    """The kernel's count of OOM kills (``oom_kill`` in /proc/vmstat, Linux 4.13+), or -1."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


OWNER_LOCK = "owner.lock"
LEGACY_GRACE = 60.0  # seconds a run directory without a lock file may be half-made


class RunDir:
    """A pool's private run directory (mode 0700) for sockets, logs and buffers, owned
    through an exclusive ``flock`` on its ``owner.lock``, held until :meth:`remove`.

    The kernel drops the lock when the owning process dies, however it dies, so any pool on
    the machine can tell a live directory from a dead one, also from another PID namespace
    sharing /dev/shm (a container with ``--ipc=host``, a pod's shared volume), where the
    owner's pid means nothing. ``shm_dir`` is the directory itself when it is in /dev/shm
    (shared-memory segments live there too), else None.
    """

    def __init__(self) -> None:
        usable = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        base = "/dev/shm" if usable else None
        _sweep_stale_run_dirs(base or tempfile.gettempdir())
        self.path = tempfile.mkdtemp(prefix=f"orchestra-{os.getpid()}-", dir=base)
        self.shm_dir = self.path if base else None
        self._lock_fd = -1
        try:
            os.chmod(self.path, 0o700)
            self.lock()
        except BaseException:
            self.remove()
            raise

    def lock(self) -> None:
        """(Re)take the owner lock (again after someone deleted the directory)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        fd = os.open(os.path.join(self.path, OWNER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:  # released after the removal: no sweep sees it half-gone
            os.close(self._lock_fd)
            self._lock_fd = -1


# --- SIGTERM: clean up like a normal exit -----------------------------------------------

_live: dict[str, Callable[[], None]] = {}  # run directory -> its pool's emergency stop
_previous_sigterm: Any = None
_installed = False


def install_sigterm_cleanup() -> None:
    """Make SIGTERM (``docker stop``, systemd) clean up this process's pools (workers
    killed, run directories deleted) before its usual effect. Chained: a handler of the
    program's own, set before, still decides what SIGTERM means (and its ``sys.exit`` closes
    the pools as at any exit); set after, it replaces this one. Only from the main thread
    (where signal handlers are set); elsewhere a no-op."""
    global _installed, _previous_sigterm
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True


def register_run_dir(path: str, stop: Callable[[], None]) -> None:
    """``stop()`` kills the workers of the pool owning ``path`` and deletes it, on SIGTERM."""
    _live[path] = stop


def unregister_run_dir(path: str) -> None:
    _live.pop(path, None)


def _on_sigterm(signum: int, frame: Any) -> None:
    previous = _previous_sigterm
    if callable(previous):  # the program's own handler decides what SIGTERM means
        previous(signum, frame)
        return
    if previous == signal.SIG_IGN:
        return
    for stop in list(_live.values()):
        with contextlib.suppress(Exception):
            stop()
    _live.clear()
    # Terminate by the signal itself, as without this handler (the exit status says so).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def delete_worker_buffers(run_dir: str, worker_id: int) -> None:
    """Delete the shared-memory files a dead worker created (arrays using one keep it mapped)."""
    prefix = f"buf-w{worker_id}-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(run_dir):
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _sweep_stale_run_dirs(base: str) -> None:
    """Remove run directories whose pool is gone.

    A pool killed with SIGKILL (or ending in ``os._exit``) cannot clean up, and its
    directory (sockets, and shared-memory segments that still hold memory) would outlive
    it. Its workers are gone (they die with their parent), so nothing uses it any more:
    its owner lock is free. A directory without a lock file is from an older version (or
    is being made): judged by its pid, and only once it is older than ``LEGACY_GRACE``.
    """
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != "orchestra" or not parts[1].isdigit():
            continue
        try:
            fd = os.open(os.path.join(entry.path, OWNER_LOCK), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            _sweep_legacy(entry, int(parts[1]))
            continue
        except OSError:  # not ours to judge (another user's, or not a directory)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live pool, maybe in another PID namespace
        else:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)


def _sweep_legacy(entry: os.DirEntry[str], pid: int) -> None:
    try:
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return
    if age > LEGACY_GRACE and pid != os.getpid() and not _pid_alive(pid):
        shutil.rmtree(entry.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
