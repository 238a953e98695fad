"""The inline backend (layer 2): every task runs in this process, one at a time.

For debugging, the way joblib's ``n_jobs=1`` and dask's synchronous scheduler are used:
``Pool(backend="inline")`` (or ``%config Orchestra.backend = "inline"``) runs a task in the
thread that waits for it, so ``breakpoint()``, ``pdb`` and ``%debug`` work inside it, and
nothing is pickled. The handles, the events, the statistics and the widget are the same as
with worker processes.

Who runs the tasks: a thread that blocks on a handle (``result()``, ``for``) runs queued
tasks until its own work is done (:meth:`InlineBackend.assist`); a coroutine that awaits a
handle, or submits work from a running event loop, gets a *stepper* on its loop that runs
tasks a few milliseconds at a time between the loop's other callbacks, so the notebook's
widgets keep updating. Only one task runs at a time (``_run_lock``); the task table is
changed under ``_table_lock``, held briefly and never while user code runs, so that
``cancel()`` from another thread never waits for a task.

What it cannot do (``capabilities``): stop a running task (no ``timeout=``; a Cancel lets
the running task finish and drops the rest), resize, or pin calls. "Interrupt kernel" hits
the running task itself, since it runs in the kernel's main thread: its job is cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import CircuitOpenError, PoolClosedError
from .._feed import FeedBuffer
from .._jobs import Chunk, Job, describe_input
from .._state import CloseMode, PoolState, TaskState, WorkerState
from .._stats import PoolStatistics, WorkerStatistics
from ._base import Backend, Capabilities

if TYPE_CHECKING:
    from .._bus import EventBus

__all__ = ["InlineBackend"]

STEP_SECONDS = 0.01  # a stepper runs tasks for about this long per loop callback
WORKER_ID = 0  # the one "worker": this process


class InlineBackend(Backend):
    name = "inline"
    capabilities = Capabilities(
        interrupt_running=False, run_on_all=True, shared_memory=False, in_process=True,
        resize=False, pinning=False, pause=True,
    )

    def __init__(self, events: EventBus, workers: int | None = None, *,
                 retry_random: Callable[[], float] | None = None, **options: Any) -> None:
        """``workers`` is accepted and ignored (there is one: this process), so that a
        configuration written for the local pool works here too; other options of the
        local pool are refused by name."""
        if options:
            raise TypeError(f"the inline backend does not take {', '.join(sorted(options))} "
                            "(options of the local process pool)")
        super().__init__(events)
        self._retry_random = retry_random or random.random
        self._state = PoolState.RUNNING
        self._table_lock = threading.RLock()  # the job tables, briefly
        self._run_lock = threading.RLock()  # one task at a time (re-entrant: nested waits)
        self._jobs: dict[int, Job] = {}
        self._ready: list[Job] = []  # jobs that may have work, in submission order
        self._retries: list[tuple[float, int, Job, int, Any]] = []  # (due, seq, job, index, item)
        self._seq = itertools.count()
        self._current: tuple[int, int] | None = None  # (job, item) running now
        self._tasks_done = 0
        self._loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()  # steppers
        self._stepping: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._closed: concurrent.futures.Future[None] | None = None

    # --- work -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._table_lock:
            job.open(self.events)
            if self._state is not PoolState.RUNNING:
                job.fail_all(PoolClosedError("the pool is shut down"))
                return
            job.on_finished = self._forget
            self._jobs[job.id] = job
            self._ready.append(job)
        self.flush()

    def cancel(self, job: Job, *, kill: bool = False) -> None:
        with self._table_lock:
            if job.finished.is_set():
                return
            job.cancel_pending()
            job.future.cancel()
            job.progress()

    def cancel_item(self, job: Job, index: int) -> None:
        with self._table_lock:
            job.cancelled_items.add(index)
            if index < job.pulled and job.states[index] in (TaskState.PENDING, TaskState.RETRYING):
                job.transition(index, 1, TaskState.CANCELLED)
                job.progress()

    def watch(self, job: Job, fn: Callable[[int, int], object]) -> None:
        with self._table_lock:
            job.watchers.append(fn)
            fn(-2, 0)

    def find_job(self, job_id: int) -> Job | None:
        with self._table_lock:
            return self._jobs.get(job_id)

    def pause(self, job: Job, paused: bool) -> None:
        with self._table_lock:  # the lock tasks are handed out under: JobPaused comes first
            job.set_paused(paused)
            if not paused and job.has_work() and job not in self._ready:
                self._ready.append(job)
        if not paused:
            self.input_ready(job)  # wake the steppers

    def input_ready(self, job: Job) -> None:
        for loop in list(self._loops):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(self._ensure_stepper, loop)

    def run_on_all(self, job: Job, *, replay: bool) -> None:
        # One worker, this process: the call runs once. Replay is moot (no worker joins).
        job.total = 1
        self.submit(job)

    # --- running tasks ----------------------------------------------------------------

    def _next_chunk(self) -> Chunk | None:
        """The next task to run (under the table lock), retries that are due first."""
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _, _, job, index, item = heapq.heappop(self._retries)
            if not job.cancelled and job.state_of(index) is TaskState.RETRYING:
                job.transition(index, 1, TaskState.PENDING)
                job.requeued.append(Chunk(job, index, [item]))
                if job not in self._ready:
                    self._ready.append(job)
        for job in list(self._ready):
            if job.paused:
                continue
            job.seal()
            chunk = job.take(1)
            if chunk is None:
                if not job.has_work() or job.cancelled:
                    self._ready.remove(job)
                job.check_done()
                continue
            return chunk
        return None

    def _run_one(self) -> bool:
        """Run one task on this thread; False if none can run now. True also when another
        thread is running one (the caller checks its own condition again)."""
        if not self._run_lock.acquire(timeout=0.05):
            return True
        try:
            with self._table_lock:
                chunk = self._next_chunk()
                if chunk is None:
                    return False
                job, index, item = chunk.job, chunk.start, chunk.items[0]
                if index in job.cancelled_items:
                    job.transition(index, 1, TaskState.CANCELLED)
                    job.progress()
                    return True
                if job.circuit is not None:
                    try:
                        job.circuit.before_call()
                    except CircuitOpenError as exc:
                        self._failed(job, index, item, exc)
                        return True
                job.transition(index, 1, TaskState.RUNNING, WORKER_ID)
                self._current = (job.id, index)
            fn = job.fn
            assert fn is not None, "the API sets job.fn"
            started = time.perf_counter()
            try:
                if job.call:
                    args, kwargs = item
                    value = fn(*args, **kwargs)
                elif job.star:
                    value = fn(*item)
                else:
                    value = fn(item)
            except KeyboardInterrupt:
                # The user interrupted the kernel (or pressed Ctrl-C) inside the task.
                with self._table_lock:
                    self._current = None
                    job.transition(index, 1, TaskState.CANCELLED, WORKER_ID)
                self.cancel(job)
                raise
            except BaseException as exc:  # SystemExit too: the task's failure
                ran = time.perf_counter() - started
                with self._table_lock:
                    self._current = None
                    self._tasks_done += 1
                    if job.circuit is not None:
                        job.circuit.record_failure(exc)
                    exc.add_note(f"raised by task {index} of job {job.id} ({job.name!r}), input "
                                 f"{describe_input(job, item)}, run inline in this process")
                    self._failed(job, index, item, exc, ran)
                return True
            with self._table_lock:
                self._current = None
                self._tasks_done += 1
                if job.circuit is not None:
                    job.circuit.record_success()
                if job.state_of(index) is TaskState.RUNNING:
                    job.succeed(index, [value], WORKER_ID)
                job.progress()
            return True
        finally:
            self._run_lock.release()

    def _failed(
        self, job: Job, index: int, item: Any, exc: BaseException, ran: float | None = None
    ) -> None:
        attempt = job.attempts.get(index, 0) + 1
        job.attempts[index] = attempt
        if not job.cancelled and isinstance(exc, Exception) and job.retry.should_retry(exc, attempt):
            delay = job.retry.delay(attempt, self._retry_random)
            job.transition(index, 1, TaskState.RETRYING, WORKER_ID, attempt, delay)
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._seq), job, index, item))
        else:
            job.fail(index, exc, WORKER_ID, ran)
        job.progress()

    def _idle_wait(self, until: float | None) -> bool:
        """Nothing runnable: wait for a retry to fall due or a feeder to read items.
        False if there is nothing to wait for (another thread runs the work)."""
        with self._table_lock:
            due = self._retries[0][0] if self._retries else None
            feeds = [j.source for j in self._ready if isinstance(j.source, FeedBuffer)]
        now = time.monotonic()
        if due is None and not feeds:
            return False
        wait = 0.05 if due is None else max(0.0, due - now)
        if until is not None:
            wait = min(wait, max(0.0, until - now))
        if feeds:
            feeds[0].wait_for_items(wait)
        else:
            time.sleep(wait)
        return True

    # --- who runs them ------------------------------------------------------------------

    def assist(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        until = None if timeout is None else time.monotonic() + timeout
        while not done() and (until is None or time.monotonic() < until):
            if not self._run_one() and not self._idle_wait(until):
                return

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loops.add(loop)
        self._ensure_stepper(loop)

    def _ensure_stepper(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop not in self._stepping and not loop.is_closed():
            self._stepping.add(loop)
            loop.call_soon(self._step, loop)

    def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        until = time.monotonic() + STEP_SECONDS
        ran = False
        try:
            while time.monotonic() < until and self._run_one():
                ran = True
        except KeyboardInterrupt:
            pass  # the job was cancelled; raising here would stop the kernel's loop
        with self._table_lock:
            due = self._retries[0][0] if self._retries else None
        if ran:
            loop.call_soon(self._step, loop)
        elif due is not None:
            loop.call_later(max(0.0, due - time.monotonic()), self._step, loop)
        else:
            # Nothing to run: a feeder that reads more calls input_ready, a new submit flushes.
            self._stepping.discard(loop)

    # --- the pool ---------------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if job in self._ready:
            self._ready.remove(job)

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def target_workers(self) -> int:
        return 1

    def resize(self, workers: int) -> None:
        raise ValueError("the inline backend runs one task at a time in this process; it "
                         "cannot resize (use the local backend for workers)")

    def worker_pids(self) -> list[int]:
        return []

    def statistics(self) -> PoolStatistics:
        now = time.monotonic()
        with self._table_lock:
            current = self._current
            worker = WorkerStatistics(
                id=WORKER_ID, pid=os.getpid(), state=WorkerState.READY,
                job=None if current is None else current[0],
                item=None if current is None else current[1], tasks_done=self._tasks_done,
            )
            jobs = tuple(j.statistics(now) for j in self._jobs.values() if not j.internal)
        queued = sum(j.waiting for j in jobs)
        return PoolStatistics("inline", self._state, 1, (worker,), jobs, queued)

    def started(self, timeout: float | None = None) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        if self._state is PoolState.RUNNING:
            fut.set_result(None)
        else:
            fut.set_exception(PoolClosedError("the pool is shut down"))
        return fut

    def close(self, mode: CloseMode, timeout: float = 10.0) -> concurrent.futures.Future[None]:
        """Graceful: the work left runs now, on this thread; cancel / kill: it is dropped."""
        with self._table_lock:
            if self._closed is not None:
                return self._closed
            self._closed = concurrent.futures.Future()
            self._state = PoolState.CLOSING
            jobs = list(self._jobs.values())
        if mode is CloseMode.GRACEFUL:
            for job in jobs:
                self.assist(job.finished.is_set)
        with self._table_lock:
            for job in list(self._jobs.values()):
                if mode is CloseMode.CANCEL:
                    self.cancel(job)
                if not job.finished.is_set():
                    job.fail_all(PoolClosedError("the pool was shut down"))
            self._retries.clear()
            self._ready.clear()
            self._state = PoolState.CLOSED
        self.events.close()
        self._closed.set_result(None)
        return self._closed
