"""Test helpers for fault injection (public: usable from any test suite or notebook).

Deterministic faults, each tied to one moment of a task's life:

* :class:`CrashAtUnpickle` - an argument whose *unpickling* kills the process (in the worker,
  while it loads the call);
* :class:`CrashAtPickle` - a value whose *pickling* kills the process (return it from a task:
  the worker dies while pickling the result). Pickled in a process that is not a worker it
  raises instead, so it can never kill your notebook or test runner;
* :class:`RaiseAtUnpickle` / :class:`RaiseAtPickle` - the same, raising instead of crashing;
* :func:`crash` - kill the calling process with a signal (``SIGSEGV`` by default), core dumps
  disabled; :func:`hold_gil_sleep` - block in C with the GIL held and SIGINT blocked (what a
  long native computation looks like to the pool);
* :class:`FakeClock` - time that moves only on ``advance()``, for exact schedule tests
  (``orchestra_nb.Scheduler(clock=FakeClock())``);
* :class:`EventRecorder` - every event of a pool, timestamped on arrival, with a blocking
  :meth:`~EventRecorder.wait` for the first event matching a predicate;
* :func:`kill_pid` / :func:`stop_pid` / :func:`cont_pid` - signals to one known pid;
  :func:`wait_for` - poll a predicate with a deadline (a hang guard, not a synchronisation).

All crash helpers act on ``os.getpid()`` only, so a fault never reaches another process.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._clock import FakeClock

if TYPE_CHECKING:
    from .._api import Pool

__all__ = [
    "CrashAtPickle",
    "CrashAtUnpickle",
    "EventRecorder",
    "FakeClock",
    "RaiseAtPickle",
    "RaiseAtUnpickle",
    "cont_pid",
    "crash",
    "hold_gil_sleep",
    "in_worker",
    "kill_pid",
    "stop_pid",
    "wait_for",
]


def in_worker() -> bool:
    """Whether this process is an orchestra_nb worker (``python -m orchestra_nb._worker``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == "orchestra_nb._worker"


def crash(sig: int = signal.SIGSEGV) -> None:
    """Kill this process with ``sig`` (default ``SIGSEGV``): a deterministic "segfault".

    Core dumps are switched off first, so nothing is written to disk. Refuses to run outside a
    worker (it would kill the test runner).
    """
    if not in_worker():
        raise RuntimeError("orchestra_nb.testing.crash() only kills worker processes")
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):
        import faulthandler

        faulthandler.disable()  # die by the signal itself, not by a dumping handler
    signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
    time.sleep(10)  # the signal is delivered before this returns
    os._exit(70)


def _raise(message: str) -> Any:
    raise RuntimeError(message)


class CrashAtUnpickle:
    """Kills the process that unpickles it (a worker loading the call's arguments)."""

    def __init__(self, sig: int = signal.SIGSEGV) -> None:
        self.sig = int(sig)

    def __reduce__(self) -> tuple[Any, ...]:
        return (crash, (self.sig,))


class CrashAtPickle:
    """Kills the worker that pickles it (return it from a task to crash the worker while it
    pickles the result). Outside a worker, pickling raises ``RuntimeError`` instead."""

    def __init__(self, sig: int = signal.SIGSEGV) -> None:
        self.sig = int(sig)

    def __reduce__(self) -> tuple[Any, ...]:
        if in_worker():
            crash(self.sig)
        raise RuntimeError("CrashAtPickle pickled outside a worker")


class RaiseAtUnpickle:
    """Pickles fine; unpickling it raises ``RuntimeError(message)``."""

    def __init__(self, message: str = "RaiseAtUnpickle") -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_raise, (self.message,))


class RaiseAtPickle:
    """Pickling it raises ``TypeError(message)`` (an unpicklable result or argument)."""

    def __init__(self, message: str = "RaiseAtPickle") -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(self.message)


def hold_gil_sleep(seconds: float) -> None:
    """Block in C for ``seconds`` while holding the GIL, with SIGINT blocked.

    ``ctypes.PyDLL`` keeps the GIL during the call, so the worker's control thread cannot run
    (no heartbeats) and the interpreter cannot run a Python signal handler; blocking SIGINT
    makes ``sleep`` itself uninterruptible, like a long native loop that never checks signals.
    Only a SIGKILL from the pool stops it.
    """
    import ctypes

    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    libc = ctypes.PyDLL(None)
    libc.sleep.argtypes = [ctypes.c_uint]
    libc.sleep(max(1, math.ceil(seconds)))


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid``; False if it is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_pid(pid: int) -> bool:
    """SIGSTOP ``pid`` (freezes it, heartbeat thread included)."""
    return kill_pid(pid, signal.SIGSTOP)


def cont_pid(pid: int) -> bool:
    """SIGCONT ``pid``."""
    return kill_pid(pid, signal.SIGCONT)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); ``TimeoutError`` after
    ``timeout`` s. A hang guard for conditions that no event announces."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


class EventRecorder:
    """Records a pool's events as ``(monotonic arrival time, event)``; ``with`` unsubscribes.

    Arrival times are taken on the bus's delivery thread, so they are at most later than the
    publication, never earlier: a duration measured between two of them is an upper bound.
    """

    def __init__(self, pool: Pool, types: tuple[type[Any], ...] | None = None) -> None:
        self.records: list[tuple[float, Any]] = []
        self._cond = threading.Condition()
        self._sub = pool.subscribe(self._on_event, **({"types": types} if types else {}))

    def _on_event(self, event: Any) -> None:
        now = time.monotonic()
        with self._cond:
            self.records.append((now, event))
            self._cond.notify_all()

    @property
    def events(self) -> list[Any]:
        with self._cond:
            return [e for _, e in self.records]

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def wait(self, predicate: Callable[[Any], Any], timeout: float = 10.0,
             after: int = 0) -> tuple[float, Any]:
        """The first ``(time, event)`` from record number ``after`` on that matches
        ``predicate``, waiting for it up to ``timeout`` s (``TimeoutError`` then)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            i = after
            while True:
                while i < len(self.records):
                    t, event = self.records[i]
                    i += 1
                    if predicate(event):
                        return t, event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching event within {timeout} s; got "
                                       f"{[e for _, e in self.records][-20:]}")
                self._cond.wait(left)

    def __len__(self) -> int:
        with self._cond:
            return len(self.records)

    def close(self) -> None:
        self._sub.close()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
