"""The local process pool as a backend (layer 2): worker processes on this machine.

``LocalBackend`` is the thread-safe face of the engine: every call is handed to the I/O
thread (``_ioloop``), where ``_pool.PoolCore`` owns the jobs and wires the parts that own the
rest (its docstring has the data-flow diagram and the diagram of the parts):

* ``_pool_workers.WorkerSet``: the worker processes (spawn, backoff, resize, reaping);
* ``_pool_dispatch.Dispatcher``: the ready jobs, adaptive chunking, sending, retries;
* ``_pool_results.ResultPath``: a chunk's results back into its job;
* ``_pool_recovery.Recovery``: crashes, cancels, timeouts, stalls, memory limits;
* ``_pool_wire.Wire``: the run directory, the sockets, shared memory;
* ``_procs`` / ``_worker``: spawning a worker process and what runs in it;
* ``_feed``: reading lazy inputs on a feeder thread, never on the I/O thread;
* ``backends/_caller``: the awaiting caller's fast path (busy polling, loops that read
  their own results) and the engine's side of it (``ResultReaders``).

This backend talks to ``PoolCore`` only; only it (and ``tests/local/``) imports the engine's
modules (``tests/unit/test_layers.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .. import _protocol as proto
from .._bus import EventBus
from .._events import Event
from .._exceptions import PoolClosedError, SerializationError
from .._ioloop import acquire_io_thread, release_io_thread
from .._jobs import Job
from .._policy import MemoryPolicy
from .._pool import PoolCore, PoolOptions
from .._serialize import callable_name, dumps
from .._spin import DEFAULT_BUSY_POLL, BusyPoll
from .._state import CloseMode, PoolState, WorkerState
from .._stats import PoolStatistics
from . import available_cpus
from ._base import Backend, Capabilities, LoopAttachment, ThreadAttachment
from ._caller import CallerDrain, ThreadDrain, busy_poll

__all__ = ["LocalBackend", "create_local_backend"]


def create_local_backend(
    events: EventBus,
    workers: int | None,
    *,
    start_timeout: float = 30.0,
    max_worker_crashes: int = 2,
    cancel_grace: float = 1.0,
    timeout_grace: float = 1.0,
    memory_limit: int | str | None = None,
    memory_soft_limit: int | str | None = None,
    max_tasks_per_worker: int | None = None,
    max_result_bytes: int | None = None,
    heartbeat: float = 0.5,
    stall_timeout: float | None = 10.0,
    replace_stalled: bool | None = None,
    env: dict[str, str] | None = None,
    python: str | None = None,
    retry_random: Callable[[], float] | None = None,
    busy_poll: float = DEFAULT_BUSY_POLL,
) -> LocalBackend:
    """Validate the local pool's options (see ``Pool``'s docstring) and start it."""
    n = available_cpus() if workers is None else workers
    if n < 1:
        raise ValueError(f"a pool needs at least 1 worker, got {workers}")
    total_memory = _total_memory() if memory_limit or memory_soft_limit else None
    extra: dict[str, Any] = {}
    if python:
        extra["python"] = python
    if retry_random is not None:
        extra["retry_random"] = retry_random
    options = PoolOptions(
        workers=n,
        start_timeout=start_timeout,
        heartbeat=heartbeat,
        stall_timeout=stall_timeout,
        replace_stalled=replace_stalled,
        max_worker_crashes=max_worker_crashes,
        cancel_grace=cancel_grace,
        timeout_grace=timeout_grace,
        max_result_bytes=max_result_bytes,
        memory=MemoryPolicy.parse(memory_soft_limit, memory_limit, total_memory=total_memory),
        max_tasks_per_worker=max_tasks_per_worker,
        env=tuple((env or {}).items()),
        busy_poll=BusyPoll(busy_poll).window,  # validated here, in the caller's thread
        **extra,
    )
    return LocalBackend(options, events)


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class LocalBackend(Backend):
    name = "local"
    places_buffers = True  # a job's large buffers go to pinned segments (_shared)
    capabilities = Capabilities(
        interrupt_running=True, run_on_all=True, shared_memory=True, in_process=False,
        resize=True, pinning=True, pause=True,
    )

    def __init__(self, options: PoolOptions, events: EventBus) -> None:
        super().__init__(events)
        self._io = acquire_io_thread()
        self._core = PoolCore(options, events, self._io.loop)
        self._close_future: concurrent.futures.Future[None] | None = None
        self._close_lock = threading.Lock()
        self._sys_path_lock = threading.Lock()
        self._ending: list[threading.Thread] = []
        self._engine_gone = False  # closed, and the I/O thread let go of

        async def start() -> None:
            self._core.start()

        try:
            self._io.run_sync(start())
        except BaseException:
            release_io_thread(self._io)
            raise
        self._io.on_exit(self._close_at_exit)

    # --- work -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._note_sys_path()
        self._on_engine(self._core.submit, job)

    def _note_sys_path(self) -> None:
        """Directories the caller added to ``sys.path`` since the last submit reach the
        workers before this job's chunks (and those of the batch of calls it joins). A
        comparison per submit when nothing changed."""
        core = self._core
        if sys.path != core.workers.sys_path:
            with self._sys_path_lock:
                if sys.path != core.workers.sys_path:
                    core.workers.sys_path = list(sys.path)  # a new list: the I/O thread reads it whole
                    core.workers.sys_path_version += 1

    def cancel(self, job: Job, *, kill: bool = False) -> None:
        self._on_engine(self._core.cancel, job.id, kill)

    def cancel_item(self, job: Job, index: int) -> None:
        self._on_engine(self._core.cancel_item, job, index)

    def find_job(self, job_id: int) -> Job | None:
        return self._core.jobs.get(job_id)  # a dict read: atomic under the GIL

    def pause(self, job: Job, paused: bool) -> None:
        self._on_engine(self._core.set_paused, job.id, paused)

    def input_ready(self, job: Job) -> None:
        self._on_engine(self._core.input_ready, job)

    def input_ready_now(self, job: Job) -> None:
        # On this thread, holding the engine: the items go out without waking the I/O
        # thread. (After close there is no engine thread to wait for; the core is idle.)
        self._io.run_now(self._core.input_ready, job)

    def watch(self, job: Job, fn: Callable[[int, int], object]) -> None:
        def register() -> None:
            job.watchers.append(fn)
            fn(-2, 0)  # rescan: items may have finished before the watcher existed

        self._on_engine(register)

    def _on_engine(self, fn: Callable[..., object], *args: Any) -> None:
        """Hand ``fn(*args)`` to the I/O thread; once the pool is closed and that thread
        is gone, run it here (nothing else touches the engine any more)."""
        with self._close_lock:
            if not self._engine_gone:
                self._io.call(fn, *args)
                return
        fn(*args)

    def run_on_all(self, job: Job, *, replay: bool) -> None:
        self._note_sys_path()

        async def submit() -> None:
            core = self._core
            job.targets = [
                w.id
                for w in core.workers.procs.values()
                if w.state in (WorkerState.STARTING, WorkerState.READY) and not w.retire
            ]
            assert isinstance(job.source, Iterator)  # the API's [item]
            item = next(job.source)
            job.source = iter([item] * len(job.targets))
            job.total = len(job.targets)
            if replay:
                core.add_setup(job.name, job.digest, job.fn_payload, item)
            core.submit(job)

        self._io.run_sync(submit())

    def publish(self, event: Event) -> None:
        if self._io.in_thread():
            self.events.publish(event)
        else:
            self._io.call(self.events.publish, event)

    # --- the pool ---------------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        return PoolState(self._core.state)

    @property
    def target_workers(self) -> int:
        return self._core.workers.target

    def resize(self, workers: int) -> None:
        if self._close_future is not None:
            raise PoolClosedError(f"cannot resize a pool that is {self._core.state}")

        async def resize() -> None:
            if self._core.state != PoolState.RUNNING:
                raise PoolClosedError(f"cannot resize a pool that is {self._core.state}")
            self._core.resize(workers)

        self._call_sync(resize())

    def worker_pids(self) -> list[int]:
        async def pids() -> list[int]:
            return [w.pid for w in self._core.workers.procs.values() if w.state != WorkerState.DEAD]

        pids_now: list[int] = self._call_sync(pids(), default=[])
        return pids_now

    def statistics(self) -> PoolStatistics:
        async def statistics() -> PoolStatistics:
            return self._core.statistics()

        if self._io.in_thread():
            return self._core.statistics()
        return self._call_sync(statistics(), default=None) or self._core.statistics()

    def _call_sync(self, coro: Any, default: Any = ...) -> Any:
        """Run ``coro`` on the I/O thread; after close (no thread), ``default`` or raise."""
        if self._close_future is not None and self._close_future.done():
            coro.close()
            if default is ...:
                raise PoolClosedError("the pool is shut down")
            return default
        return self._io.run_sync(coro)

    def started(self, timeout: float | None = None) -> concurrent.futures.Future[None]:
        core = self._core

        async def wait_ready() -> None:
            await core.workers.all_ready.wait()
            if core.broken is not None:
                raise core.broken
            if core.state != PoolState.RUNNING:
                raise PoolClosedError("the pool is shut down")

        if self._close_future is not None:
            fut: concurrent.futures.Future[None] = concurrent.futures.Future()
            fut.set_exception(core.broken or PoolClosedError("the pool is shut down"))
            return fut
        return self._io.submit(wait_ready())

    def close(self, mode: CloseMode, timeout: float = 10.0) -> concurrent.futures.Future[None]:
        """One shutdown path: the engine closes on the I/O thread; then the bus's delivery
        thread ends and this pool's share of the I/O thread is given back."""
        with self._close_lock:
            if self._close_future is not None:
                if mode is CloseMode.KILL and not self._close_future.done():
                    self._io.call(self._kill_now)
                return self._close_future
            self._io.forget(self._close_at_exit)
            done: concurrent.futures.Future[None] = concurrent.futures.Future()
            self._close_future = done
        closing = self._io.submit(self._core.close(str(mode), timeout))
        io = self._io

        def closed(fut: concurrent.futures.Future[None]) -> None:
            exc = fut.exception() if not fut.cancelled() else None
            with self._close_lock:
                self._engine_gone = True
            self._ending = [t for t in (self.events.close(join=False),) if t is not None]
            if release_io_thread(io):
                self._ending.append(io.thread)
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(None)

        closing.add_done_callback(closed)
        return done

    def join(self, timeout: float | None = 10.0) -> None:
        """After :meth:`close`: wait for the threads it stopped (the bus's delivery thread,
        and the I/O thread if this was the last pool using it)."""
        me = threading.current_thread()
        for thread in self._ending:
            if thread is not me:
                thread.join(timeout)

    def _kill_now(self) -> None:
        for w in list(self._core.workers.procs.values()):
            w.kill("close", "pool killed")

    def _close_at_exit(self) -> Any:
        return self._core.close("cancel", timeout=3.0)

    # --- the caller's fast path ---------------------------------------------------------

    def flush(self) -> None:
        self._io.flush()

    def assist(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        if self._core.readers.poll.window and not done() and self._core.state == PoolState.RUNNING:
            busy_poll(self._io, self._core, done, timeout)

    def attach_loop(self, loop: asyncio.AbstractEventLoop, *, flush: bool = True) -> LoopAttachment | None:
        if self._core.state != PoolState.RUNNING:
            return None
        return CallerDrain.acquire(self._io, self._core, loop, flush=flush)

    def attach_thread(self) -> ThreadAttachment | None:
        core = self._core
        if core.state != PoolState.RUNNING or core.wire.data_fd < 0 or self._io.in_thread():
            return None
        return ThreadDrain(self._io, core)

    def prepare_call(self, fn: Callable[..., Any], item: Any) -> Any:
        """Pickle ``run``'s arguments now, so an unpicklable one raises here, named. The
        frames are what the first dispatch sends: the arguments are pickled (and copied)
        once."""
        core = self._core
        self._note_sys_path()  # a call may join a batch submitted before sys.path changed
        return check_call_arguments(fn, item, core.wire.segments or core.wire.shm_dir)

    def in_engine_thread(self) -> bool:
        return self._io.in_thread()


def check_call_arguments(
    fn: Callable[..., Any], item: tuple[tuple[Any, ...], dict[str, Any]], shm: proto.Segments | str | None
) -> tuple[list[Any], tuple[str | None, ...]]:
    """Pickle one call's arguments into message frames; an unpicklable argument raises a
    :class:`SerializationError` naming it (position or keyword, type, cause)."""
    args, kwargs = item
    try:
        return proto.pickle_payload(dumps, [item], shm)
    except Exception as exc:
        for i, arg in enumerate(args):
            try:
                dumps(arg)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle argument {i} of {callable_name(fn)} (type "
                    f"{type(arg).__qualname__}): {type(inner).__name__}: {inner}"
                ) from inner
        for key, arg in kwargs.items():
            try:
                dumps(arg)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle keyword argument {key!r} of {callable_name(fn)} "
                    f"(type {type(arg).__qualname__}): {type(inner).__name__}: {inner}"
                ) from inner
        raise SerializationError(f"cannot pickle the arguments of {callable_name(fn)}: {exc}") from exc
