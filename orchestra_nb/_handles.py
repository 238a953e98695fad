"""Handles for running work (layer 3): awaitable, waitable, iterable, cancellable.

A handle is returned at once by ``run``/``map``; the work has already started. The same
handle serves an ``await`` in a notebook cell, ``result()`` in a plain script, ``async for``
/ ``for`` to stream results, and ``cancel()`` from anywhere (a widget's button included).

A handle talks to its pool's backend only through the backend interface
(``backends/_base.py``) and reads its job's task table (``_jobs.Job``).

While a coroutine awaits a handle, a timer wakes its loop every 0.1 s: an ipykernel only
notices "interrupt kernel" when its loop wakes up (docs/design.md, "Interrupts").
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from ._jobs import _NOT_DONE, STREAM_WINDOW, Job, JobFuture
from ._outcomes import MISSING, Failure, Failures, JobCancelled, JobInterrupted
from ._state import FINAL_STATES, TaskState, done_count

if TYPE_CHECKING:
    from ._bus import EventBus
    from .backends._base import Backend, LoopAttachment

__all__ = ["MapHandle", "TaskHandle"]

T = TypeVar("T")

_WAKE_INTERVAL = 0.1

# The notebook layer (loaded only by %load_ext) registers how a handle displays itself.
display_hook: Callable[[Any], None] | None = None
# ... and what happens when a handle is created (it shows the job's live progress widget).
create_hook: Callable[[Any], None] | None = None
# ... and whether a CancelledError in the awaiting coroutine is "Interrupt kernel" reaching
# the cell's own task (ipykernel turns the interrupt into a cancel of that task): then the
# wait raises JobInterrupted, a KeyboardInterrupt, instead.
interrupt_hook: Callable[[], bool] | None = None

# Set while a layer above builds a handle of its own over a new job (a cached map over the
# job computing its misses): that handle is announced instead (``announce``), so that the
# notebook shows one view, with the numbers of the whole map.
_quiet: contextvars.ContextVar[bool] = contextvars.ContextVar("orchestra_quiet", default=False)


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Handles created inside are not announced to ``create_hook``."""
    token = _quiet.set(True)
    try:
        yield
    finally:
        _quiet.reset(token)


def announce(handle: Any) -> None:
    """Tell ``create_hook`` about a handle built over a job created ``quietly()``."""
    hook = create_hook
    if hook is not None:
        hook(handle)

_NOT_A_LIST = (
    "{kind} is a handle to running work, not its results: did you forget `await` or "
    "`.result()`? (`results = await handle` in a notebook, `handle.result()` in a script)"
)


