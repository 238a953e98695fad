"""The backend interface (layer 2): all that the API, the handles and the notebook see of a pool.

A *backend* runs *jobs*. A job (:class:`orchestra_nb._jobs.Job`) is the backend-neutral task
table of one ``map`` or one ``run`` (or a burst of ``run`` calls): the function (pickled, and
the object itself for in-process backends), the input, the options, and per item a state,
a result or an error. The API builds the job and calls :meth:`Backend.submit`; the handles
read the job's table and its future. The backend moves the job's tasks through the one
state machine of ``_state.LEGAL`` with ``Job.transition`` / ``Job.succeed`` / ``Job.fail``,
which publish exactly one ``TaskStateChanged`` per move on the backend's event bus, and
calls ``Job.finish`` when every task is final. Nothing else changes a task's state.

What a backend must provide (the abstract methods below):

* ``submit(job)``, ``cancel(job, kill=)``, ``cancel_item(job, index)``, ``pause(job, on)``,
  ``watch(job, fn)``, ``input_ready(job)``:
  callable from any thread, never blocking on the work;
* ``run_on_all(job, replay=)``: one call per live worker (backends without workers run it
  once); ``resize(n)``; ``worker_pids()``;
* ``statistics()``: a frozen :class:`~orchestra_nb._stats.PoolStatistics`;
* ``state``, ``target_workers``, ``started(timeout)``;
* ``close(mode, timeout)`` returning a ``concurrent.futures.Future`` that is done once the
  backend has let go of everything it started (processes, threads, sockets, files). Every job
  still open then reaches a final state (``PoolClosedError`` for unfinished tasks).

What is optional (the defaults here do nothing, which is correct, only slower):

* ``flush()``: send work queued by this thread now;
* ``assist(done, timeout)``: the caller is about to block until ``done()``; a backend may use
  the calling thread meanwhile (the local pool busy-polls its socket for a result due in
  microseconds; the inline backend runs the tasks right there);
* ``attach_loop(loop)``: an asyncio loop is about to await a result; the local pool lets that
  loop read results itself (no hand-over from the I/O thread);
* ``prepare_call(fn, item)``: check (and pre-pickle) one ``run`` call's arguments in the
  caller's thread, so that an unpicklable argument raises at once, naming the culprit;
* ``input_ready_now(job)``: ``input_ready`` done on the calling thread where it can be;
* ``attach_thread()``: a thread that serves work of its own reads its results itself.

:class:`Capabilities` says what a backend can do; the API refuses an option a backend cannot
honour, with an error naming the backend, instead of ignoring it.

Where things are (two hops from here): the local process pool is ``backends/local.py``
(``LocalBackend``), whose engine is ``_pool.PoolCore`` (its data-flow diagram, and the
parts it wires: ``_pool_workers``, ``_pool_dispatch``, ``_pool_results``, ``_pool_recovery``,
``_pool_wire``) with the worker processes in ``_procs``/``_worker``, the input feeder in
``_feed`` and the awaiting caller's fast path in ``backends/_caller.py``; the in-process
debugging backend is ``backends/inline.py``; the Dask backend is ``backends/dask.py``.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .._state import CloseMode, PoolState

if TYPE_CHECKING:
    from .._bus import EventBus
    from .._events import Event
    from .._jobs import Job
    from .._stats import PoolStatistics

__all__ = ["Backend", "Capabilities", "LoopAttachment", "ThreadAttachment", "check_pausable"]


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do. ``interrupt_running``: a running task can be stopped (cancel,
    Interrupt, ``timeout=``); ``run_on_all``: a call can be sent to each worker;
    ``shared_memory``: large buffers travel without copies through the pipe;
    ``in_process``: tasks run in the caller's process (``breakpoint()`` works, nothing is
    pickled); ``resize``: the number of workers can change; ``pinning``: a call can be
    pinned to one worker (``%%orchestra``); ``pause``: a job's tasks can be held back
    (:meth:`Backend.pause`); without it the API refuses to pause, naming the backend."""

    interrupt_running: bool
    run_on_all: bool
    shared_memory: bool
    in_process: bool
    resize: bool
    pinning: bool
    pause: bool


class ThreadAttachment(Protocol):
    """What :meth:`Backend.attach_thread` returns: ``wait(done)`` reads results on the
    calling thread for a while (False: it cannot, wait for the hand-over instead);
    ``close()`` ends the attachment."""

    def wait(self, done: Callable[[], bool]) -> bool: ...

    def close(self) -> None: ...


class LoopAttachment(Protocol):
    """What :meth:`Backend.attach_loop` returns: the loop reads results itself while
    attached. ``busy_poll(done)`` sends what the loop's thread queued and polls briefly for
    a result; ``release()`` ends one use."""

    def busy_poll(self, done: Callable[[], bool]) -> None: ...

    def release(self) -> None: ...


