"""The public API (layer 3): ``Pool``, and ``map``/``run`` on a lazily created default pool.

The API builds each job (``_jobs.Job``: the function pickled here, in the caller's thread,
so that an unpicklable function, global or ``run`` argument raises at once, naming the
culprit) and hands it to the pool's backend, through the interface of
``backends/_base.py`` only: which backend runs it (local processes, inline, Dask) is
invisible from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import itertools
import pickle
import sys
import threading
import time
import types
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from . import _driver, _feed as feed, _handles, backends
from ._bus import EventBus, Subscription
from ._circuit import CircuitBreaker, CircuitChange
from ._events import CircuitChanged, Event
from ._handles import MapHandle, TaskHandle
from ._jobs import DEFAULT_RETRY, Job, JobFuture, next_job_id
from ._policy import RetryPolicy
from ._serialize import callable_name, dumps_callable, dumps_callable_shared
from ._state import CloseMode, PoolState
from ._stats import PoolStatistics, ScheduledStatistics
from .backends._base import Backend, Capabilities, ThreadAttachment

__all__ = [
    "Pool",
    "cancel_scheduled",
    "configure",
    "default_pool",
    "map",
    "options",
    "pools",
    "run",
    "run_on_all",
    "shutdown",
    "status",
]

T = TypeVar("T")


def _cache() -> types.ModuleType:
    # The result cache pulls in sqlite3 and importlib.metadata (tens of ms at a cold start),
    # so it is imported only by the first call that asks for it.
    from . import _cache as cache_module

    return cache_module


def _is_cached(fn: object) -> bool:
    """Whether ``fn`` is an ``@orchestra.cached`` function (none exist before the cache loads)."""
    cache_module = sys.modules.get(f"{__package__}._cache")
    return cache_module is not None and bool(cache_module.is_cached(fn))


@dataclasses.dataclass(frozen=True, slots=True)
class _CallOptions:
    timeout: float | None = None
    retry: RetryPolicy | None = None
    name: str | None = None
    circuit: CircuitBreaker | None = None
    worker: int | None = None
    on_success: Callable[[Any], object] | None = None
    on_error: Callable[[BaseException], object] | None = None
    cache: Any = False  # see _cache.resolve_store


class Pool:
    """A pool of workers: processes on this machine by default, or another backend.

    ``Pool(workers=4)`` starts its workers at once, in the background; calls made before
    they are ready wait in the queue. Use it as ``async with`` / ``with``, or call
    :meth:`aclose` / :meth:`shutdown`.

    ``backend``: ``"local"`` (worker processes, the default); ``"inline"``, every task run
    one at a time in this process, in the thread that waits for it, so that
    ``breakpoint()`` and ``%debug`` work inside tasks (like joblib's ``n_jobs=1`` or dask's
    synchronous scheduler; nothing is pickled, ``timeout=`` and interrupts of a running
    task are not available); ``"dask"`` or a ``distributed.Client``, a Dask cluster
    (``address=`` names a scheduler; needs the ``dask`` extra).

    ``name`` labels the pool in views (the side panel); the default is ``pool-<id>``
    (``id``: 1, 2, ... in this process), the default pool's is ``"default"``. Every open
    pool is listed by :func:`pools`.

    Options of the local pool (all keyword-only): ``start_timeout`` for each worker's
    ready handshake; ``max_worker_crashes``, how many workers a single task may kill before
    it fails with ``WorkerCrashedError``; ``cancel_grace`` and ``timeout_grace``, how long
    an interrupted task may take to stop before its worker is killed; ``memory_limit`` (kill
    above it) and ``memory_soft_limit`` (recycle after the current task), as bytes or
    strings like ``"2GB"``; ``max_tasks_per_worker``; ``max_result_bytes``; ``heartbeat``
    and ``stall_timeout`` for stall detection (``replace_stalled=True`` replaces any
    stalled worker; the default, None, only a stopped one, e.g. by SIGSTOP, not one busy in
    native code holding the GIL); ``env`` for extra environment variables of the workers; ``retry_random``, the
    jitter source of retry backoffs (a callable returning floats in ``[0, 1)``; for exact
    tests); ``busy_poll``, how long (seconds, default 0.0003) a worker that just finished a
    task, and a caller awaiting or waiting on one ``run()``, keep checking for the next
    message before they sleep: it saves the thread wake-ups that dominate a short call's
    round trip, at the cost of that much CPU after each message. It backs off by itself
    when messages come slower; ``0`` turns it off.

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
        self, workers: int | None = None, *, backend: Any = "local", name: str | None = None, **options: Any
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"a pool's name must be a string, got {name!r}")
        self.events = EventBus()
        self._backend: Backend = backends.create(backend, self.events, workers, **options)
        self._batch_lock = threading.Lock()
        self._open_batches: dict[bytes, _CallBatch] = {}
        self._circuits: dict[str, CircuitBreaker] = {}
        # What settles this pool's handles outside the backend (an Executor's callback
        # thread): the shutdown path waits for it, so none of it outlives a closed pool.
        self._shutdown_waits_lock = threading.Lock()
        self._shutdown_waits: set[Callable[[], None]] = set()
        self.id: int = next(_pool_ids)
        self.name: str = name if name is not None else f"pool-{self.id}"
        _forget_closed()  # pools that broke and were never shut down
        with _registry_lock:
            _registry[self.id] = self

    # --- submitting work --------------------------------------------------------------

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskHandle[T]:
        """Run ``fn(*args, **kwargs)`` in a worker; returns an awaitable :class:`TaskHandle`.
        Arguments that are handles or steps are awaited first and replaced by their results
        (a ``CompositeHandle`` is returned then; see ``_driver``)."""
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
        on_success: Callable[[list[T]], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        on_item_success: Callable[[int, T], object] | None = None,
        on_item_error: Callable[[int, BaseException], object] | None = None,
        cache: Any = False,
        checkpoint: str | None = None,
    ) -> MapHandle[T]:
        """Apply ``fn`` to every item (``fn(*items)`` with several iterables, like ``map``).

        Starts at once and returns a :class:`MapHandle`: ``await`` it for the results in
        input order (completion order with ``ordered=False``), or iterate it to stream
        them. Input is read lazily with a bounded number of tasks in flight; a lazy input
        (a generator, another map's handle, an async iterator) is read on a feeder of its
        own, so a slow one delays only its own job. ``chunksize`` defaults to adaptive
        chunks of tens of milliseconds; each item is still accounted for on its own.
        ``timeout`` (seconds per task) interrupts a task that runs too long, then kills its
        worker if it does not stop; ``retries`` with ``retry_on`` re-runs failed tasks with
        exponential backoff; ``circuit`` (from :meth:`circuit`) admits every task through a
        circuit breaker (tasks run one per chunk).
        ``on_success(results)``/``on_error(exc)`` once for the job, ``on_item_success(index,
        value)``/``on_item_error(index, exc)`` once per item: see ``_driver``. An iterable
        that is another map's handle streams into this map; run handles and steps
        (``Task``, ``Sequence``...) are awaited first (the handle returned is then a
        ``CompositeHandle``).
        ``cache=True`` (or a store path) keeps every result in the result store and sends
        only the items it lacks; ``checkpoint="name"`` also records the map as a named run
        (``orchestra.store.runs()``). The handle is then a ``CachedMapHandle`` (docs/store.md).
        """
        if cache is not False or checkpoint is not None or _is_cached(fn):
            return cast(MapHandle[T], _cache().cached_map(
                self, fn, iterables, cache=cache, checkpoint=checkpoint, chunksize=chunksize,
                ordered=ordered, return_exceptions=return_exceptions, timeout=timeout,
                retries=retries, retry_on=retry_on, name=name, circuit=circuit))
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        # Another map's handle as an input streams (read by a feeder); other handles and
        # steps are awaited first.
        deferred = any(_driver.is_deferred(it) and not isinstance(it, MapHandle) for it in iterables)
        if on_success or on_error or on_item_success or on_item_error or deferred:
            plain = {
                "chunksize": chunksize,
                "ordered": ordered,
                "return_exceptions": return_exceptions,
                "timeout": timeout,
                "retries": retries,
                "retry_on": retry_on,
                "name": name,
                "circuit": circuit,
            }
            return _driver.map_call(  # type: ignore[no-any-return]
                self,
                fn,
                iterables,
                plain,
                name or callable_name(fn),
                on_success,
                on_error,
                on_item_success,
                on_item_error,
            )
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, got {chunksize}")
        timeout = self._check_timeout(timeout)
        star = len(iterables) > 1
        payload, digest, fn_buffers = self._dumps_map_function(fn)
        source, total, feeder = feed.plan(iterables, star)
        job = Job(
            next_job_id(),
            name or callable_name(fn),
            digest,
            payload,
            source,
            total,
            star=star,
            chunksize=chunksize,
            ordered=ordered,
            return_exceptions=return_exceptions,
            timeout=timeout,
            retry=_retry(retries, retry_on),
        )
        job.fn = fn
        job.fn_buffers = fn_buffers
        job.circuit = _check_circuit(circuit)
        handle: MapHandle[T] = MapHandle(self._backend, job)
        handle._remember(
            functools.partial(
                self.map,
                fn,
                chunksize=chunksize,
                ordered=ordered,
                return_exceptions=return_exceptions,
                timeout=timeout,
                retries=retries,
                retry_on=retry_on,
                name=name,
                circuit=circuit,
            ),
            iterables,
        )
        if feeder is not None:
            feeder.start(str(job.id), functools.partial(self._backend.input_ready, job))
        self._backend.submit(job)
        return handle

    def _dumps_map_function(
        self, fn: Callable[..., Any]
    ) -> tuple[bytes, bytes, tuple[pickle.PickleBuffer, ...]]:
        """A map's function pickled: its large captured buffers out of band when the backend
        places them once per job (``Backend.places_buffers``), else all in its payload."""
        if self._backend.places_buffers:
            return dumps_callable_shared(fn)
        payload, digest = dumps_callable(fn)
        return payload, digest, ()

    def _open_map(
        self, fn: Callable[..., T], *, name: str, star: bool = True
    ) -> tuple[MapHandle[T], Job, feed.FeedBuffer]:
        """A map whose items the caller adds as it goes: ``inlet.put_many(items)`` then
        :meth:`_input_added`, and ``inlet.end(None)`` when there are no more (for layers on
        the pool that produce work incrementally, like the joblib backend: one job, and one
        progress view, per joblib call). Like :meth:`map` otherwise (adaptive chunks); the
        caller reads the job's task table for the results."""
        payload, digest, fn_buffers = self._dumps_map_function(fn)
        inlet = feed.FeedBuffer()
        job = Job(next_job_id(), name, digest, payload, inlet, None, star=star)
        job.fn_buffers = fn_buffers
        job.fn = fn
        job.queue_one_more = True  # its producer keeps only a few items in flight
        handle: MapHandle[T] = MapHandle(self._backend, job)
        inlet.on_items = functools.partial(self._backend.input_ready, job)  # (its end)
        self._backend.submit(job)
        return handle, job, inlet

    def _input_added(self, job: Job) -> None:
        """This thread added items to ``job``'s inlet: the backend takes them now, on this
        thread where it can (the local pool sends them from here, with no hand-over)."""
        self._backend.input_ready_now(job)

    def _flush(self) -> None:
        """Send the work this thread queued now, on this thread (the backend's ``flush``)."""
        self._backend.flush()

    def _attach_thread(self) -> ThreadAttachment | None:
        """This thread will wait for results of work it drives, many times over: where the
        backend can, it reads them itself (``Backend.attach_thread``); ``close()`` it."""
        return self._backend.attach_thread()

    def _assist(self, done: Callable[[], bool], timeout: float | None = None) -> None:
        """This thread is about to block until ``done()``: the backend may use it meanwhile
        (the local pool reads results on it for a moment; see ``Backend.assist``)."""
        self._backend.assist(done, timeout)

    def options(
        self,
        *,
        timeout: float | None = None,
        retries: int | RetryPolicy | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        name: str | None = None,
        circuit: CircuitBreaker | None = None,
        worker: int | None = None,
        on_success: Callable[[Any], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        cache: Any = False,
    ) -> _Configured:
        """``pool.options(timeout=5, retries=2).run(f, x)``: per-call options for ``run``.
        ``worker``: run on that worker (an id from :meth:`statistics`), where the backend
        can pin calls; the call fails with ``WorkerCrashedError`` if that worker is gone.
        ``on_success(value)``/``on_error(exc)`` are called once when the call ends;
        ``cache=True``: a cached call (see :meth:`map`)."""
        if worker is not None and not self._backend.capabilities.pinning:
            raise ValueError(f"the {self._backend.name} backend cannot pin a call to a worker")
        return _Configured(
            self,
            _CallOptions(
                self._check_timeout(timeout),
                _retry(retries, retry_on),
                name,
                _check_circuit(circuit),
                worker,
                on_success,
                on_error,
                cache,
            ),
        )

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
                name,
                fail_max=fail_max,
                window=window,
                reset_timeout=reset_timeout,
                clock=clock,
                on_change=self._publish_circuit,
                exclude=exclude,
            )
        return found

    def publish(self, event: Event) -> None:
        """Publish ``event`` on :attr:`events`, from any thread, in order with the pool's
        own events: for layers built on the pool (the result cache's ``TasksCached``)."""
        self._backend.publish(event)

    def _publish_circuit(self, change: CircuitChange) -> None:
        self._backend.publish(CircuitChanged(change.name, change.old.value, change.new.value, change.failures))

    def _check_timeout(self, timeout: float | None) -> float | None:
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            if not self._backend.capabilities.interrupt_running:
                raise ValueError(
                    f"the {self._backend.name} backend cannot stop a running task, so it does not take timeout="
                )
        return timeout

    def _run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], opts: _CallOptions
    ) -> TaskHandle[Any]:
        if opts.on_success or opts.on_error or _driver.has_deferred(args, kwargs):
            plain = dataclasses.replace(opts, on_success=None, on_error=None)
            return _driver.run_call(  # type: ignore[no-any-return]
                self,
                args,
                kwargs,
                lambda a, k: self._run(fn, a, k, plain),
                opts.name or callable_name(fn),
                opts.on_success,
                opts.on_error,
            )
        payload, digest = dumps_callable(fn)
        item = (args, kwargs)
        frames = self._backend.prepare_call(fn, item)
        if (opts is _PLAIN_CALL or opts == _PLAIN_CALL) and (
            frames is None or (len(frames[0]) == 1 and len(frames[0][0]) <= _BATCH_ARG_BYTES)
        ):
            return self._batched_call(fn, digest, payload, item, frames)
        job = Job(
            next_job_id(),
            opts.name or callable_name(fn),
            digest,
            payload,
            iter([item]),
            1,
            call=True,
            timeout=opts.timeout,
            retry=opts.retry,
            targets=None if opts.worker is None else [opts.worker],
        )
        job.fn = fn
        job.circuit = opts.circuit
        job.first_payload = frames
        handle: TaskHandle[Any] = TaskHandle(self._backend, job)
        self._backend.submit(job)
        return handle

    def _batched_call(
        self,
        fn: Callable[..., Any],
        digest: bytes,
        payload: bytes,
        item: Any,
        frames: tuple[list[Any], tuple[str | None, ...]] | None,
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
                job = Job(
                    next_job_id(),
                    callable_name(fn),
                    digest,
                    payload,
                    iter(items),
                    None,
                    call=True,
                    return_exceptions=True,
                )
                job.fn = fn
                job.item_futures = []
                batch = self._open_batches[digest] = _CallBatch(job, items, frames)
            assert batch is not None
            index = len(batch.items)
            batch.items.append(item)
            assert batch.job.item_futures is not None
            batch.job.item_futures.append(future)
        if new:
            if _handles.create_hook is not None:
                MapHandle(self._backend, batch.job)  # one progress view per batch
            batch.job.sealer = functools.partial(self._seal, batch)
            self._backend.submit(batch.job)
        return TaskHandle(self._backend, batch.job, index, future)

    def _seal(self, batch: _CallBatch) -> None:
        """``job.sealer``, called by the backend when it takes the job: close the batch to
        new calls (calls made until then still join it)."""
        with self._batch_lock:
            batch.sealed = True
            if self._open_batches.get(batch.job.digest) is batch:
                del self._open_batches[batch.job.digest]
        batch.job.total = len(batch.items)
        if batch.job.total == 1:  # a lone call: its arguments are pickled already
            batch.job.first_payload = batch.first_frames
        batch.first_frames = None

    def run_on_all(
        self, fn: Callable[..., T], /, *args: Any, replay: bool = False, **kwargs: Any
    ) -> MapHandle[T]:
        """Run ``fn(*args, **kwargs)`` once on every worker; the handle gives one result per
        worker. With ``replay=True`` it also runs on every worker started later (after a
        crash, a resize or recycling) before that worker takes other work."""
        payload, digest = dumps_callable(fn)
        item = (args, kwargs)
        self._backend.prepare_call(fn, item)
        job = Job(
            next_job_id(),
            f"on all workers: {callable_name(fn)}",
            digest,
            payload,
            iter([item]),
            None,
            call=True,
        )
        job.fn = fn
        # No automatic view: whoever asked shows it (``%%orchestra --all`` does).
        handle: MapHandle[T] = MapHandle(self._backend, job, show=False)
        self._backend.run_on_all(job, replay=replay)
        return handle

    # --- the pool ---------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend's name: ``"local"``, ``"inline"`` or ``"dask"``."""
        return self._backend.name

    @property
    def capabilities(self) -> Capabilities:
        """What this pool's backend can do (``backends._base.Capabilities``)."""
        return self._backend.capabilities

    @property
    def workers(self) -> int:
        """The number of workers the pool keeps running."""
        return self._backend.target_workers

    @property
    def state(self) -> PoolState:
        return self._backend.state

    def worker_pids(self) -> list[int]:
        """Pids of the live workers (for tests and for ``kill -STOP`` style debugging)."""
        return self._backend.worker_pids()

    def resize(self, workers: int) -> None:
        """Grow or shrink the pool; busy workers finish their current chunk first."""
        if workers < 1:
            raise ValueError(f"a pool needs at least 1 worker, got {workers}")
        self._backend.resize(workers)

    def cancel_job(self, job_id: int, kill: bool = False) -> bool:
        """Cancel the job ``job_id`` as its handle's ``cancel()`` would, for a job known only
        by its id (from :meth:`statistics` or a ``JobStarted`` event): pending tasks are
        dropped, running ones interrupted (``kill=True``: their workers killed at once). For a
        batch of ``run`` calls that is every call of the batch. Returns False if this pool has
        no unfinished job with that id."""
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise TypeError(f"job_id must be an int, got {job_id!r}")

        return self._backend.cancel_job(job_id, kill=kill)

    def pause_job(self, job_id: int, paused: bool = True) -> bool:
        """Pause (``paused=False``: resume) the job ``job_id`` as its handle's ``pause()``
        would, for a job known only by its id: no new task of it starts until it is resumed;
        running ones finish. A ``JobPaused`` event says when it took effect. Returns False if
        this pool has no unfinished job with that id; raises ValueError if the backend
        cannot pause (:attr:`capabilities`) or the job runs once per worker."""
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise TypeError(f"job_id must be an int, got {job_id!r}")
        if not isinstance(paused, bool):
            raise TypeError(f"paused must be True or False, got {paused!r}")
        return self._backend.pause_job(job_id, paused)

    def statistics(self) -> PoolStatistics:
        """A frozen snapshot: workers (pid, state, current job and item, CPU, memory), jobs
        with per-state counts, the queue length, and the work scheduled to run here later
        (``run_after``/``run_at``/``every``: id, name, state, next start, period, runs)."""
        stats = self._backend.statistics()
        scheduled = scheduled_on(self)
        return dataclasses.replace(stats, scheduled=scheduled) if scheduled else stats

    def cancel_scheduled(self, key: int | str) -> bool:
        """Cancel the scheduled task ``key`` listed in :meth:`statistics` (its ``id``, or its
        ``name`` if no other scheduled task on this pool has it; a run in progress is
        cancelled too). Returns False if there is no such pending task."""
        return cancel_scheduled_on(self, key)

    def status(self) -> dict[str, Any]:
        """:meth:`statistics` as plain data (for JSON and quick looks)."""
        return self.statistics().as_dict()

    def subscribe(self, callback: Callable[[Event], object], **filters: Any) -> Subscription:
        """Call ``callback(event)`` (on a delivery thread) for every event of this pool."""
        return self.events.subscribe(callback, **filters)

    async def started(self) -> None:
        """Wait until every worker has completed its ready handshake."""
        await asyncio.wrap_future(self._backend.started())

    def wait_started(self, timeout: float | None = None) -> None:
        self._backend.started().result(timeout)

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Shut down: finish all work first (or cancel it with ``cancel_pending=True``)."""
        mode = CloseMode.CANCEL if cancel_pending else CloseMode.GRACEFUL
        await asyncio.wrap_future(self._backend.close(mode))
        self._backend.join()
        self._run_shutdown_waits()
        _forget_closed()

    def shutdown(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        """Synchronous :meth:`aclose`; ``wait=False`` returns while the workers stop."""
        mode = CloseMode.CANCEL if cancel_pending else CloseMode.GRACEFUL
        fut = self._backend.close(mode)
        if wait:
            fut.result()
            self._backend.join()
            self._run_shutdown_waits()
            _forget_closed()

    def kill(self) -> None:
        """SIGKILL every worker now; unfinished work fails with ``PoolClosedError``."""
        self._backend.close(CloseMode.KILL).result()
        self._backend.join()
        self._run_shutdown_waits()
        _forget_closed()

    def _wait_at_shutdown(self, wait: Callable[[], None]) -> None:
        """The shutdown path calls ``wait()`` once every handle of this pool is done, to
        let what settles them outside the backend finish (an Executor's callback thread,
        joined there): nothing working for this pool outlives its ``shutdown()``. Withdrawn
        with :meth:`_forget_wait_at_shutdown` when that work ends first."""
        with self._shutdown_waits_lock:
            self._shutdown_waits.add(wait)

    def _forget_wait_at_shutdown(self, wait: Callable[[], None]) -> None:
        with self._shutdown_waits_lock:
            self._shutdown_waits.discard(wait)

    def _run_shutdown_waits(self) -> None:
        with self._shutdown_waits_lock:
            waits = list(self._shutdown_waits)
        for wait in waits:
            wait()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(cancel_pending=exc[0] is not None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(cancel_pending=exc[0] is not None)

    def __repr__(self) -> str:
        return (f"<orchestra_nb.Pool {self.name!r} backend={self.backend} workers={self.workers} "
                f"state={self.state}>")


# --- every open pool (what the side panel lists) ----------------------------------------------

_registry_lock = threading.Lock()
_registry: dict[int, Pool] = {}  # by id, in creation order; a pool leaves it once closed
_pool_ids = itertools.count(1)
_GONE = (PoolState.CLOSED, PoolState.BROKEN)


def _forget_closed() -> None:
    with _registry_lock:
        for pool_id in [i for i, p in _registry.items() if p.state in _GONE]:
            del _registry[pool_id]


def pools() -> list[Pool]:
    """Every open pool of this process, oldest first: the default pool (once created) and
    each ``Pool(...)`` not yet shut down. A pool stays listed while it runs, even if no
    variable refers to it any more (its workers do run), and drops out once it is closed
    or broken."""
    _forget_closed()
    with _registry_lock:
        return list(_registry.values())


class _CallBatch:
    """``run`` calls of one function gathered into one job until the I/O thread takes it."""

    __slots__ = ("first_frames", "items", "job", "sealed")

    def __init__(
        self, job: Job, items: list[Any], first_frames: tuple[list[Any], tuple[str | None, ...]] | None
    ) -> None:
        self.job = job
        self.items = items
        self.sealed = False
        # The first call's arguments as the backend's prepare_call pickled them ([item],
        # like a chunk of that one call): sent as they are if the batch stays a lone call.
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
        if self._opts.cache is not False:
            return cast(TaskHandle[T], _cache().cached_run(
                self._pool, fn, args, kwargs, self._opts.cache, timeout=self._opts.timeout,
                retries=self._opts.retry, name=self._opts.name, circuit=self._opts.circuit))
        return self._pool._run(fn, args, kwargs, self._opts)

    def map(self, fn: Callable[..., T], /, *iterables: Iterable[Any], **kw: Any) -> MapHandle[T]:
        kw.setdefault("timeout", self._opts.timeout)
        kw.setdefault("retries", self._opts.retry)
        kw.setdefault("name", self._opts.name)
        kw.setdefault("circuit", self._opts.circuit)
        kw.setdefault("on_success", self._opts.on_success)
        kw.setdefault("on_error", self._opts.on_error)
        kw.setdefault("cache", self._opts.cache)
        return self._pool.map(fn, *iterables, **kw)


def _check_circuit(circuit: CircuitBreaker | None) -> CircuitBreaker | None:
    if circuit is not None and not isinstance(circuit, CircuitBreaker):
        raise TypeError(f"circuit must be a CircuitBreaker (see Pool.circuit), got {circuit!r}")
    return circuit


def _retry(retries: int | RetryPolicy | None, retry_on: tuple[type[BaseException], ...] | None) -> RetryPolicy:
    if retries is None and retry_on is None:
        return DEFAULT_RETRY  # validated once, not on every call
    policy = RetryPolicy.coerce(retries)
    if retry_on is not None:
        policy = dataclasses.replace(policy, retry_on=tuple(retry_on))
    return policy


# --- the default pool -----------------------------------------------------------------------

_default_lock = threading.Lock()
_default: Pool | None = None
_default_options: dict[str, Any] = {}


def configure(**options: Any) -> None:
    """Set the default pool's options (``workers=4``, ``memory_limit="2GB"``, ...), and the
    result store's (``store="path"``, ``store_max_bytes="10GB"``; see docs/store.md).

    Takes effect when the default pool is next created; a running default pool with other
    options is shut down (after its work) so that the next call starts a fresh one.
    """
    global _default
    rest = options
    if "store" in options or "store_max_bytes" in options:
        rest = _cache().configure_store(options)  # the result store's options
    if rest is None:
        return  # only the store changed: the default pool stays as it is
    options = rest
    with _default_lock:
        _default_options.clear()
        _default_options.update(options)
        old, _default = _default, None
    if old is not None:
        old.shutdown(wait=False)


def current_default_pool() -> Pool | None:
    """The default pool if it was created (and not shut down), without creating it."""
    return _default


def default_pool() -> Pool:
    """The shared default pool, created (and warmed up in the background) on first use."""
    global _default
    pool = _default
    if pool is not None and pool.state == PoolState.RUNNING:
        return pool
    with _default_lock:
        if _default is None or _default.state != PoolState.RUNNING:
            _default = Pool(**{"name": "default", **_default_options})
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


def cancel_scheduled(key: int | str) -> bool:
    """Cancel a scheduled task that runs on the default pool, by its id or name, as listed
    in ``status()["scheduled"]`` (see :meth:`Pool.cancel_scheduled`)."""
    return cancel_scheduled_on(_default, key)


def _schedule_module() -> Any:
    # Loaded only once something was scheduled; _schedule imports this module, not the reverse.
    return sys.modules.get(f"{__package__}._schedule")


def scheduled_on(pool: Pool | None) -> tuple[ScheduledStatistics, ...]:
    """The pending scheduled tasks whose runs go to ``pool`` (None: to the default pool
    while it does not exist yet)."""
    module = _schedule_module()
    return () if module is None else module.statistics_on(pool)


def cancel_scheduled_on(pool: Pool | None, key: int | str) -> bool:
    from . import _schedule  # loaded here at the latest, so that a bad key is refused the same way

    return _schedule.cancel_on(pool, key)


def shutdown(wait: bool = True, *, cancel_pending: bool = False) -> None:
    """Shut the default pool down, if it exists; the next call starts a new one.

    With ``wait`` (the default) the package's service threads stop too, each through its
    own close (they start again on next use): the default scheduler (its scheduled tasks
    are cancelled), the composites' driver (running composites are cancelled) and the
    callback thread (queued callbacks run first)."""
    global _default
    if wait:
        for name in ("_schedule", "_driver", "_callbacks"):  # only those that were loaded
            module = sys.modules.get(f"{__package__}.{name}")
            if module is not None:
                module.close_service()
    with _default_lock:
        pool, _default = _default, None
    if pool is not None:
        pool.shutdown(wait, cancel_pending=cancel_pending)


def _same_face(function: Callable[..., Any], method: Callable[..., Any]) -> None:
    """Give a default-pool function its method's signature (without ``self``) and
    docstring, so that ``orchestra.map?`` and Shift+Tab list every option."""
    signature = inspect.signature(method)
    function.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=list(signature.parameters.values())[1:]
    )
    function.__doc__ = f"{function.__doc__}\n\n{inspect.getdoc(method)}"


for _function, _method in ((map, Pool.map), (run, Pool.run), (run_on_all, Pool.run_on_all)):
    _same_face(_function, _method)
del _function, _method
