"""The public API (layer 3): ``Pool``, and ``map``/``run`` on a lazily created default pool.

Pickling happens here, in the caller's thread, before any worker is involved: an
unpicklable function, global or ``run`` argument raises at once, naming the culprit.
Everything else is handed to the pool's supervisor on the I/O thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import _handles, _protocol as proto
from ._bus import EventBus, Subscription
from ._circuit import CircuitBreaker, CircuitChange
from ._events import CircuitChanged, Event
from ._exceptions import PoolClosedError, SerializationError
from ._handles import MapHandle, TaskHandle
from ._ioloop import io_thread
from ._jobs import DEFAULT_RETRY, Job, JobFuture
from ._policy import MemoryPolicy, RetryPolicy
from ._pool import PoolCore, PoolOptions, PoolState, next_job_id
from ._serialize import dumps, dumps_callable
from ._spin import DEFAULT_BUSY_POLL, BusyPoll
from ._stats import PoolStatistics

__all__ = [
    "Pool",
    "configure",
    "default_pool",
    "map",
    "options",
    "run",
    "run_on_all",
    "shutdown",
    "status",
]

T = TypeVar("T")


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True, slots=True)
class _CallOptions:
    timeout: float | None = None
    retry: RetryPolicy | None = None
    name: str | None = None
    circuit: CircuitBreaker | None = None


class Pool:
    """A pool of worker processes.

    ``Pool(workers=4)`` starts its workers at once, in the background; calls made before
    they are ready wait in the queue. Use it as ``async with`` / ``with``, or call
    :meth:`aclose` / :meth:`shutdown`.

    Options (all keyword-only): ``start_timeout`` for each worker's ready handshake;
    ``max_worker_crashes``, how many workers a single task may kill before it fails with
    ``WorkerCrashedError``; ``cancel_grace`` and ``timeout_grace``, how long an interrupted
    task may take to stop before its worker is killed; ``memory_limit`` (kill above it) and
    ``memory_soft_limit`` (recycle after the current task), as bytes or strings like
    ``"2GB"``; ``max_tasks_per_worker``; ``max_result_bytes``; ``heartbeat`` and
    ``stall_timeout`` for stall detection (``replace_stalled=True`` replaces any stalled
    worker; the default, None, only a stopped one, e.g. by SIGSTOP, not one busy in native
    code holding the GIL);
    ``env`` for extra environment variables of the workers; ``retry_random``, the jitter
    source of retry backoffs (a callable returning floats in ``[0, 1)``; for exact tests);
    ``busy_poll``, how long (seconds, default 0.0003) a worker that just finished a task, and
    a caller awaiting or waiting on one ``run()``, keep checking for the next message before
    they sleep: it saves the thread wake-ups that dominate a short call's round trip, at the
    cost of that much CPU after each message. It backs off by itself when messages come
    slower; ``0`` turns it off.

    Circuit breakers: ``breaker = pool.circuit("db", fail_max=5, window=60, reset_timeout=30)``
    returns a :class:`CircuitBreaker` (the same one for the same name) whose state changes are
    published on ``pool.events`` as :class:`CircuitChanged` events. Route calls through it with
    ``pool.options(circuit=breaker).run(f, x)`` or ``pool.map(f, xs, circuit=breaker)``: every
    task is admitted by the breaker when it is dispatched and its outcome (success, exception,
    crash of its worker) is reported back; once the breaker is open, tasks fail fast with
    :class:`CircuitOpenError` without reaching a worker (an open breaker fails ``run`` at
    once), until ``reset_timeout`` has passed and one trial task is let through. The pool
    drives such a breaker on its I/O thread; to guard code in a task instead, create a
    ``CircuitBreaker`` inside the worker (each process then has its own).
    """

    def __init__(
        self,
        workers: int | None = None,
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
    ) -> None:
        n = available_cpus() if workers is None else workers
        if n < 1:
            raise ValueError(f"a pool needs at least 1 worker, got {workers}")
        total_memory = _total_memory() if memory_limit or memory_soft_limit else None
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
            **_extra_options(python=python, retry_random=retry_random),
        )
        self._io = io_thread()
        self.events = EventBus()
        self._core = PoolCore(options, self.events, self._io.loop)
        self._batch_lock = threading.Lock()
        self._open_batches: dict[bytes, _CallBatch] = {}
        self._circuits: dict[str, CircuitBreaker] = {}

        async def start() -> None:
            self._core.start()

        self._io.run_sync(start())
        self._io.on_exit(self._close_at_exit)

    # --- submitting work --------------------------------------------------------------

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskHandle[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns an awaitable :class:`TaskHandle`."""
        return self._run(fn, args, kwargs, _PLAIN_CALL)

    def map(
        self,
        fn: Callable[..., T],
        /,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        timeout: float | None = None,
        retries: int | RetryPolicy | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        name: str | None = None,
        circuit: CircuitBreaker | None = None,
    ) -> MapHandle[T]:
        """Apply ``fn`` to every item (``fn(*items)`` with several iterables, like ``map``).

        Starts at once and returns a :class:`MapHandle`: ``await`` it for the results in
        input order (completion order with ``ordered=False``), or iterate it to stream
        them. Input is read lazily with a bounded number of tasks in flight.
        ``chunksize`` defaults to adaptive chunks of tens of milliseconds; each item is
        still accounted for on its own. ``timeout`` (seconds per task) interrupts a task
        that runs too long, then kills its worker if it does not stop; ``retries`` with
        ``retry_on`` re-runs failed tasks with exponential backoff; ``circuit`` (from
        :meth:`circuit`) admits every task through a circuit breaker (tasks run one per chunk).
        """
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        star = len(iterables) > 1
        source = zip(*iterables, strict=False) if star else iter(iterables[0])
        total = _length(iterables)
        payload, digest = dumps_callable(fn)
        job = Job(
            next_job_id(),
            name or _name(fn),
            digest,
            payload,
            source,
            total,
            star=star,
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            timeout=_check_timeout(timeout),
            retry=_retry(retries, retry_on),
        )
        job.circuit = _check_circuit(circuit)
        handle: MapHandle[T] = MapHandle(self._io, self._core, job)
        self._io.call(self._core.submit, job)
        return handle

    def options(
        self,
        *,
        timeout: float | None = None,
        retries: int | RetryPolicy | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        name: str | None = None,
        circuit: CircuitBreaker | None = None,
    ) -> _Configured:
        """``pool.options(timeout=5, retries=2).run(f, x)``: per-call options for ``run``."""
        return _Configured(self, _CallOptions(_check_timeout(timeout), _retry(retries, retry_on),
                                              name, _check_circuit(circuit)))

    def circuit(
        self,
        name: str,
        *,
        fail_max: int = 5,
        window: float = 60.0,
        reset_timeout: float = 30.0,
        exclude: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> CircuitBreaker:
        """The pool's circuit breaker called ``name`` (created on first use with these
        settings; later calls return it unchanged). Its state changes are published on
        :attr:`events` as :class:`CircuitChanged`; pass it as ``circuit=`` to ``map`` or
        ``options`` so that tasks go through it (see the class docstring)."""
        found = self._circuits.get(name)
        if found is None:
            found = self._circuits[name] = CircuitBreaker(
                name, fail_max=fail_max, window=window, reset_timeout=reset_timeout,
                clock=clock, on_change=self._publish_circuit, exclude=exclude,
            )
        return found

    def _publish_circuit(self, change: CircuitChange) -> None:
        event = CircuitChanged(change.name, change.old.value, change.new.value, change.failures)
        if self._io.in_thread():
            self.events.publish(event)
        else:
            self._io.call(self.events.publish, event)

    def _run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], opts: _CallOptions
    ) -> TaskHandle[Any]:
        payload, digest = dumps_callable(fn)
        item = (args, kwargs)
        frames = _check_arguments(fn, item, self._core.segments or self._core.shm_dir)
        if (opts is _PLAIN_CALL or opts == _PLAIN_CALL) and len(frames[0]) == 1 \
                and len(frames[0][0]) <= _BATCH_ARG_BYTES:
            return self._batched_call(fn, digest, payload, item, frames)
        job = Job(
            next_job_id(),
            opts.name or _name(fn),
            digest,
            payload,
            iter([item]),
            1,
            call=True,
            timeout=opts.timeout,
            retry=opts.retry,
        )
        job.circuit = opts.circuit
        job.first_payload = frames
        handle: TaskHandle[Any] = TaskHandle(self._io, self._core, job)
        self._io.call(self._core.submit, job)
        return handle

    def _batched_call(
        self, fn: Callable[..., Any], digest: bytes, payload: bytes, item: Any,
        frames: tuple[list[Any], tuple[str | None, ...]],
    ) -> TaskHandle[Any]:
        """Add a call to the open batch of calls to the same function (or open one).

        Calls made in a burst then travel many per message and cost the I/O thread a slice
        assignment each instead of a job each; every call keeps its own handle and future.
        """
        future = JobFuture()
        with self._batch_lock:
            batch = self._open_batches.get(digest)
            new = batch is None or batch.sealed or len(batch.items) >= _BATCH_MAX
            if new:
                items: list[Any] = []
                job = Job(next_job_id(), _name(fn), digest, payload, iter(items), None,
                          call=True, return_exceptions=True)
                job.item_futures = []
                batch = self._open_batches[digest] = _CallBatch(job, items, frames)
            assert batch is not None
            index = len(batch.items)
            batch.items.append(item)
            assert batch.job.item_futures is not None
            batch.job.item_futures.append(future)
        if new:
            if _handles.create_hook is not None:
                MapHandle(self._io, self._core, batch.job)  # one progress view per batch
            self._io.call(self._submit_batch, batch)
        return TaskHandle(self._io, self._core, batch.job, index, future)

    def _submit_batch(self, batch: _CallBatch) -> None:
        """On the I/O thread: close the batch to new calls, then run it."""
        with self._batch_lock:
            batch.sealed = True
            if self._open_batches.get(batch.job.digest) is batch:
                del self._open_batches[batch.job.digest]
        batch.job.total = len(batch.items)
        if batch.job.total == 1:  # a lone call: its arguments are pickled already
            batch.job.first_payload = batch.first_frames
        batch.first_frames = None
        self._core.submit(batch.job)

    def run_on_all(
        self, fn: Callable[..., T], /, *args: Any, replay: bool = False, **kwargs: Any
    ) -> MapHandle[T]:
        """Run ``fn(*args, **kwargs)`` once on every worker; the handle gives one result per
        worker. With ``replay=True`` it also runs on every worker started later (after a
        crash, a resize or recycling) before that worker takes other work."""
        payload, digest = dumps_callable(fn)
        item = (args, kwargs)
        _check_arguments(fn, item, None)

        async def submit() -> MapHandle[T]:
            core = self._core
            targets = [w.id for w in core.workers.values() if w.state in ("starting", "ready")
                       and not w.retire]
            job = Job(next_job_id(), f"on all workers: {_name(fn)}", digest, payload,
                      iter([item] * len(targets)), len(targets), call=True, targets=targets)
            handle: MapHandle[T] = MapHandle(self._io, core, job)
            if replay:
                core.add_setup(_name(fn), digest, payload, item)
            core.submit(job)
            return handle

        return self._io.run_sync(submit())

    # --- the pool ---------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of workers the pool keeps running."""
        return self._core.target_workers

    @property
    def state(self) -> str:
        return self._core.state

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (for tests and for ``kill -STOP`` style debugging)."""

        async def pids() -> list[int]:
            return [w.pid for w in self._core.workers.values() if w.state != "dead"]

        return self._io.run_sync(pids())

    def resize(self, workers: int) -> None:
        """Grow or shrink the pool; busy workers finish their current chunk first."""

        async def resize() -> None:
            self._core.resize(workers)

        self._io.run_sync(resize())

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot: workers (pid, state, current job and item, CPU, memory), jobs
        with per-state counts, and the queue length."""

        async def statistics() -> PoolStatistics:
            return self._core.statistics()

        return self._io.run_sync(statistics())

    def status(self) -> dict[str, Any]:
        """:meth:`statistics` as plain data (for JSON and quick looks)."""
        return self.statistics().as_dict()

    def subscribe(self, callback: Callable[[Event], object], **filters: Any) -> Subscription:
        """Call ``callback(event)`` (on a delivery thread) for every event of this pool."""
        return self.events.subscribe(callback, **filters)

    async def started(self) -> None:
        """Wait until every worker has completed its ready handshake."""
        fut = asyncio.run_coroutine_threadsafe(self._wait_ready(), self._io.loop)
        await asyncio.wrap_future(fut)

    def wait_started(self, timeout: float | None = None) -> None:
        self._io.run_sync(self._wait_ready(), timeout)

    async def _wait_ready(self) -> None:
        await self._core.all_ready.wait()
        if self._core.broken is not None:
            raise self._core.broken
        if self._core.state != PoolState.RUNNING:
            raise PoolClosedError("the pool is shut down")

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Shut down: finish all work first (or cancel it with ``cancel_pending=True``)."""
        mode = "cancel" if cancel_pending else "graceful"
        await asyncio.wrap_future(self._io.submit(self._core.close(mode)))
        self._io.forget(self._close_at_exit)

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Synchronous :meth:`aclose`; ``wait=False`` returns while the workers stop."""
        mode = "cancel" if cancel_pending else "graceful"
        fut = self._io.submit(self._core.close(mode))
        self._io.forget(self._close_at_exit)
        if wait:
            fut.result()

    def kill(self) -> None:
        """SIGKILL every worker now; unfinished work fails with ``PoolClosedError``."""
        self._io.run_sync(self._core.close("kill"))
        self._io.forget(self._close_at_exit)

    def _close_at_exit(self) -> Any:
        return self._core.close("cancel", timeout=3.0)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(cancel_pending=exc[0] is not None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(cancel_pending=exc[0] is not None)

    def __repr__(self) -> str:
        return f"<orchestra_nb.Pool workers={self.workers} state={self.state}>"


class _CallBatch:
    """``run`` calls of one function gathered into one job until the I/O thread takes it."""

    __slots__ = ("first_frames", "items", "job", "sealed")

    def __init__(
        self, job: Job, items: list[Any], first_frames: tuple[list[Any], tuple[str | None, ...]]
    ) -> None:
        self.job = job
        self.items = items
        self.sealed = False
        # The first call's arguments as _check_arguments pickled them ([item], like a
        # chunk of that one call): sent as they are if the batch stays a lone call.
        self.first_frames: tuple[list[Any], tuple[str | None, ...]] | None = first_frames


_PLAIN_CALL = _CallOptions()
_BATCH_MAX = 4096  # calls per batch: bounds the work behind one progress view
_BATCH_ARG_BYTES = 16 * 1024  # larger arguments travel alone, pickled once by the caller


class _Configured:
    """A pool with per-call options applied to ``run`` (and ``map``)."""

    def __init__(self, pool: Pool, opts: _CallOptions) -> None:
        self._pool = pool
        self._opts = opts

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskHandle[T]:
        return self._pool._run(fn, args, kwargs, self._opts)

    def map(self, fn: Callable[..., T], /, *iterables: Iterable[Any], **kw: Any) -> MapHandle[T]:
        kw.setdefault("timeout", self._opts.timeout)
        kw.setdefault("retries", self._opts.retry)
        kw.setdefault("name", self._opts.name)
        kw.setdefault("circuit", self._opts.circuit)
        return self._pool.map(fn, *iterables, **kw)


def _check_arguments(
    fn: Callable[..., Any], item: tuple[tuple[Any, ...], dict[str, Any]], shm: proto.Segments | str | None
) -> tuple[list[Any], tuple[str | None, ...]]:
    """Pickle ``run``'s arguments now, so an unpicklable one raises here, named. The frames
    are what the first dispatch sends: the arguments are pickled (and copied) once."""
    args, kwargs = item
    try:
        return proto.pickle_payload(dumps, [item], shm)
    except Exception as exc:
        for i, arg in enumerate(args):
            try:
                dumps(arg)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle argument {i} of {_name(fn)} (type {type(arg).__qualname__}): "
                    f"{type(inner).__name__}: {inner}"
                ) from inner
        for key, arg in kwargs.items():
            try:
                dumps(arg)
            except Exception as inner:
                raise SerializationError(
                    f"cannot pickle keyword argument {key!r} of {_name(fn)} "
                    f"(type {type(arg).__qualname__}): {type(inner).__name__}: {inner}"
                ) from inner
        raise SerializationError(f"cannot pickle the arguments of {_name(fn)}: {exc}") from exc