class Backend(abc.ABC):
    """A place where jobs run. See the module docstring for the contract."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    #: Whether a map's function may leave its large captured buffers out of its payload
    #: (``Job.fn_buffers``): the backend then sends them itself, once per job.
    places_buffers: ClassVar[bool] = False

    def __init__(self, events: EventBus) -> None:
        self.events = events

    # --- work -------------------------------------------------------------------------

    @abc.abstractmethod
    def submit(self, job: Job) -> None:
        """Start ``job`` (from any thread; returns at once). A backend that is closed or
        broken fails the job (its future gets the error) instead of raising."""

    @abc.abstractmethod
    def cancel(self, job: Job, *, kill: bool = False) -> None:
        """Cancel every task of ``job`` not final yet: pending ones at once, running ones
        interrupted (``kill=True``: their workers killed and replaced)."""

    @abc.abstractmethod
    def cancel_item(self, job: Job, index: int) -> None:
        """Cancel one task of ``job`` (one call of a burst of ``run`` calls)."""

    @abc.abstractmethod
    def watch(self, job: Job, fn: Callable[[int, int], object]) -> None:
        """Call ``fn(start, count)`` whenever tasks of ``job`` become final (``(-2, 0)``
        once at registration, ``(-1, 0)`` when the job finishes); on the backend's thread,
        so ``fn`` must only signal."""

    @abc.abstractmethod
    def pause(self, job: Job, paused: bool) -> None:
        """Hand out no new task of ``job`` while ``paused`` (running ones finish). The change
        is made with ``job.set_paused`` where tasks are handed out, which publishes
        ``JobPaused``."""

    @abc.abstractmethod
    def input_ready(self, job: Job) -> None:
        """``job``'s feeder (``_feed``) read new items or its input ended: take them (from
        the feeder's thread; must not block)."""

    @abc.abstractmethod
    def run_on_all(self, job: Job, *, replay: bool) -> None:
        """Run ``job``'s single call once on every live worker (the job's items are set
        here, one per worker); ``replay``: also on every worker started later."""

    def find_job(self, job_id: int) -> Job | None:
        """The unfinished job ``job_id`` of this backend, if it has one (for a front end that
        knows a job by its id only); a backend that keeps no table returns None."""
        return None

    def cancel_job(self, job_id: int, *, kill: bool = False) -> bool:
        """Cancel the job ``job_id``; False if there is no such unfinished job."""
        job = self.find_job(job_id)
        if job is None or job.internal or job.finished.is_set():
            return False
        self.cancel(job, kill=kill)
        return True

    def pause_job(self, job_id: int, paused: bool) -> bool:
        """Pause (or resume) the job ``job_id``; False if there is no such unfinished job.
        Raises ValueError, saying why, for a job that cannot be paused."""
        job = self.find_job(job_id)
        if job is None or job.internal or job.finished.is_set():
            return False
        check_pausable(self, job)
        self.pause(job, paused)
        return True

    def publish(self, event: Event) -> None:
        """Publish ``event`` on this backend's bus from any thread."""
        self.events.publish(event)

    # --- the pool ---------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def state(self) -> PoolState: ...

    @property
    @abc.abstractmethod
    def target_workers(self) -> int: ...

    @abc.abstractmethod
    def resize(self, workers: int) -> None: ...

    @abc.abstractmethod
    def worker_pids(self) -> list[int]: ...

    @abc.abstractmethod
    def statistics(self) -> PoolStatistics: ...

    @abc.abstractmethod
    def started(self, timeout: float | None = None) -> concurrent.futures.Future[None]:
        """A future done once every worker is ready (raises if the pool broke or closed)."""

    @abc.abstractmethod
    def close(self, mode: CloseMode, timeout: float = 10.0) -> concurrent.futures.Future[None]:
        """Start closing; the future is done once everything the backend started is gone."""

    def join(self, timeout: float | None = 10.0) -> None:  # noqa: B027  # optional: no threads
        """After :meth:`close` is done: wait until the threads it stopped have ended."""

    # --- optional: the caller's fast path -----------------------------------------------

    def flush(self) -> None:  # noqa: B027  # optional: nothing queued
        """Send the work this thread queued, now."""

    def assist(self, done: Callable[[], bool], timeout: float | None = None) -> None:  # noqa: B027
        """The calling thread is about to block until ``done()``; use it meanwhile."""

    def attach_loop(self, loop: asyncio.AbstractEventLoop, *, flush: bool = True) -> LoopAttachment | None:
        """``loop`` is about to await a ``run()``; None: it waits for the hand-over."""
        return None

    def attach_thread(self) -> ThreadAttachment | None:
        """The calling thread will wait for results of work it drives, many times over (a
        joblib call): it may read them itself until ``close()``. None: it waits for the
        hand-over."""
        return None

    def input_ready_now(self, job: Job) -> None:
        """:meth:`input_ready` from the thread that added the items, which does not wait
        for them: a backend may take them on that thread (the local pool does, instead of
        waking its I/O thread to do it)."""
        self.input_ready(job)

    def prepare_call(self, fn: Callable[..., Any], item: Any) -> Any:
        """Check one call's arguments in the caller's thread; what it returns is stored as
        ``job.first_payload`` (None: nothing prepared)."""
        return None


def check_pausable(backend: Backend, job: Job) -> None:
    """Raise ValueError, naming the reason, if ``job`` cannot be paused on ``backend``."""
    if not backend.capabilities.pause:
        raise ValueError(f"the {backend.name} backend cannot pause a job")
    if job.targets is not None:
        raise ValueError(
            f"job {job.id} ({job.name}) runs on chosen workers, one call each: it cannot be paused"
        )
