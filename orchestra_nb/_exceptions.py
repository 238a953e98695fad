"""The one exception tree of orchestra_nb (layer 0: pure, importable in workers).

::

    Exception
    ├── OrchestraError                      root of everything raised by orchestra_nb itself
    │   ├── PoolClosedError                 you closed it (or the interpreter is exiting)
    │   ├── BrokenPoolError                 it broke: workers cannot start (stderr attached)
    │   ├── WorkerStartError                one worker missed its ready handshake
    │   ├── WorkerCrashedError              a task's worker died under it (signal / exit code named)
    │   │   └── MemoryLimitError            ... because the pool killed it over its memory limit
    │   ├── SerializationError              a function, argument, global or result cannot be pickled
    │   │   └── ResultTooLargeError         a result exceeds ``max_result_bytes``
    │   ├── CircuitOpenError                a circuit breaker is open: the call failed fast
    │   ├── TaskTimeoutError (+TimeoutError) a task ran past its ``timeout`` and was stopped
    │   └── RemoteError                     a remote exception that could not travel back as itself
    └── RemoteTraceback                     set as ``__cause__`` of a re-raised remote exception

A cancelled or interrupted job is not an error of its own: awaiting (or blocking on) a
``map`` whose job was cancelled raises ``orchestra.JobCancelled`` (a ``CancelledError`` of
both the asyncio and the concurrent.futures kind), and an interrupted wait raises
``orchestra.JobInterrupted`` (a ``KeyboardInterrupt``); both carry the handle, see
``_outcomes``. An asyncio cancel of the awaiting task itself stays a plain CancelledError.

Remote errors travel in two tiers (the CPython ``_ExceptionWithTraceback`` technique):

1. the original exception, re-raised with ``__cause__ = RemoteTraceback(text)`` and a note
   naming the worker, its pid and the task index;
2. when the exception cannot be pickled, a :class:`RemoteError` that carries its type name,
   message and the traceback text.

``_render_traceback_`` (an IPython hook, no IPython import needed) makes a notebook show the
worker's traceback for the errors defined here.
"""

from __future__ import annotations

import signal

__all__ = [
    "BrokenPoolError",
    "CircuitOpenError",
    "MemoryLimitError",
    "OrchestraError",
    "PoolClosedError",
    "RemoteError",
    "RemoteTraceback",
    "ResultTooLargeError",
    "SerializationError",
    "TaskExitError",
    "TaskTimeoutError",
    "WorkerCrashedError",
    "WorkerStartError",
]


class OrchestraError(Exception):
    """Base class of every error that orchestra_nb raises on its own account."""


class PoolClosedError(OrchestraError):
    """The pool was shut down (by you, or at interpreter exit) and takes no more work."""


class BrokenPoolError(OrchestraError):
    """Workers cannot be started: the pool gave up respawning instead of looping.

    ``stderr`` holds what the last failed worker wrote before it died.
    """

    def __init__(self, message: str, stderr: str = "") -> None:
        self.stderr = stderr
        full = message
        if stderr.strip():
            tail = "\n".join(stderr.strip().splitlines()[-30:])
            full = f"{message}\n--- worker stderr (last lines) ---\n{tail}"
        super().__init__(full)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.args[0], ""))


class WorkerStartError(OrchestraError):
    """A worker did not complete its ready handshake in time."""


def describe_exit(returncode: int | None) -> str:
    """``-11`` -> ``'SIGSEGV(-11)'``, ``3`` -> ``'exit code 3'`` (loky's ``_format_exitcodes``)."""
    if returncode is None:
        return "unknown exit status"
    if returncode < 0:
        try:
            return f"{signal.Signals(-returncode).name}({returncode})"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class WorkerCrashedError(OrchestraError):
    """The worker running a task died (segfault, ``os._exit``, SIGKILL, OOM killer, ...).

    Raised for a task only after it killed workers more than ``max_worker_crashes`` times;
    before that the task is quietly re-queued on a fresh worker.
    """

    def __init__(
        self,
        worker_id: int,
        pid: int | None,
        returncode: int | None,
        task_index: int | None = None,
        cause: str = "",
    ) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.returncode = returncode
        self.task_index = task_index
        self.cause = cause
        where = f" while running task {task_index}" if task_index is not None else ""
        why = f" ({cause})" if cause else ""
        super().__init__(
            f"worker {worker_id} (pid {pid}) died with {describe_exit(returncode)}{where}{why}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.worker_id, self.pid, self.returncode, self.task_index, self.cause))


class MemoryLimitError(WorkerCrashedError):
    """The pool killed a worker whose memory use passed the hard limit."""


class SerializationError(OrchestraError):
    """Something that must cross a process boundary cannot be pickled.

    The message names the culprit: the function, the argument's position, the global a
    function references, or the result of a task.
    """


class ResultTooLargeError(SerializationError):
    """A task's result is larger than the pool's ``max_result_bytes``."""


class CircuitOpenError(OrchestraError):
    """A circuit breaker is open; the call failed fast without running."""


class TaskTimeoutError(OrchestraError, TimeoutError):
    """A task ran longer than its ``timeout`` and was stopped (interrupted, or its worker killed)."""


class TaskExitError(OrchestraError):
    """A task raised ``KeyboardInterrupt`` or ``SystemExit`` (its ``__cause__``): that is the
    task's failure, like any exception, never a cancel nor the caller's own exit."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of a re-raised remote error."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return self.tb


class RemoteError(OrchestraError):
    """A task's exception that could not be pickled back, carried as text.

    ``ename`` is the remote exception's qualified type name, ``evalue`` its message and
    ``traceback`` the formatted remote traceback.
    """

    def __init__(self, ename: str, evalue: str, traceback: str) -> None:
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        super().__init__(f"{ename}: {evalue}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.ename, self.evalue, self.traceback))

    def _render_traceback_(self) -> list[str]:
        return [*self.traceback.rstrip("\n").splitlines(), f"(raised in a worker as {self.ename})"]