def _extra_options(**options: Any) -> dict[str, Any]:
    """Options left to PoolOptions' defaults unless given."""
    return {key: value for key, value in options.items() if value}


def _check_circuit(circuit: CircuitBreaker | None) -> CircuitBreaker | None:
    if circuit is not None and not isinstance(circuit, CircuitBreaker):
        raise TypeError(f"circuit must be a CircuitBreaker (see Pool.circuit), got {circuit!r}")
    return circuit


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return timeout


def _retry(retries: int | RetryPolicy | None, retry_on: tuple[type[BaseException], ...] | None) -> RetryPolicy:
    if retries is None and retry_on is None:
        return DEFAULT_RETRY  # validated once, not on every call
    policy = RetryPolicy.coerce(retries)
    if retry_on is not None:
        policy = dataclasses.replace(policy, retry_on=tuple(retry_on))
    return policy


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths)


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


# --- the default pool -----------------------------------------------------------------------

_default_lock = threading.Lock()
_default: Pool | None = None
_default_options: dict[str, Any] = {}


def configure(**options: Any) -> None:
    """Set the default pool's options (``workers=4``, ``memory_limit="2GB"``, ...).

    Takes effect when the default pool is next created; a running default pool with other
    options is shut down (after its work) so that the next call starts a fresh one.
    """
    global _default
    with _default_lock:
        _default_options.clear()
        _default_options.update(options)
        old, _default = _default, None
    if old is not None:
        old.shutdown(wait=False)


