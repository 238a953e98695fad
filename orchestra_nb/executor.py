"""``orchestra.Executor``: a ``concurrent.futures.Executor`` on an orchestra pool (layer 3).

Code written for the standard library (``executor.submit``, ``executor.map``,
``loop.run_in_executor``, ``concurrent.futures.wait`` / ``as_completed``, and libraries that
take an executor) runs on orchestra's workers: cell-defined functions, lambdas and closures
included, with remote tracebacks, self-healing workers and, in a notebook, live progress.

How a result travels (the pool's public API only)::

    submit(fn, *args) ── pool.run ──> TaskHandle ── handle.on_done (pool's I/O thread) ─┐
                                                                                        │
    Future  <── set_result / set_exception / cancel ── callback thread <── SimpleQueue ─┘
      └── add_done_callback callbacks run here, never on the pool's I/O thread

The I/O thread only puts the finished future into a queue. The executor's callback thread
(``orchestra-executor-callbacks``) settles the future, which runs its callbacks; it runs while
the executor has unsettled futures and ends with the last one (or at ``shutdown``), so an
executor that is simply dropped leaves no thread behind. The shutdown of each pool it has
futures on waits for those to settle (and joins the thread if they were its last work):
their callbacks never run after the pool's ``shutdown()`` returned.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any, ParamSpec, TypeVar

from . import _api
from ._exceptions import PoolClosedError, WorkerCrashedError
from ._handles import TaskHandle
from ._state import PoolState, TaskState
from ._waiting import wait_interruptibly

__all__ = ["BrokenWorkerError", "Executor"]

P = ParamSpec("P")
T = TypeVar("T")

_THREAD_NAME = "orchestra-executor-callbacks"
# States in which a task has not started: Future.cancel() succeeds there (stdlib semantics).
_NOT_STARTED = frozenset({TaskState.SCHEDULED, TaskState.PENDING, TaskState.RETRYING})
_local = threading.local()  # ``dispatching``: this thread is an executor's callback thread


class BrokenWorkerError(WorkerCrashedError, BrokenProcessPool):
    """The worker running this future's task died (a segfault, ``os._exit``, the OOM killer...).

    It is a :class:`~orchestra_nb.WorkerCrashedError` and also a
    :class:`concurrent.futures.process.BrokenProcessPool` (hence a
    :class:`concurrent.futures.BrokenExecutor`), so code written for the standard library
    catches it. Unlike the standard library, only the future whose task killed its worker
    fails: the pool replaces the worker and the executor keeps serving. ``__cause__`` is the
    pool's own error (a ``WorkerCrashedError``, or ``MemoryLimitError`` for a worker killed
    over its memory limit).
    """

    @classmethod
    def from_crash(cls, crash: WorkerCrashedError) -> BrokenWorkerError:
        error = cls(crash.worker_id, crash.pid, crash.returncode, crash.task_index)
        error.args = crash.args  # the same message, with the pool's reason for the crash
        error.__cause__ = crash
        return error


class _Future(concurrent.futures.Future[Any]):
    """A ``concurrent.futures.Future`` whose ``cancel()`` reaches the pool.

    It stays PENDING until it is settled (the pool does not report each task's start), so
    ``running()`` asks the task's handle instead.
    """

    def __init__(self, handle: TaskHandle[Any], settled: queue.SimpleQueue[_Future], pool: _api.Pool) -> None:
        super().__init__()
        self._handle = handle
        self._pool = pool
        self._settled = settled
        self._cancel_lock = threading.RLock()  # reentrant: cancel() runs callbacks inside it
        self._cancel_notified = False

    def _on_handle_done(self, _handle: Any) -> None:
        """On whatever thread settles the handle (often the pool's I/O thread): hand over."""
        self._settled.put(self)

    def _settle(self) -> None:
        """On the callback thread: copy the handle's outcome here (runs the callbacks)."""
        if self.done():
            return
        handle = self._handle
        try:
            value = handle.result(0)
        except concurrent.futures.CancelledError:
            self._cancel_now()
            return
        except WorkerCrashedError as crash:
            outcome: tuple[bool, Any] = (False, BrokenWorkerError.from_crash(crash))
        except BaseException as exc:  # the task's own error, with its remote traceback
            outcome = (False, exc)
        else:
            outcome = (True, value)
        try:
            if outcome[0]:
                self.set_result(outcome[1])
            else:
                self.set_exception(outcome[1])
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile: cancel() wins

    def _cancel_now(self) -> bool:
        """Cancel this future (not the task) and tell ``wait``/``as_completed`` waiters."""
        with self._cancel_lock:
            if not super().cancel():
                return False
            if not self._cancel_notified:
                self._cancel_notified = True
                self.set_running_or_notify_cancel()  # CANCELLED -> CANCELLED_AND_NOTIFIED
            return True

    def cancel(self) -> bool:
        """Cancel the task if it has not started (True); a running or finished one is left
        alone (False), as in the standard library."""
        if self.done():
            return self.cancelled()
        if self._handle.state not in _NOT_STARTED:
            return False
        if not self._cancel_now():
            return False  # finished meanwhile
        self._handle.cancel()  # should it have just started, the pool interrupts it
        return True

    def running(self) -> bool:
        return not self.done() and self._handle.state == TaskState.RUNNING

    def _interrupt(self) -> None:
        """A KeyboardInterrupt while waiting: stop the task, even a running one."""
        if self._handle.cancel():
            self._cancel_now()

    def _wait_inline(self, timeout: float | None) -> None:
        """Waiting on the callback thread itself (a callback calling ``result()``): the
        thread cannot also settle this future, so wait on the task's handle directly."""
        try:
            self._handle.wait_finished(timeout)
        finally:
            if self._handle.done():
                self._settle()

    def _wait_settled(self, timeout: float | None) -> float | None:
        """Wait until settled (in slices on the main thread, see ``_waiting``); the
        timeout left for the standard library's wait, which then returns at once."""
        if self.done() or threading.current_thread() is not threading.main_thread():
            return timeout

        def settled(slice_timeout: float | None) -> bool:
            with self._condition:  # the standard library Future's own
                if not self.done():
                    self._condition.wait(slice_timeout)
            return self.done()

        return None if wait_interruptibly(settled, timeout) else 0.0

    def result(self, timeout: float | None = None) -> Any:
        if getattr(_local, "dispatching", False) and not self.done():
            self._wait_inline(timeout)
        try:
            return super().result(self._wait_settled(timeout))
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if getattr(_local, "dispatching", False) and not self.done():
            self._wait_inline(timeout)
        try:
            return super().exception(self._wait_settled(timeout))
        except KeyboardInterrupt:
            self._interrupt()
            raise


class Executor(concurrent.futures.Executor):
    """A :class:`concurrent.futures.Executor` whose work runs on an orchestra pool.

    ``Executor()`` shares the default pool (the one ``orchestra.run`` uses: no extra
    processes); ``Executor(pool=p)`` uses pool ``p``; ``Executor(max_workers=4, **options)``
    creates a pool of its own (``options`` as for :class:`~orchestra_nb.Pool`) and closes it
    at :meth:`shutdown`. It follows the standard library's documented behaviour:
    :meth:`submit` returns genuine :class:`concurrent.futures.Future` objects that work with
    ``wait``, ``as_completed`` and ``asyncio.wrap_future`` (so
    ``await loop.run_in_executor(orchestra.Executor(), f, x)`` works in a cell);
    :meth:`map` yields results in order and measures ``timeout`` from the call;
    ``shutdown(wait, cancel_futures)``; ``with`` blocks; ``Future.cancel()`` cancels a task
    that has not started.

    Where it differs, on purpose:

    * A worker that dies fails only the future whose task killed it, with
      :class:`BrokenWorkerError` (a ``BrokenProcessPool``, hence a ``BrokenExecutor``); the
      executor keeps serving, where the standard library breaks the whole executor. A task
      is first retried on a fresh worker up to the pool's ``max_worker_crashes`` times.
    * A function or argument that cannot be pickled raises
      :class:`~orchestra_nb.SerializationError` from :meth:`submit` (and :meth:`map`) at once,
      naming the culprit, not later from the future.
    * A ``KeyboardInterrupt`` (a notebook's "interrupt kernel") while waiting in
      ``result()``/``exception()`` or iterating :meth:`map` stops that work, running tasks
      included; the standard library leaves running tasks running.
    * Callbacks (``add_done_callback``) run one at a time on the executor's callback thread
      (like a process pool's management thread), never on the pool's I/O thread. A callback
      may call ``result()`` of another of its futures, but must not block in
      ``concurrent.futures.wait``/``as_completed`` on them.
    """

    def __init__(
        self, max_workers: int | None = None, *, pool: _api.Pool | None = None, **pool_options: Any
    ) -> None:
        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int):
                raise TypeError(f"max_workers must be an int or None, got {max_workers!r}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if pool is not None:
            if max_workers is not None or pool_options:
                raise TypeError("Executor(pool=...) takes no max_workers or pool options: "
                                "configure that pool instead")
            if not isinstance(pool, _api.Pool):
                raise TypeError(f"pool must be an orchestra_nb.Pool, got {pool!r}")
        self._given_pool = pool
        self._owned_pool: _api.Pool | None = None
        if max_workers is not None or pool_options:
            self._owned_pool = _api.Pool(max_workers, **pool_options)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when nothing is unsettled
        self._unsettled: set[_Future] = set()
        self._settled: queue.SimpleQueue[_Future] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Per pool the current thread has futures on: what that pool's shutdown calls.
        self._shutdown_waits: dict[_api.Pool, Callable[[], None]] = {}
        self._waiting_at_shutdown = 0  # pool shutdowns in _settle_all_of
        self._last_thread: threading.Thread | None = None
        self._shutdown = False

    @property
    def pool(self) -> _api.Pool:
        """The pool this executor's work runs on (for the shared default: the current one)."""
        return self._owned_pool or self._given_pool or _api.default_pool()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns a ``concurrent.futures.Future``."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        pool = self.pool
        if pool.state != PoolState.RUNNING:  # a given pool that was closed (or broke)
            raise RuntimeError(f"cannot schedule new futures: its pool is {pool.state}")
        try:
            handle = pool.run(fn, *args, **kwargs)
        except PoolClosedError as exc:
            raise RuntimeError(f"cannot schedule new futures: {exc}") from exc
        future = _Future(handle, self._settled, pool)
        with self._lock:
            self._unsettled.add(future)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name=_THREAD_NAME, daemon=True)
                # daemon: at interpreter exit the pool cancels its work; nobody awaits these
                # futures any more, and a non-daemon thread would hold up the exit.
                self._thread.start()
            if pool not in self._shutdown_waits:
                # The pool's shutdown waits for this pool's futures to settle (and joins the
                # thread if they were its last work), so that the thread does not outlive
                # the pool, running callbacks after its shutdown() returned, when nobody
                # shuts this executor down.
                self._shutdown_waits[pool] = wait = functools.partial(self._settle_all_of, pool)
                pool._wait_at_shutdown(wait)
        handle.on_done(future._on_handle_done)
        return future

    def _dispatch(self) -> None:
        """The callback thread: settle finished futures until none is left unsettled."""
        _local.dispatching = True
        settled = self._settled
        while True:
            future = settled.get()
            future._settle()
            with self._lock:
                self._unsettled.discard(future)
                if self._waiting_at_shutdown:
                    self._idle.notify_all()
                if not self._unsettled:
                    self._thread = None
                    self._last_thread = threading.current_thread()
                    for pool, wait in self._shutdown_waits.items():
                        pool._forget_wait_at_shutdown(wait)
                    self._shutdown_waits.clear()
                    self._idle.notify_all()
                    return

    def _settle_all_of(self, pool: _api.Pool) -> None:
        """On ``pool``'s shutdown path, once all its handles are done (their futures are
        queued): wait until they are settled, and for the thread's end if that was its last
        work."""
        if getattr(_local, "dispatching", False):
            return  # a callback shutting the pool down: this thread settles the rest after it
        with self._lock:
            self._waiting_at_shutdown += 1
            try:
                while any(future._pool is pool for future in self._unsettled):
                    self._idle.wait()
            finally:
                self._waiting_at_shutdown -= 1
            thread = self._last_thread if self._thread is None else None
        if thread is not None:
            thread.join()

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` on the workers, like the standard library's: every item is
        submitted now; the iterator yields the results in order and raises a task's error at
        its place. ``timeout`` counts from this call: ``next()`` raises ``TimeoutError`` if a
        result is not there by then. ``chunksize`` sends that many items per task. Leaving the
        iterator early cancels the tasks not started yet; an interrupt stops them all."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, got {chunksize!r}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
            return _MapResults(futures, end_time, chunked=False)
        items = zip(*iterables, strict=False)
        chunks = iter(lambda: list(itertools.islice(items, chunksize)), [])
        call: Callable[..., Any] = fn
        chunk_futures = [self.submit(_call_chunk, call, chunk) for chunk in chunks]
        return _MapResults(list(chunk_futures), end_time, chunked=True)

    def interrupt(self, futures: Iterable[concurrent.futures.Future[Any]]) -> None:
        """Stop these futures' tasks, running ones included (a ``KeyboardInterrupt`` in the
        task; its worker is replaced if it ignores that for the pool's ``cancel_grace``).
        Their futures end cancelled, unless they finished first. An orchestra addition:
        ``Future.cancel()`` leaves running tasks alone, as in the standard library."""
        _interrupt_all(futures)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more work; ``cancel_futures=True`` cancels the futures not started yet.
        ``wait=True`` returns once every future is settled (and the executor's own pool, if
        it has one, is closed). A shared pool stays open."""
        with self._lock:
            self._shutdown = True
            unsettled = list(self._unsettled)
        if cancel_futures:
            for future in unsettled:
                future.cancel()
        if wait and not getattr(_local, "dispatching", False):  # (a callback cannot wait for itself)
            with self._lock:
                while self._unsettled:
                    self._idle.wait()
                thread = self._last_thread
            if thread is not None:
                thread.join()
        if self._owned_pool is not None:
            self._owned_pool.shutdown(wait)

    def __repr__(self) -> str:
        which = "own pool" if self._owned_pool else "given pool" if self._given_pool else "default pool"
        state = "shut down" if self._shutdown else f"{len(self._unsettled)} unsettled"
        return f"<orchestra_nb.Executor on its {which}, {state}>"


def _call_chunk(fn: Callable[..., T], chunk: list[tuple[Any, ...]]) -> list[T]:
    """In the worker: one task for ``chunksize`` items of :meth:`Executor.map`."""
    return [fn(*args) for args in chunk]


class _MapResults(Iterator[Any]):
    """The iterator of :meth:`Executor.map`. Closing it, or dropping it, before the end
    cancels the tasks not started yet (even if it was never iterated); an interrupt while
    it waits stops them all."""

    def __init__(
        self, futures: list[concurrent.futures.Future[Any]], end_time: float | None, chunked: bool
    ) -> None:
        futures.reverse()  # pop() from the end: a yielded future is released at once
        self._futures = futures
        self._end_time = end_time
        self._chunked = chunked
        self._chunk: Iterator[Any] = iter(())

    def __next__(self) -> Any:
        for value in self._chunk:
            return value
        futures = self._futures
        if not futures:
            raise StopIteration
        future = futures[-1]
        timeout = None if self._end_time is None else self._end_time - time.monotonic()
        try:
            value = future.result(timeout)
        except KeyboardInterrupt:
            _interrupt_all(futures)
            raise
        except BaseException:
            self.close()  # the error (or TimeoutError) ends the iteration, as in the stdlib
            raise
        futures.pop()
        if self._chunked:
            self._chunk = iter(value)
            return next(self)
        return value

    def close(self) -> None:
        futures, self._futures = self._futures, []
        for future in futures:
            future.cancel()

    def __del__(self) -> None:
        if self._futures:
            with contextlib.suppress(Exception):  # (at interpreter exit the pool may be gone)
                self.close()


def _interrupt_all(futures: Iterable[concurrent.futures.Future[Any]]) -> None:
    for future in futures:
        if isinstance(future, _Future):
            future._interrupt()