class _LoopHub:
    """Per caller loop: finished work handed over in batches, and the interrupt waker.

    Hand-over: a job finished on another thread is queued and the loop woken once for the
    whole queue (``asyncio.wrap_future`` would wake it once per future: a syscall and a GIL
    hand-over each); one finished on the loop's own thread (which drove the engine) is
    handed over at once.

    Waker: while anything on the loop awaits a handle, a timer wakes it every
    ``_WAKE_INTERVAL`` s, because an ipykernel only notices "interrupt kernel" when its loop
    wakes up. One timer per loop, shared by reference count; it stops at its next tick
    with no users, so back-to-back awaits share one.
    """

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopHub]] = (
        weakref.WeakKeyDictionary()
    )
    _last: ClassVar[_LoopHub | None] = None  # most calls come from one loop: skip the lookup

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()  # made by the first coroutine awaiting on it
        self._ready: collections.deque[_Deliverable] = collections.deque()
        self._scheduled = False
        self._users = 0
        self._timer: asyncio.TimerHandle | None = None
        self._on_idle: list[Callable[[], object]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _LoopHub:
        hub = cls._last
        if hub is not None and hub.loop is loop:
            return hub
        hub = cls._by_loop.get(loop)
        if hub is None:
            hub = cls._by_loop[loop] = cls(loop)
        cls._last = hub
        return hub

    # --- hand-over --------------------------------------------------------------------

    def watch(self, cf: JobFuture) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        cf.add_done_callback(lambda done: self.post(_Settle(fut, done)))
        return fut

    def post(self, item: _Deliverable) -> None:
        if threading.get_ident() == self.thread:
            item.deliver()
            return
        self._ready.append(item)
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                self._ready.clear()

    def deliver_pending(self) -> None:
        """On the loop's thread: deliver what was handed over so far, without waiting for
        the scheduled delivery (which then finds nothing, or what came after)."""
        self._deliver()

    def _deliver(self) -> None:
        self._scheduled = False
        ready = self._ready
        while ready:
            ready.popleft().deliver()

    # --- waker ------------------------------------------------------------------------

    def acquire(self) -> None:
        self._users += 1
        if self._timer is None:
            self._timer = self.loop.call_later(_WAKE_INTERVAL, self._tick)

    def _tick(self) -> None:
        if self._users:
            self._timer = self.loop.call_later(_WAKE_INTERVAL, self._tick)
            return
        self._timer = None
        idle, self._on_idle = self._on_idle, []
        for callback in idle:
            callback()

    def release(self) -> None:
        self._users -= 1

    def when_idle(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` at the first tick with nothing awaited (within _WAKE_INTERVAL)."""
        self._on_idle.append(callback)
        if self._timer is None:
            self._timer = self.loop.call_later(_WAKE_INTERVAL, self._tick)


class _Deliverable(Protocol):
    def deliver(self) -> None: ...


class _Settle:
    """Copies a job future's outcome to an asyncio future (on the future's loop)."""

    __slots__ = ("cf", "fut")

    def __init__(self, fut: asyncio.Future[Any], cf: JobFuture) -> None:
        self.fut = fut
        self.cf = cf

    def deliver(self) -> None:
        _settle(self.fut, self.cf)


def _settle(fut: asyncio.Future[Any], cf: JobFuture) -> None:
    if fut.done():
        return
    state, result, exc = cf.outcome()  # called once ``cf`` is done
    if state == "pending":
        return
    if state == "cancelled":
        fut.cancel()
    elif exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _Handle:
    def __init__(self, backend: Backend, job: Job, *, show: bool = True) -> None:
        self._backend = backend
        self._job = job
        self._future: JobFuture = job.future
        job.future.add_done_callback(self._on_done)
        hook = create_hook
        if hook is not None and show and not _quiet.get():
            hook(self)

    def _on_done(self, fut: JobFuture) -> None:
        if fut.cancelled():
            if not self._job.finished.is_set():
                self._backend.cancel(self._job)
            return
        if isinstance(self, MapHandle):
            exc = fut.exception(0)
            if exc is not None and not hasattr(exc, "handle"):
                _point_to_handle(exc, self)

    # --- inspection -------------------------------------------------------------------

    def on_done(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(handle)`` once this handle is done (a result, an error or cancelled),
        at once if it is done already. It runs in whatever thread settles the handle, often
        the pool's I/O thread: ``fn`` must be quick and must not block or wait for work."""
        self._future.add_done_callback(lambda _: fn(self))

    def lend_loop(self) -> None:
        """The running event loop (of the calling thread) is about to wait for this handle
        through :meth:`on_done`, not with ``await``: let the backend use that loop meanwhile,
        as an ``await`` would (the inline backend runs its tasks on it; the others send
        what this thread queued). Safe to call for a handle someone else awaits too."""
        self._backend.flush()

    @property
    def events(self) -> EventBus:
        """The event bus of the pool this handle's work runs on."""
        return self._backend.events

    @property
    def job_id(self) -> int:
        return self._job.id

    @property
    def name(self) -> str:
        return self._job.name

    def done(self) -> bool:
        """True once the handle has an outcome (a result, an error, or cancelled)."""
        return self._future.done()

    def cancelled(self) -> bool:
        return self._future.cancelled()

    def finished(self) -> bool:
        """True once every task reached a final state (after a cancel: once it took effect)."""
        return self._job.finished.is_set()

    def counts(self) -> dict[TaskState, int]:
        """How many tasks are in each state right now."""
        counts = list(self._job.counts)
        return {state: counts[state] for state in TaskState}

    @property
    def total(self) -> int | None:
        """Number of tasks, or None while a lazy input has not been read to its end."""
        return self._job.total

    def exceptions(self) -> dict[int, BaseException]:
        """The exceptions of failed tasks so far, by task index."""
        return dict(self._job.errors)

    @property
    def elapsed(self) -> float:
        import time

        end = self._job.ended_at
        return (end if end is not None else time.monotonic()) - self._job.started_at

    # --- control ----------------------------------------------------------------------

    def cancel(self, kill: bool = False) -> bool:
        """Drop pending tasks and interrupt running ones (``KeyboardInterrupt`` inside the task).

        A task that ignores the interrupt for the pool's ``cancel_grace`` has its worker
        killed and replaced; ``kill=True`` does that at once. Returns False if the work had
        already finished.
        """
        if self._job.finished.is_set():
            return False
        self._backend.cancel(self._job, kill=kill)
        return True

    _cancelled_by = "handle.cancel()"

    def cancel_by(self, who: str, kill: bool = False) -> bool:
        """``cancel(kill)``, naming who cancelled (``'the Cancel button'``): the
        :class:`JobCancelled` that an awaiting cell gets then says so."""
        if not self.done():
            self._cancelled_by = who
        return self.cancel(kill)

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until every task is final (e.g. after ``cancel()``); False on timeout."""
        return self._job.finished.wait(timeout)

    # --- waiting ----------------------------------------------------------------------

    async def _wait(self) -> Any:
        loop = asyncio.get_running_loop()
        hub = _LoopHub.of(loop)
        fut = hub.watch(self._future)
        self._backend.flush()  # send pending calls from this thread: no hand-over to wait for
        hub.acquire()
        try:
            return self._unwrap(await fut)
        except asyncio.CancelledError:
            __tracebackhide__ = True  # IPython hides this frame
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # our waiter was cancelled, not the job
                self.cancel()  # stop the remote work too
                hook = interrupt_hook
                if hook is not None and hook():
                    task.uncancel()  # the cancel becomes the KeyboardInterrupt below
                    raise JobInterrupted(self) from None
                raise
            raise JobCancelled(self, self._cancelled_by) from None
        finally:
            hub.release()

    def _sync_result(self, timeout: float | None) -> Any:
        __tracebackhide__ = True  # IPython hides this frame
        self._backend.flush()
        try:
            if not self._future.done():
                deadline = None if timeout is None else time.monotonic() + timeout
                self._backend.assist(self._future.done, timeout)
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
            return self._unwrap(self._future.result(timeout))
        except KeyboardInterrupt:
            self.cancel()
            raise JobInterrupted(self) from None
        except concurrent.futures.CancelledError as exc:
            if isinstance(exc, JobCancelled) or not self._future.cancelled():
                raise
            raise JobCancelled(self, self._cancelled_by) from None

    def _unwrap(self, results: list[Any]) -> Any:
        return results

    def __getitem__(self, key: object) -> Any:
        raise TypeError(_NOT_A_LIST.format(kind=f"'{type(self).__name__}' object"))

    def _ipython_display_(self) -> None:
        if display_hook is not None:
            display_hook(self)
        else:
            print(repr(self))

    def __repr__(self) -> str:
        c = self._job.counts
        done = done_count(c)
        total = "?" if self._job.total is None else self._job.total
        status = "cancelled" if self.cancelled() else "done" if self.done() else "running"
        return (
            f"<{type(self).__name__} job={self._job.id} {self._job.name!r} {status} "
            f"{done}/{total} failed={c[TaskState.FAILED]}>"
        )


class TaskHandle(_Handle, Generic[T]):
    """One ``run(f, *args)`` call.

    Calls of the same function made in a burst share one job (a *call batch*) so that they
    travel many per message; each still has its own handle, future, state and cancel.
    """

    # asyncio's protocol for future-like objects (``asyncio.isfuture``): ``await``,
    # ``gather``, ``wait`` and ``wait_for`` use the handle as it is, with no Task or
    # coroutine per handle (20,000 handles gathered are 60,000 fewer objects for the GC to
    # walk). Callbacks and the loop come from an asyncio future made on first use.
    _cancel_message: str | None = None
    _aio: asyncio.Future[Any] | None = None
    _blocking = False

    @property
    def _asyncio_future_blocking(self) -> bool | None:
        # None (not a future) outside a running loop: loop.run_until_complete(handle) then
        # wraps the handle in a Task, as for any awaitable.
        return self._blocking if asyncio._get_running_loop() is not None else None

    @_asyncio_future_blocking.setter
    def _asyncio_future_blocking(self, value: bool) -> None:
        self._blocking = value

    _drain: LoopAttachment | None = None

    def __init__(
        self,
        backend: Backend,
        job: Job,
        index: int | None = None,
        future: JobFuture | None = None,
    ) -> None:
        if index is None:
            super().__init__(backend, job)
            self._index = 0
            self._batched = False
            return
        assert future is not None
        self._backend, self._job = backend, job
        self._future = future
        self._index = index
        self._batched = True

    def __await__(self) -> Generator[Any, None, T]:
        aio = self._bind(polling=True)
        try:
            if self._drain is not None:
                if aio.done():
                    self._backend.flush()  # calls this loop queued meanwhile
                else:
                    # A short call's result comes back in about a hundred µs: wait for it
                    # awake (bounded by Pool(busy_poll=...)), not in the loop's selector.
                    # Until the job is done, not ``aio``: a result read by the I/O thread
                    # reaches ``aio`` only through this loop.
                    self._drain.busy_poll(self._future.done)
            if not aio.done() and self._future.done():
                # Done, but read on the I/O thread (under load it may take the socket back
                # from a poll, or read it after a send of its own): its hand-over to this
                # loop is queued; take it now rather than after a turn of the loop.
                self._hub.deliver_pending()
            if not aio.done():
                # The Task waits on the asyncio future itself (its C fast path: no Python
                # get_loop/add_done_callback/property calls); a Task.cancel() cancels it and
                # lands in the except clause below, which cancels the call.
                aio._asyncio_future_blocking = True
                yield aio
        except (asyncio.CancelledError, KeyboardInterrupt):
            __tracebackhide__ = True  # IPython hides this frame
            self.cancel()
            task = asyncio.current_task()
            hook = interrupt_hook
            if task is not None and task.cancelling() and hook is not None and hook():
                task.uncancel()  # "Interrupt kernel": the cancel becomes a KeyboardInterrupt
                raise JobInterrupted(self) from None
            raise
        return self._unwrap(aio.result())  # type: ignore[no-any-return]

    def _bind(self, polling: bool = False) -> asyncio.Future[Any]:
        """The asyncio side of this handle, on the running loop (made on first use).
        ``polling``: the caller sends the pending calls itself, with ``_drain.busy_poll``."""
        aio = self._aio
        if aio is not None and not (aio.done() and aio.get_loop() is not asyncio._get_running_loop()):
            return aio
        # First use, or a finished handle awaited again from another loop (a second
        # asyncio.run in a script): bind to this loop.
        loop = asyncio.get_running_loop()
        hub = self._hub = _LoopHub.of(loop)
        aio = self._aio = loop.create_future()
        # Send pending calls from this thread and read results on it: no hand-over.
        self._drain = self._backend.attach_loop(loop, flush=not polling)
        if self._drain is None:
            self._backend.flush()
        hub.acquire()
        self._future.watch(self)
        return aio

    def job_done(self, _: JobFuture) -> None:
        self._hub.post(self)

    def deliver(self) -> None:
        """On the bound loop: the task is done; settle the asyncio side."""
        assert self._aio is not None
        _settle(self._aio, self._future)
        self._hub.release()
        if self._drain is not None:
            self._drain.release()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._bind().get_loop()

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Any = None) -> None:
        """asyncio style: ``fn`` is called on the loop, with an asyncio future of the outcome."""
        self._bind().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        return 0 if self._aio is None else self._aio.remove_done_callback(fn)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (None if it returned); blocks like ``result``."""
        aio = self._aio
        if aio is not None and aio.cancelled():
            return aio.exception()  # raises CancelledError
        self._backend.flush()
        self._backend.assist(self._future.done, timeout)
        return self._future.exception(timeout)

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        return asyncio.CancelledError()

    def result(self, timeout: float | None = None) -> T:
        """Block until the task is done; return its value or raise its exception."""
        aio = self._aio
        if aio is not None and aio.cancelled():  # cancelled from asyncio: settled already
            return aio.result()  # type: ignore[no-any-return]  # raises CancelledError
        return self._sync_result(timeout)  # type: ignore[no-any-return]

    def done(self) -> bool:
        aio = self._aio
        return self._future.done() or (aio is not None and aio.cancelled())

    def cancelled(self) -> bool:
        aio = self._aio
        return self._future.cancelled() or (aio is not None and aio.cancelled())

    def _unwrap(self, results: Any) -> Any:
        return results if self._batched else results[0]

    @property
    def state(self) -> TaskState:
        job = self._job
        if self._index >= job.pulled:
            if self._future.cancelled() or (job.cancelled and not self._batched):
                return TaskState.CANCELLED
            return TaskState.PENDING
        return job.state_of(self._index)

    def finished(self) -> bool:
        if not self._batched:
            return super().finished()
        return self._future.done()

    def counts(self) -> dict[TaskState, int]:
        if not self._batched:
            return super().counts()
        mine = self.state
        return {state: int(state == mine) for state in TaskState}

    @property
    def total(self) -> int | None:
        return 1

    def exceptions(self) -> dict[int, BaseException]:
        if not self._batched:
            return super().exceptions()
        exc = self._job.errors.get(self._index)
        return {} if exc is None else {0: exc}

    def cancel(self, kill: bool = False, msg: Any = None) -> bool:
        aio = self._aio
        if aio is not None and not aio.done():
            # asyncio's contract: a future is cancelled when cancel() returns (the awaiting
            # Task relies on it); the remote task follows as soon as the pool gets to it.
            if threading.get_ident() == self._hub.thread:
                aio.cancel(msg)
            else:
                self._hub.loop.call_soon_threadsafe(aio.cancel, msg)
        if not self._batched:
            return super().cancel(kill)
        if self._future.done():
            return aio is not None and aio.cancelled()
        self._backend.cancel_item(self._job, self._index)
        return True

    def wait_finished(self, timeout: float | None = None) -> bool:
        if not self._batched:
            return super().wait_finished(timeout)
        return self._future.wait(timeout)


class MapHandle(_Handle, Generic[T]):
    """One ``map(f, iterable)``: ``await`` it for the list of results, or iterate it."""

    def __await__(self) -> Generator[Any, None, list[T]]:
        self._keep_results()
        return self._wait().__await__()

    def result(self, timeout: float | None = None) -> list[T]:
        """Block until every task is done; return the results (or raise the first error).

        Every call returns the same list (as ``concurrent.futures`` does): the job's own,
        not a copy, so that a kept result list costs no more than the list itself."""
        self._keep_results()
        return self._sync_result(timeout)  # type: ignore[no-any-return]

    def pause(self) -> None:
        """Start no more of this map's tasks until :meth:`resume`; running ones finish (and so
        do the few already sent to a worker behind a running one). Raises ValueError if the
        pool's backend cannot pause (``Pool.capabilities.pause``) or the map runs once per
        worker (``run_on_all``)."""
        from .backends._base import check_pausable

        check_pausable(self._backend, self._job)
        self._backend.pause(self._job, True)

    def resume(self) -> None:
        self._backend.pause(self._job, False)

    @property
    def paused(self) -> bool:
        return self._job.paused

    def _unwrap(self, results: list[Any]) -> Any:
        if self._job.ordered:
            return results
        order = self._job.completion_order
        assert order is not None, "pinned results keep their completion order"
        return [results[i] for i in order]

    def partial_results(self, fill: Any = MISSING) -> list[Any]:
        """Results so far, in input order; ``fill`` where a task has no value: not finished
        yet, failed or cancelled. The default, ``orchestra.MISSING``, cannot be mistaken for
        a result (test with ``r is orchestra.MISSING``); pass ``fill=None`` (or any value)
        to get that instead. With ``return_exceptions=True`` a failed task gives its
        exception and a cancelled one a ``CancelledError``, as ``result()`` would. Results
        a stream (``for`` / ``async for``) took and no longer keeps give ``fill`` too."""
        job = self._job
        released, states, results = job.snapshot()
        out: list[Any] = [fill] * released
        for index, value in enumerate(results, released):
            state = states[index - released] if index - released < len(states) else None
            if value is _NOT_DONE or state is None:
                out.append(fill)
            elif state == TaskState.SUCCEEDED:
                out.append(value)
            elif not job.return_exceptions:
                out.append(fill)
            elif state == TaskState.FAILED:
                out.append(job.errors.get(index, value))
            elif state == TaskState.CANCELLED:
                out.append(concurrent.futures.CancelledError(f"task {index} was cancelled"))
            else:
                out.append(fill)
        return out

    # --- failures ---------------------------------------------------------------------

    _origin: tuple[Callable[..., Any], tuple[Any, ...] | None] | None = None

    def _remember(self, rerun: Callable[..., Any], iterables: tuple[Any, ...]) -> None:
        """Set by ``Pool.map``: how to rerun items, and the inputs when they can be indexed
        again (sequences, kept by reference, not copied; a one-shot iterator is not kept)."""
        kept = iterables if all(_indexable(it) for it in iterables) else None
        self._origin = (rerun, kept)

    def _input_of(self, index: int) -> Any:
        origin = self._origin
        if origin is None or origin[1] is None:
            return MISSING
        iterables = origin[1]
        if len(iterables) == 1:
            return iterables[0][index]
        return tuple(it[index] for it in iterables)

    def failures(self) -> Failures:
        """The failed items so far, in input order: index, input, exception, attempts,
        worker and how long the failing attempt ran, of each (a table in a notebook).
        ``retry_failed()`` reruns them."""
        job = self._job
        durations = dict(job.failed_durations)
        workers = dict(job.failed_workers)
        rows = []
        for index, exc in sorted(dict(job.errors).items()):
            duration, bound = durations.get(index, (None, False))
            worker = workers.get(index)
            rows.append(Failure(index, self._input_of(index), exc, job.attempts.get(index, 1),
                                _worker_of(exc) if worker is None else worker, duration, bound))
        return Failures(rows, job.name)

    def retry_failed(self, **options: Any) -> MapHandle[T]:
        """A new map of the same function over the failed items' inputs only (same options
        as this map, overridable with ``options``): ``await handle.retry_failed()``.

        Needs the inputs again: it works when the map's inputs were sequences (lists,
        ranges, arrays...), not one-shot iterators."""
        origin = self._origin
        failed = self.failures()
        iterables = None if origin is None else origin[1]
        if origin is None or iterables is None:
            raise TypeError(
                f"retry_failed(): the inputs of {self.name!r} were a one-shot iterator, which "
                "the handle does not keep; pass a list (or another sequence) to map() to be "
                "able to rerun failed items"
            )
        rerun = origin[0]
        indices = failed.indices
        if len(iterables) == 1:
            return rerun([iterables[0][i] for i in indices], **options)  # type: ignore[no-any-return]
        columns = [[it[i] for i in indices] for it in iterables]
        return rerun(*columns, **options)  # type: ignore[no-any-return]

    # --- streaming --------------------------------------------------------------------
    #
    # Iterating a map hands its results over: once every iterator of the handle has taken
    # a segment of them (``_table.SEGMENT``), the job's table drops it, so a stream of any
    # length holds only what is in flight. An await, ``result()`` or item callbacks pin
    # the results first (see ``Job.pin_results``).

    def _ready_value(self, index: int) -> tuple[bool, Any]:
        """(final?, value) of item ``index``; raises its error unless return_exceptions."""
        job = self._job
        state = job.states[index]  # before the result: a value is stored before its state
        if state == TaskState.SUCCEEDED:
            return True, job.results[index]
        if state == TaskState.FAILED:
            if job.return_exceptions:
                return True, job.results[index]
            raise job.errors[index]
        if state == TaskState.CANCELLED:
            raise concurrent.futures.CancelledError(f"task {index} was cancelled")
        return False, None

    def _scan(self, cursor: _StreamCursor) -> list[Any]:
        """Newly final items, at most ``_SCAN_BATCH``. Ordered: from the cursor up;
        unordered: any final item not yielded yet."""
        job = self._job
        states = job.states  # before the results (see _ready_value)
        results = job.results
        pulled = min(job.pulled, len(states))  # ``pulled`` grows before the table does
        out: list[Any] = []
        if job.ordered:
            while cursor.next < pulled and len(out) < _SCAN_BATCH:
                segment = states[cursor.next : min(pulled, cursor.next + _SCAN_BATCH - len(out))]
                run = len(segment) - len(segment.lstrip(_SUCCEEDED))  # succeeded, in a row
                if run:
                    out += results[cursor.next : cursor.next + run]
                    cursor.next += run
                if run == len(segment):
                    continue
                try:  # an item that failed, was cancelled, or is not final yet
                    final, value = self._ready_value(cursor.next)
                except BaseException:
                    if out:  # yield the values before the failed item first
                        return out
                    raise
                if not final:
                    break
                out.append(value)
                cursor.next += 1
            return out
        base = cursor.base
        yielded = cursor.yielded  # 1 for each item from ``base`` on that was yielded
        if len(yielded) < pulled - base:
            yielded.extend(bytes(pulled - base - len(yielded)))
        final_mask = states[cursor.next : pulled].translate(_FINAL_MASK)
        offset = final_mask.find(1)
        while offset != -1 and len(out) < _SCAN_BATCH:
            index = cursor.next + offset
            if not yielded[index - base]:
                try:
                    ready, value = self._ready_value(index)
                except BaseException:
                    if out:  # yield the values found so far first; the next scan raises
                        break
                    raise
                if ready:
                    yielded[index - base] = 1
                    out.append(value)
            offset = final_mask.find(1, offset + 1)
        first = yielded.find(0, cursor.next - base)
        cursor.next = base + (first if first != -1 else len(yielded))
        if cursor.next - base > _SCAN_BATCH:  # forget the flags of the yielded prefix
            del yielded[: cursor.next - base]
            cursor.base = cursor.next
        return out

    def _exhausted(self, cursor: _StreamCursor) -> bool:
        job = self._job
        return job.source is None and cursor.next >= job.pulled and job.is_complete()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[T]:
        loop = asyncio.get_running_loop()
        job = self._job
        token = job.open_stream()
        wake = asyncio.Event()
        self._watch(lambda start, count: loop.call_soon_threadsafe(wake.set))
        self._backend.flush()
        cursor = _StreamCursor()
        consumed = 0
        self._consumed(0)
        hub = _LoopHub.of(loop)
        hub.acquire()
        try:
            while True:
                wake.clear()
                values = self._scan(cursor)
                got = bool(values)
                for value in values:
                    yield value
                    consumed += 1
                del values  # the batch is the caller's now: the table may drop it
                job.advance_stream(token, consumed if job.ordered else cursor.next)
                self._consumed(consumed, waiting=not got)
                if self._exhausted(cursor):
                    return
                if not got:
                    await wake.wait()
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            job.close_stream(token)
            hub.release()

    def __iter__(self) -> Iterator[T]:
        job = self._job
        token = job.open_stream()
        signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._watch(lambda start, count: signals.put(start))
        cursor = _StreamCursor()
        consumed = 0
        self._consumed(0)
        try:
            while True:
                values = self._scan(cursor)
                got = bool(values)
                for value in values:
                    yield value
                    consumed += 1
                del values
                job.advance_stream(token, consumed if job.ordered else cursor.next)
                self._consumed(consumed, waiting=not got)
                if self._exhausted(cursor):
                    return
                if not got:
                    if self._backend.capabilities.in_process:  # the work runs on waiters
                        self._backend.assist(lambda: not signals.empty())
                    signals.get()
                    while not signals.empty():  # coalesce: one scan serves many signals
                        signals.get_nowait()
        except KeyboardInterrupt:
            self.cancel()
            raise
        finally:
            job.close_stream(token)

    def _keep_results(self) -> None:
        """The whole list of results will be asked for (an await, ``result()``, item
        callbacks, a cache recording them): a stream must not drop any."""
        self._job.pin_results()

    def _consumed(self, count: int, waiting: bool = False) -> None:
        """A stream consumer has taken ``count`` results: the backend hands out new items
        only while fewer than ``STREAM_WINDOW`` wait for it (the job's backpressure).
        ``waiting``: the consumer is about to wait, so the backend is nudged whatever the
        flag says (it may have read an older count just before this one was stored)."""
        job = self._job
        job.stream_consumed = max(count, job.stream_consumed or 0)
        if (job.stream_blocked or waiting) and job.source is not None and job.pulled - count < STREAM_WINDOW:
            job.stream_blocked = False
            self._backend.input_ready(job)

    def _watch(self, fn: Callable[[int, int], object]) -> None:
        self._backend.watch(self._job, fn)


_SCAN_BATCH = 8192  # results taken per scan: a stream hands them over in batches this big
_SUCCEEDED = bytes([TaskState.SUCCEEDED])
# states -> 1 for a final state, 0 otherwise (bytes.translate)
_FINAL_MASK = bytes(int(state in FINAL_STATES) for state in range(256))


class _StreamCursor:
    """Where one iterator of a map is. ``next``: the first item not yielded yet (ordered:
    the next to yield). Unordered also flags the items from ``base`` on it yielded."""

    __slots__ = ("base", "next", "yielded")

    def __init__(self) -> None:
        self.next = 0
        self.base = 0
        self.yielded = bytearray()


def _indexable(obj: object) -> bool:
    return (
        hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, dict | set | frozenset)
    )


def _worker_of(exc: BaseException) -> int | None:
    """The worker id from the note the pool adds (``raised in worker 2 (pid ...) ...``)."""
    for note in getattr(exc, "__notes__", ()):
        if note.startswith("raised in worker "):
            word = note.split()[3]
            if word.isdigit():
                return int(word)
    return None


def _point_to_handle(exc: BaseException, handle: MapHandle[Any]) -> None:
    """The error an awaited map raises leads back to its job: ``exc.handle``."""
    try:
        exc.handle = handle  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception type without __dict__
        return
    failed = len(handle._job.errors)
    exc.add_note(
        f"exc.handle is the job's handle: exc.handle.failures() lists the {failed} failed "
        "item(s), exc.handle.retry_failed() reruns them, exc.handle.partial_results() has "
        "the other results"
    )