def default_pool() -> Pool:
    """The shared default pool, created (and warmed up in the background) on first use."""
    global _default
    pool = _default
    if pool is not None and pool.state == PoolState.RUNNING:
        return pool
    with _default_lock:
        if _default is None or _default.state != PoolState.RUNNING:
            _default = Pool(**_default_options)
        return _default


def map(fn: Callable[..., T], /, *iterables: Iterable[Any], **options: Any) -> MapHandle[T]:
    """``pool.map`` on the default pool; see :meth:`Pool.map`."""
    return default_pool().map(fn, *iterables, **options)


def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskHandle[T]:
    """``pool.run`` on the default pool; see :meth:`Pool.run`."""
    return default_pool().run(fn, *args, **kwargs)


def run_on_all(fn: Callable[..., T], /, *args: Any, replay: bool = False, **kwargs: Any) -> MapHandle[T]:
    """``pool.run_on_all`` on the default pool; see :meth:`Pool.run_on_all`."""
    return default_pool().run_on_all(fn, *args, replay=replay, **kwargs)


def options(**opts: Any) -> _Configured:
    """``orchestra.options(timeout=5).run(f, x)`` on the default pool."""
    return default_pool().options(**opts)


def status() -> dict[str, Any]:
    """The default pool's status (see :meth:`Pool.status`)."""
    return default_pool().status()


def shutdown(wait: bool = True, *, cancel_pending: bool = False) -> None:
    """Shut the default pool down, if it exists; the next call starts a new one."""
    global _default
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.shutdown(wait, cancel_pending=cancel_pending)
