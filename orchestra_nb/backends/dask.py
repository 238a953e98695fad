"""The Dask backend (layer 2): orchestra's jobs on a ``distributed`` cluster.

Imported only when asked for (``Pool(backend="dask")``, ``Pool(backend=client)``); it needs
``pip install "orchestra_nb[dask]"`` here and orchestra_nb, same version, on every worker.

Data flow::

    caller thread           driver thread "orchestra-dask"                 dask workers
    ─────────────           ──────────────────────────────                 ────────────
    submit(job) ──queue──>  _pump: job.take(adaptive size) ─ submit ─┐
    cancel(job) ──queue──>  (<= 2 chunks per worker thread in flight) │    run_chunk(spec,
                              items pickled here, as one bytes; the   ├──>  fn bytes, items
                              function once (scattered when large)    │     bytes) -> bytes
                            _on_topic <── subscribe_topic ── log_event "run" (RUNNING),
                                                                     "out" (TaskOutput, 20 ms)
                            _collect <── done callbacks: one gather for every finished chunk
                              values, errors, retries, events, job.finish
                            _tick (0.5 s): scheduler_info: workers joined / left, statistics
    admin thread:           interrupts (Client.run -> PyThreadState_SetAsyncExc) and, after
                            a grace period, Client.restart_workers (the nanny replaces it)

Choices, with what they cost (measured on a 2-process LocalCluster, see docs/dask.md):
dask walks Python lists in task arguments element by element, so a chunk's items travel as
one ``bytes`` orchestra pickled (which also keeps orchestra's culprit-naming
``SerializationError``); dask's per-task cost is about a millisecond plus a round trip, so
chunks aim at ``TARGET_CHUNK_SECONDS`` of work; RUNNING is one ``log_event`` per chunk from
the worker, delivered through ``subscribe_topic``; completions are collected with one
``Client.gather`` for all the chunks that finished since the last one, not one fetch each.

Worker deaths: dask re-runs a task whose worker died, up to the scheduler's
``allowed-failures``, then fails it with ``KilledWorker``; here the chunk's items go back to
PENDING when the death is seen, a chunk of several items given up by dask is re-run item by
item, and a single item given up fails with :class:`WorkerCrashedError` naming the worker.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import logging
import math
import pickle
import queue
import random
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

try:
    import distributed
except ImportError as exc:  # pragma: no cover - exercised without dask installed
    raise ImportError(
        'the Dask backend needs dask.distributed: pip install "orchestra_nb[dask]"'
    ) from exc

from .. import __version__
from .._events import (
    TaskOutput,
    WorkerExited,
    WorkerStarted,
)
from .._exceptions import (
    BrokenPoolError,
    OrchestraError,
    PoolClosedError,
    SerializationError,
    TaskTimeoutError,
    WorkerCrashedError,
)
from .._jobs import Chunk, Job, adaptive_chunk_size, describe_input
from .._serialize import ErrorRecord, describe_unpicklable_argument, dumps, rebuild_exception
from .._state import CloseMode, PoolState, TaskState, WorkerState
from .._stats import PoolStatistics, WorkerStatistics
from . import _dask_worker as remote
from ._base import Backend, Capabilities
from .local import check_call_arguments

if TYPE_CHECKING:
    from .._bus import EventBus

__all__ = ["DaskBackend", "DaskVersionError", "create_dask_backend"]

TARGET_CHUNK_SECONDS = 0.1  # dask's per-task overhead is ~1 ms plus a 10-20 ms round trip
# Chunks submitted per worker thread. The scheduler hands a worker a task only when it has a
# free thread (its queuing), so chunks waiting there cost no balance; four keep the workers
# busy through a client that is slow to submit the next ones (a busy notebook machine).
INFLIGHT_PER_THREAD = 4
BALANCE_CHUNKS_PER_THREAD = 2  # the chunks left at the end, per thread, for balance
MAX_INFLIGHT_PER_THREAD = 32  # ... more when chunks are much shorter than a round trip
ROUND_TRIP = 0.015  # seconds from a chunk's end to the next one's submission, about
SCATTER_FUNCTION_BYTES = 16 * 1024  # larger pickled functions go to the workers once
SCATTER_ITEMS_BYTES = 1 << 20  # larger chunks are scattered, not embedded in the graph
TICK = 0.5  # seconds between looks at the scheduler's view of the workers
FUNCTION_FUTURES = 64


class DaskVersionError(OrchestraError):
    """The workers of the cluster lack orchestra_nb, or run another version of it."""


@dataclasses.dataclass(slots=True)
class _Flight:
    """One dask task: a chunk of one job."""

    job: Job
    start: int
    count: int
    items: list[Any]
    key: str
    future: Any = None
    worker: str | None = None  # where it runs, once its RUNNING event came
    started_at: float | None = None
    last_crash: str | None = None  # the last worker that died running it
    cancelled: bool = False  # released: its outcome is ignored
    single_retry: bool = False  # re-run alone after dask gave up on its chunk


@dataclasses.dataclass(slots=True)
class _Worker:
    id: int
    address: str
    pid: int | None
    host: str | None
    nthreads: int
    dask_id: str
    tasks_done: int = 0
    memory: int | None = None
    cpu: float | None = None


class DaskBackend(Backend):
    """Runs jobs as dask tasks on a ``distributed`` cluster (see the module docstring).

    Use :func:`create_dask_backend`; ``Pool(backend="dask", ...)`` calls it.
    """

    name = "dask"
    capabilities = Capabilities(interrupt_running=True, run_on_all=True, shared_memory=False,
                                in_process=False, resize=True, pinning=False, pause=True)

    def __init__(
        self,
        events: EventBus,
        *,
        client: Any = None,
        address: str | None = None,
        workers: int | None = None,
        threads_per_worker: int = 1,
        security: Any = None,
        cancel_grace: float = 1.0,
        timeout_grace: float = 1.0,
        start_timeout: float = 60.0,
        retry_random: Callable[[], float] = random.random,
        cluster_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(events)
        self.cancel_grace = cancel_grace
        self.timeout_grace = timeout_grace
        self.start_timeout = start_timeout
        self._retry_random = retry_random
        self._topic = f"orchestra-{uuid.uuid4().hex[:12]}"
        self._state = PoolState.UNOPENED
        self._client: Any = None
        self._cluster: Any = None
        self._owns_client = False
        self._target = workers or 0
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._jobs: dict[int, Job] = {}
        self._ready: collections.deque[Job] = collections.deque()
        self._flights: dict[str, _Flight] = {}
        self._by_start: dict[tuple[int, int], _Flight] = {}
        self._done: list[Any] = []  # finished dask futures not collected yet
        self._fn_time: dict[bytes, float] = {}
        self._fn_refs: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self._workers: dict[str, _Worker] = {}
        self._known_workers: dict[str, _Worker] = {}  # also those that left (for errors)
        self._expected_exits: dict[str, str] = {}  # address -> why orchestra restarted it
        self._worker_ids = itertools.count(1)
        self._replays: list[str] = []
        self._touched: set[int] = set()  # jobs whose counts changed in this round
        self._broken: BaseException | None = None
        self._close_mode: CloseMode | None = None
        self._close_deadline = math.inf
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._ending: threading.Thread | None = None  # the bus's delivery thread, once closed
        self._admin = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orchestra-dask-admin")
        self._stats_lock = threading.Lock()
        self._stats_workers: tuple[WorkerStatistics, ...] = ()
        if client is not None:
            self._client = client
        elif address is not None:
            self._client = distributed.Client(  # type: ignore[no-untyped-call]
                address, security=security, set_as_default=False, timeout=start_timeout)
            self._owns_client = True
        if self._client is not None:
            try:
                if getattr(self._client, "asynchronous", False):
                    raise ValueError(
                        "the Dask backend needs a synchronous distributed.Client (asynchronous=False): "
                        "orchestra drives it from its own thread, so your event loop stays free"
                    )
                self._connect()
            except BaseException:
                self._admin.shutdown(wait=False)
                if self._owns_client:
                    with contextlib.suppress(Exception):
                        self._client.close()
                raise
        self._cluster_options = dict(cluster_options or {})
        self._threads_per_worker = threads_per_worker
        self._thread = threading.Thread(target=self._drive, name="orchestra-dask", daemon=True)
        self._thread.start()

    # --- connecting -------------------------------------------------------------------

    def _connect(self) -> None:
        """Check the workers' orchestra_nb, install the worker runtime, subscribe to events."""
        client = self._client
        check_versions(client)
        client.register_plugin(remote.RuntimePlugin(), name=remote.PLUGIN_NAME)
        client.subscribe_topic(self._topic, self._on_event)
        self._state = PoolState.RUNNING

    def _start_cluster(self) -> None:
        options: dict[str, Any] = {
            "n_workers": self._target or _cpus(),
            "threads_per_worker": self._threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",  # loopback only: a plain-TCP cluster has no authentication
            "dashboard_address": "127.0.0.1:0",  # a free port, on loopback too
            "silence_logs": logging.ERROR,
        }
        options.update(self._cluster_options)
        self._cluster = distributed.LocalCluster(**options)  # type: ignore[no-untyped-call]
        self._client = distributed.Client(  # type: ignore[no-untyped-call]
            self._cluster, set_as_default=False)
        self._owns_client = True
        self._connect()

    # --- the driver thread --------------------------------------------------------------

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._queue.put((fn, args))

    def _later(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn, args))

    def _drive(self) -> None:
        try:
            if self._client is None:
                self._start_cluster()
            self._client.wait_for_workers(1, timeout=self.start_timeout)
            self._refresh_workers()
            self._started.set_result(None)
        except BaseException as exc:
            self._break(exc)
        self._later(TICK, self._tick)
        while True:
            timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
            try:
                fn, args = self._queue.get(timeout=timeout)
            except queue.Empty:
                pass
            else:
                self._call(fn, *args)
                while True:  # everything queued meanwhile, then one collection round
                    try:
                        fn, args = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    self._call(fn, *args)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn, args = heapq.heappop(self._timers)
                self._call(fn, *args)
            if self._done:
                self._call(self._collect)
            self._call(self._pump)
            self._call(self._progress)
            if self._close_mode is not None and self._ready_to_close():
                break
        self._teardown()

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug here must not stop every job of the pool
            traceback.print_exc()

    def _break(self, exc: BaseException) -> None:
        if isinstance(exc, OrchestraError):
            self._broken = exc
        else:
            self._broken = BrokenPoolError(
                f"the Dask cluster could not be reached: {type(exc).__name__}: {exc}")
            self._broken.__cause__ = exc
        self._state = PoolState.BROKEN
        if not self._started.done():
            self._started.set_exception(self._broken)
        for job in list(self._jobs.values()):
            job.fail_all(self._broken)

    # --- the public contract --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._post(self._submit, job)

    def cancel(self, job: Job, *, kill: bool = False) -> None:
        self._post(self._cancel, job, kill)

    def cancel_item(self, job: Job, index: int) -> None:
        self._post(self._cancel_item, job, index)

    def watch(self, job: Job, fn: Callable[[int, int], object]) -> None:
        def register() -> None:
            job.watchers.append(fn)
            fn(-2, 0)

        self._post(register)

    def pause(self, job: Job, paused: bool) -> None:
        self._post(self._pause, job, paused)

    def input_ready(self, job: Job) -> None:
        self._post(self._input_ready, job)

    def run_on_all(self, job: Job, *, replay: bool) -> None:
        self._post(self._run_on_all, job, replay)

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def target_workers(self) -> int:
        return self._target or len(self._workers)

    def resize(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least 1 worker, got {workers}")
        if self._cluster is None:
            raise NotImplementedError(
                "this Dask cluster was not started by orchestra: resize it with its own "
                "cluster manager (cluster.scale(n) or cluster.adapt())"
            )
        self._target = workers
        self._cluster.scale(workers)

    def worker_pids(self) -> list[int]:
        return [w.pid for w in list(self._workers.values()) if w.pid is not None]

    def statistics(self) -> PoolStatistics:
        with self._stats_lock:
            workers = self._stats_workers
        # What each worker runs now, from the chunks' RUNNING events (not the last tick).
        running: dict[str, tuple[int, int]] = {}
        for flight in list(self._flights.values()):
            if flight.worker is not None and not flight.cancelled:
                running.setdefault(flight.worker, (flight.job.id, flight.start))
        workers = tuple(
            dataclasses.replace(w, job=running[w.host][0], item=running[w.host][1])
            if w.host in running else dataclasses.replace(w, job=None, item=None)
            for w in workers
        )
        now = time.monotonic()
        jobs = []
        queued = 0
        for j in list(self._jobs.values()):
            if j.internal or j.is_complete():  # complete: finishing on the driver right now
                continue
            queued += j.counts[TaskState.PENDING] + j.counts[TaskState.RETRYING]
            jobs.append(j.statistics(now))
        return PoolStatistics(self.name, self._state, self.target_workers, workers, tuple(jobs), queued)

    def started(self, timeout: float | None = None) -> concurrent.futures.Future[None]:
        return self._started

    def close(self, mode: CloseMode, timeout: float = 10.0) -> concurrent.futures.Future[None]:
        if self._thread.is_alive():
            self._post(self._begin_close, CloseMode(mode), timeout)
        elif not self._closed.done():
            self._closed.set_result(None)
        return self._closed

    def prepare_call(self, fn: Callable[..., Any], item: Any) -> Any:
        """Pickle a ``run`` call's arguments in the caller's thread: an unpicklable one raises
        :class:`SerializationError` at once, naming it (the chunk is pickled again later)."""
        check_call_arguments(fn, item, None)
        return None

    def join(self, timeout: float | None = 10.0) -> None:
        """After :meth:`close`: wait for the driver thread and the bus's delivery thread."""
        for thread in (self._thread, self._ending):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` this backend drives (None until connected)."""
        return self._client

    @property
    def dashboard_link(self) -> str | None:
        client = self._client
        return None if client is None else getattr(client, "dashboard_link", None)

    # --- submitting -----------------------------------------------------------------------

    def _submit(self, job: Job) -> None:
        job.seal()  # a burst of run() calls takes no more calls from now on
        if self._state not in (PoolState.RUNNING, PoolState.UNOPENED) or self._close_mode is not None:
            job.open(self.events)
            job.fail_all(self._broken or PoolClosedError("the pool is shut down"))
            return
        self._open(job)
        self._ready.append(job)

    def _pause(self, job: Job, paused: bool) -> None:
        """No new chunk of ``job`` is submitted while paused (those in flight finish)."""
        job.set_paused(paused)
        if not paused:
            self._input_ready(job)

    def _input_ready(self, job: Job) -> None:
        """``job``'s feeder read more items (or the input ended): back in the rotation."""
        if job.id in self._jobs and job not in self._ready:
            self._ready.append(job)
        self._touched.add(job.id)  # an ended input may complete the job

    def _open(self, job: Job) -> None:
        self._jobs[job.id] = job
        job.on_finished = self._forget_job
        job.open(self.events)

    def _forget_job(self, job: Job) -> None:
        """``job.on_finished``: drop it (its chunks were collected or released)."""
        self._jobs.pop(job.id, None)

    def _run_on_all(self, job: Job, replay: bool) -> None:
        """One task per live worker, pinned to it; with ``replay`` a worker plugin runs the
        call on workers that join later."""
        if self._state is not PoolState.RUNNING:
            self._submit(job)  # fails it, named
            return
        assert isinstance(job.source, Iterator)  # the API's [item]
        item = next(job.source)
        self._refresh_workers()
        targets = list(self._workers.values())
        job.source = iter([item] * len(targets))
        job.total = len(targets)
        job.targets = [w.id for w in targets]
        self._open(job)
        for w in targets:
            chunk = job.take(1)
            if chunk is None:
                break
            self._send(job, chunk, worker=w.address)
        if replay:
            name = f"orchestra-replay-{self._topic}-{len(self._replays)}"
            plugin = remote.ReplayPlugin(name, self._topic, job.digest, job.fn_payload, item,
                                         frozenset(w.dask_id for w in targets))
            self._replays.append(name)
            self._admin.submit(self._client.register_plugin, plugin, name=name)
        self._check_done(job)

    def _threads(self) -> int:
        return sum(w.nthreads for w in self._workers.values()) or 1

    def _inflight_limit(self, job: Job) -> int:
        """Chunks of ``job`` worth submitting now: ``INFLIGHT_PER_THREAD`` per worker thread,
        more when its chunks are so short (``chunksize=1`` of tiny tasks,
        ``timeout=``) that a worker would empty its queue before the next round trip."""
        per_thread = INFLIGHT_PER_THREAD
        est = self._fn_time.get(job.digest)
        if est is not None:
            chunk_seconds = est * self._chunk_size(job)
            per_thread = max(per_thread, min(MAX_INFLIGHT_PER_THREAD,
                                             math.ceil(2 * ROUND_TRIP / max(chunk_seconds, 1e-6))))
        return per_thread * self._threads()

    def _pump(self) -> None:
        if self._state is not PoolState.RUNNING:
            return
        while self._ready:
            job = self._ready[0]
            if job.id not in self._jobs:
                self._ready.popleft()
                continue
            if job.paused:  # out of the rotation until _pause(job, False) puts it back
                self._ready.popleft()
                continue
            if len(self._flights) >= self._inflight_limit(job):
                return
            self._ready.popleft()
            chunk = self._next_chunk(job)
            if chunk is None:
                self._check_done(job)
                continue
            self._ready.append(job)  # round robin over jobs with work
            self._send(job, chunk)

    def _next_chunk(self, job: Job) -> Chunk | None:
        if job.targets is not None and not job.requeued:
            return None
        return job.take(self._chunk_size(job))

    def _chunk_size(self, job: Job) -> int:
        return adaptive_chunk_size(
            job, self._fn_time.get(job.digest), target_seconds=TARGET_CHUNK_SECONDS,
            balance_slots=BALANCE_CHUNKS_PER_THREAD * self._threads(),
        )

    def _send(self, job: Job, chunk: Chunk, worker: str | None = None) -> None:
        if job.cancelled_items:  # calls of a batch cancelled before they were read
            for index in range(chunk.start, chunk.start + chunk.count):
                if index in job.cancelled_items:
                    self._move(job, index, 1, TaskState.CANCELLED)
            if all(job.states[i] == TaskState.CANCELLED for i in range(chunk.start, chunk.start + chunk.count)):
                return
        try:
            items_payload = dumps(chunk.items)
        except Exception as exc:
            culprits = describe_unpicklable_argument(chunk.items, chunk.start, exc)
            for offset, item in enumerate(chunk.items):
                index = chunk.start + offset
                if index in culprits:
                    job.fail(index, SerializationError(culprits[index]))
                else:
                    self._requeue(job, Chunk(job, index, [item]))
            self._check_done(job)
            return
        key = f"orchestra-{_key_name(job.name)}-{uuid.uuid4().hex}"
        flight = _Flight(job, chunk.start, chunk.count, chunk.items, key)
        spec = (self._topic, job.id, chunk.start, chunk.count, job.digest, job.star, job.call,
                job.timeout)
        items_arg: Any = items_payload
        if len(items_payload) > SCATTER_ITEMS_BYTES:
            items_arg = self._client.scatter(items_payload, hash=False, direct=False)
        placement: dict[str, Any] = {}
        if worker is not None:
            placement = {"workers": [worker], "allow_other_workers": False}
        future = self._client.submit(remote.run_chunk, spec, self._function_ref(job), items_arg,
                                     key=key, pure=False, **placement)
        flight.future = future
        self._flights[key] = flight
        self._by_start[(job.id, chunk.start)] = flight
        job.inflight[chunk.start] = chunk
        future.add_done_callback(self._on_future_done)

    def _function_ref(self, job: Job) -> Any:
        """The pickled function, or a future of it on the cluster when it is large (one
        transfer per worker instead of one per task); workers cache it by digest."""
        if len(job.fn_payload) <= SCATTER_FUNCTION_BYTES:
            return job.fn_payload
        ref = self._fn_refs.get(job.digest)
        if ref is None:
            ref = self._client.scatter(job.fn_payload, hash=False, direct=False)
            self._fn_refs[job.digest] = ref
            while len(self._fn_refs) > FUNCTION_FUTURES:
                self._fn_refs.popitem(last=False)[1].release()
        else:
            self._fn_refs.move_to_end(job.digest)
        return ref

    def _requeue(self, job: Job, chunk: Chunk, front: bool = False) -> None:
        if front:
            job.requeued.appendleft(chunk)
        else:
            job.requeued.append(chunk)
        if job not in self._ready:
            self._ready.append(job)

    # --- events from the workers ----------------------------------------------------------

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        # On the client's event loop: hand over, nothing else.
        self._post(self._handle_event, event[1])

    def _on_future_done(self, future: Any) -> None:
        # On dask's callback thread: hand over, nothing else. (Not ``self._done.append``:
        # that binds the list of this moment, which _collect may have swapped out by then.)
        self._post(self._finished, future)

    def _finished(self, future: Any) -> None:
        self._done.append(future)

    def _handle_event(self, msg: dict[str, Any]) -> None:
        kind = msg.get("k")
        if kind == "run":
            self._on_running(msg["j"], msg["s"], msg["w"])
        elif kind == "out":
            worker = self._worker_id(msg["w"])
            for job_id, index, stream, text in msg["o"]:
                self.publish(TaskOutput(job_id, index, worker, stream, text))

    def _worker_id(self, address: str) -> int:
        w = self._workers.get(address)
        if w is None:
            self._refresh_workers()
            w = self._workers.get(address)
        return -1 if w is None else w.id

    def _on_running(self, job_id: int, start: int, address: str) -> None:
        flight = self._by_start.get((job_id, start))
        if flight is None or flight.cancelled:
            return
        job = flight.job
        worker = self._worker_id(address)
        if flight.worker is not None and flight.worker != address:
            # It runs again elsewhere: its first worker died (maybe not seen by _tick yet).
            self._lost(flight, flight.worker)
        flight.worker = address
        flight.started_at = time.monotonic()
        for run_start, run_count in _pending_runs(job, flight):
            self._move(job, run_start, run_count, TaskState.RUNNING, worker)
        if job.timeout is not None:
            self._later(job.timeout + self.timeout_grace, self._hard_timeout, flight, address)

    def _lost(self, flight: _Flight, address: str) -> None:
        """``flight``'s worker died while it ran: back to PENDING (dask re-runs it)."""
        flight.last_crash = address
        flight.worker = None
        job = flight.job
        w = self._workers.get(address)
        for index in range(flight.start, flight.start + flight.count):
            if job.states[index] == TaskState.RUNNING:
                self._move(job, index, 1, TaskState.PENDING, None if w is None else w.id)

    # --- results ----------------------------------------------------------------------------

    def _collect(self) -> None:
        """Every chunk finished since the last round, fetched with one gather."""
        done, self._done = self._done, []
        finished = {}
        for future in done:
            flight = self._flights.get(future.key)
            if flight is None or flight.future is not future or future.key in finished:
                continue
            if future.status == "finished":
                finished[future.key] = future
            else:
                if not flight.cancelled:
                    self._on_dask_error(flight, future)  # before release: it reads the error
                self._forget(flight)
        if not finished:
            return
        try:
            results = self._client.gather(finished, errors="skip")
        except Exception:
            results = {}
        # Done callbacks come in the order the futures were made, not finished: results that
        # arrived together are applied in the order the workers finished them (ordered=False).
        ended = {key: value[0] for key, value in results.items() if isinstance(value, tuple)}
        for key, future in sorted(finished.items(), key=lambda kv: ended.get(kv[0], 0.0)):
            flight = self._flights.get(key)
            if flight is None:
                continue
            value = results.get(key)
            data = value[1] if isinstance(value, tuple) else None
            if flight.cancelled:
                self._forget(flight)
            elif data is None:
                self._on_dask_error(flight, future)
                self._forget(flight)
            else:
                self._forget(flight)  # first: the job may finish with this result
                self._on_result(flight, data)

    def _forget(self, flight: _Flight) -> None:
        self._flights.pop(flight.key, None)
        if self._by_start.get((flight.job.id, flight.start)) is flight:
            del self._by_start[(flight.job.id, flight.start)]
            flight.job.inflight.pop(flight.start, None)
        if flight.future is not None:
            flight.future.release()

    def _on_result(self, flight: _Flight, data: bytes) -> None:
        job = flight.job
        self._touched.add(job.id)
        w = self._workers.get(flight.worker or "")
        worker_id = None if w is None else w.id
        if w is not None:
            w.tasks_done += flight.count
        try:
            values, errors, elapsed = pickle.loads(data)
        except Exception as exc:
            err = SerializationError(
                f"cannot unpickle the results of tasks {flight.start}..{flight.start + flight.count - 1} "
                f"in the pool: {type(exc).__name__}: {exc}"
            )
            for index in range(flight.start, flight.start + flight.count):
                self._failed(job, flight, index, err, worker_id)
            return
        if flight.count and elapsed >= 0:
            per_item = elapsed / flight.count
            old = self._fn_time.get(job.digest)
            self._fn_time[job.digest] = per_item if old is None else 0.5 * old + 0.5 * per_item
        if flight.worker is None:  # no RUNNING event yet (it is on its way): the chunk ran
            for run_start, run_count in _pending_runs(job, flight):
                self._move(job, run_start, run_count, TaskState.RUNNING, worker_id)
        if not errors and job.states.count(TaskState.RUNNING, flight.start, flight.start + flight.count) \
                == flight.count:
            job.succeed(flight.start, values, worker_id)
        else:
            errors = errors or {}
            for offset in range(flight.count):
                index = flight.start + offset
                if job.states[index] != TaskState.RUNNING:
                    continue  # cancelled meanwhile
                record = errors.get(offset)
                if record is None:
                    job.succeed(index, values[offset : offset + 1], worker_id)
                elif record.kind == "cancelled":
                    self._move(job, index, 1, TaskState.CANCELLED, worker_id)
                else:
                    self._failed(job, flight, index, self._rebuild(record, flight, index), worker_id,
                                 record.duration)
        self._check_done(job)

    def _rebuild(self, record: ErrorRecord, flight: _Flight, index: int) -> BaseException:
        address = flight.worker or "(unknown address)"
        w = self._known_workers.get(address)
        job = flight.job
        item = describe_input(job, flight.items[index - flight.start])
        who = (f"worker {w.id} (pid {w.pid}) on dask worker {address}" if w is not None
               else f"dask worker {address}")
        return rebuild_exception(record, f"raised in {who} while running task {index} of job "
                                         f"{job.id} ({job.name!r}), input {item}")

    def _failed(self, job: Job, flight: _Flight, index: int, exc: BaseException,
                worker_id: int | None, ran: float | None = None) -> None:
        """Item ``index`` (RUNNING) failed: retry it if its policy says so, else record it."""
        attempt = job.attempts.get(index, 0) + 1
        job.attempts[index] = attempt
        if not job.cancelled and job.retry.should_retry(exc, attempt):
            delay = job.retry.delay(attempt, self._retry_random)
            job.transition(index, 1, TaskState.RETRYING, worker_id, attempt, delay)
            self._touched.add(job.id)
            item = flight.items[index - flight.start]
            self._later(delay, self._retry_now, job, index, item)
            return
        job.fail(index, exc, worker_id, ran)
        self._touched.add(job.id)

    def _retry_now(self, job: Job, index: int, item: Any) -> None:
        if job.cancelled or job.states[index] != TaskState.RETRYING:
            return
        self._move(job, index, 1, TaskState.PENDING)
        self._requeue(job, Chunk(job, index, [item]))

    def _on_dask_error(self, flight: _Flight, future: Any) -> None:
        """The dask task itself failed: its worker(s) died (``KilledWorker``), it was lost,
        or ``run_chunk`` broke."""
        job = flight.job
        try:
            exc = future.exception(timeout=10)
        except Exception as inner:
            exc = inner
        killed = type(exc).__name__ == "KilledWorker"
        if killed and flight.count > 1:
            # Which item kills its workers is unknown: run them one by one, blaming none yet.
            for offset in reversed(range(flight.count)):
                index = flight.start + offset
                if job.states[index] in (TaskState.RUNNING, TaskState.PENDING):
                    if job.states[index] == TaskState.RUNNING:
                        self._move(job, index, 1, TaskState.PENDING)
                    chunk = Chunk(job, index, [flight.items[offset]])
                    self._requeue(job, chunk, front=True)
            return
        if killed:
            last = getattr(getattr(exc, "last_worker", None), "address", None) or flight.last_crash
            error: BaseException = self._crash_error(flight, last, exc)
        elif isinstance(exc, BaseException):
            error = exc
        else:
            error = OrchestraError(f"the dask task of tasks {flight.start}..{flight.start + flight.count - 1} "
                                   f"ended as {future.status!r} without an error")
        for index in range(flight.start, flight.start + flight.count):
            if job.states[index] == TaskState.PENDING:
                self._move(job, index, 1, TaskState.RUNNING)
            if job.states[index] == TaskState.RUNNING:
                self._failed(job, flight, index, error, None)
        self._check_done(job)

    def _crash_error(self, flight: _Flight, address: str | None,
                     cause: BaseException | None) -> WorkerCrashedError:
        w = self._workers.get(address or "")
        known = self._known_workers.get(address or "") if w is None else w
        worker_id = -1 if known is None else known.id
        pid = None if known is None else known.pid
        err = WorkerCrashedError(
            worker_id, pid, None, flight.start,
            f"dask worker {address or '(unknown address)'} died running it, and dask gave up "
            f"on the task after its workers died {getattr(cause, 'allowed_failures', 0) + 1} times",
        )
        if cause is not None:
            err.__cause__ = cause
        return err

    # --- cancellation and deadlines ---------------------------------------------------------

    def _cancel(self, job: Job, kill: bool) -> None:
        if job.id not in self._jobs or (job.cancelled and not kill):
            return
        job.cancel_pending()
        self._touched.add(job.id)
        flights = [f for f in self._flights.values() if f.job is job]
        for flight in flights:
            for index in range(flight.start, flight.start + flight.count):
                if not TaskState(job.states[index]).is_final:
                    self._move(job, index, 1, TaskState.CANCELLED)
            self._drop(flight)
        job.future.cancel()
        self._check_done(job)
        running = sorted({f.worker for f in flights if f.worker is not None})
        if kill:
            if running:
                self._admin.submit(self._restart, running, f"job {job.id} was cancelled with kill=True")
        elif flights:
            self._admin.submit(self._interrupt, job.id, None)
            self._later(self.cancel_grace, self._escalate, job.id, None,
                        f"a task of cancelled job {job.id} ignored the interrupt for {self.cancel_grace} s")

    def _cancel_item(self, job: Job, index: int) -> None:
        if job.id not in self._jobs:
            return
        job.cancelled_items.add(index)
        if index >= job.pulled:
            return  # not read yet: cancelled when it is
        state = job.states[index]
        if TaskState(state).is_final:
            return
        flight = self._flight_of(job, index)
        self._move(job, index, 1, TaskState.CANCELLED)
        self._touched.add(job.id)
        if flight is not None and flight.count == 1:
            self._drop(flight)  # released: it will not start, or its outcome is ignored
        if flight is not None:
            # On the worker: skip it if it has not started, interrupt it if it runs (it may
            # run although its RUNNING event has not arrived yet).
            self._admin.submit(self._interrupt, job.id, index)
            self._later(self.cancel_grace, self._escalate, job.id, index,
                        f"cancelled task {index} of job {job.id} ignored the interrupt for "
                        f"{self.cancel_grace} s")

    def _flight_of(self, job: Job, index: int) -> _Flight | None:
        for flight in self._flights.values():
            if flight.job is job and flight.start <= index < flight.start + flight.count:
                return flight
        return None

    def _drop(self, flight: _Flight) -> None:
        """Release ``flight``'s dask task: a queued one never runs; its outcome is ignored."""
        flight.cancelled = True
        self._forget(flight)
        with contextlib.suppress(Exception):
            self._client.cancel([flight.future], force=True, asynchronous=False)

    def _interrupt(self, job_id: int, index: int | None) -> None:
        # On the admin thread: a round trip to every worker.
        with contextlib.suppress(Exception):
            self._client.run(remote.cancel, self._topic, job_id, index, on_error="ignore")

    def _escalate(self, job_id: int, index: int | None, why: str) -> None:
        def check_and_restart() -> None:
            try:
                found = self._client.run(remote.still_running, self._topic, job_id, index,
                                         on_error="return")
            except Exception:
                return
            stuck = sorted(addr for addr, items in found.items() if isinstance(items, list) and items)
            if stuck:
                self._restart(stuck, why)

        self._admin.submit(check_and_restart)

    def _restart(self, addresses: list[str], why: str) -> None:
        # On the admin thread: the nanny kills the worker process and starts a new one.
        self._expected_exits.update(dict.fromkeys(addresses, why))  # read by _refresh_workers
        with contextlib.suppress(Exception):
            self._client.restart_workers(addresses, timeout=self.start_timeout, raise_for_error=False)

    def _hard_timeout(self, flight: _Flight, address: str) -> None:
        if self._flights.get(flight.key) is not flight or flight.worker != address:
            return
        job = flight.job
        grace = self.timeout_grace
        exc = TaskTimeoutError(
            f"task {flight.start} exceeded its timeout of {job.timeout} s and did not respond to "
            f"the interrupt within {grace} s; its dask worker {address} was restarted"
        )
        self._drop(flight)
        for index in range(flight.start, flight.start + flight.count):
            if job.states[index] == TaskState.RUNNING:
                self._failed(job, flight, index, exc, self._worker_id(address))
        self._check_done(job)
        self._admin.submit(self._restart, [address], f"task {flight.start} of job {job.id} timed out")

    # --- workers ------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._state is PoolState.RUNNING:
            self._refresh_workers()
        if self._close_mode is None or self._state is PoolState.RUNNING:
            self._later(TICK, self._tick)

    def _refresh_workers(self) -> None:
        """The scheduler's view of the workers: joins and exits become events, a worker
        that left takes its running chunks back to PENDING, statistics are rebuilt."""
        if self._client is None:
            return
        try:
            info = self._client.scheduler_info(n_workers=-1)["workers"]
        except Exception:
            return
        seen = set()
        new = [a for a in info if a not in self._workers]
        identities: dict[str, Any] = {}
        if new:
            with contextlib.suppress(Exception):
                identities = self._client.run(remote.identity, workers=new, on_error="return")
        for address, data in info.items():
            seen.add(address)
            w = self._workers.get(address)
            if w is None:
                ident = identities.get(address)
                pid, dask_id = ident if isinstance(ident, tuple) else (None, address)
                w = _Worker(next(self._worker_ids), address, pid, data.get("host"),
                            int(data.get("nthreads", 1)), dask_id)
                self._workers[address] = w
                self._known_workers[address] = w
                self.publish(WorkerStarted(w.id, w.pid or 0))
            metrics = data.get("metrics", {})
            w.memory = metrics.get("memory")
            w.cpu = metrics.get("cpu")
        for address in [a for a in self._workers if a not in seen]:
            w = self._workers.pop(address)
            why = self._expected_exits.pop(address, None)
            reason = "crashed" if why is None else f"killed: {why}"
            if self._close_mode is not None:
                reason = "shutdown"
            self.publish(WorkerExited(w.id, w.pid or 0, None, reason))
            for flight in list(self._flights.values()):
                if flight.worker == address and not flight.cancelled:
                    self._lost(flight, address)
        running: dict[str, tuple[int, int]] = {}
        for flight in self._flights.values():
            if flight.worker is not None and not flight.cancelled:
                running.setdefault(flight.worker, (flight.job.id, flight.start))
        stats = tuple(
            WorkerStatistics(
                id=w.id, pid=w.pid, state=WorkerState.READY,
                job=running[w.address][0] if w.address in running else None,
                item=running[w.address][1] if w.address in running else None,
                tasks_done=w.tasks_done,
                cpu_percent=w.cpu, memory_bytes=None if w.memory is None else int(w.memory),
                host=w.address,
            )
            for w in self._workers.values()
        )
        with self._stats_lock:
            self._stats_workers = stats

    # --- completion --------------------------------------------------------------------------

    def _progress(self) -> None:
        touched, self._touched = self._touched, set()
        for job_id in touched:
            job = self._jobs.get(job_id)
            if job is not None:
                # Watchers, JobProgress, and the finish once all is final; a watcher that
                # fails (its loop closed) must not keep the other jobs from progressing.
                self._call(job.progress)

    def _check_done(self, job: Job) -> None:
        # Its chunks in flight are in ``job.inflight``: the job finishes once they are back.
        # Through progress() when its counts changed: the last JobProgress before JobFinished
        # then has the final counts (the widget and the journal of events rely on it).
        if job.id in self._touched:
            self._touched.discard(job.id)
            job.progress()
        else:
            job.check_done()

    def _move(self, job: Job, start: int, count: int, state: TaskState,
              worker_id: int | None = None) -> None:
        if state is TaskState.CANCELLED:  # no value, ever (partial_results tells it apart)
            for index in range(start, start + count):
                if not TaskState(job.states[index]).is_final:
                    job.results[index] = None
        job.transition(start, count, state, worker_id, unfinished_only=True)
        self._touched.add(job.id)

    # --- closing --------------------------------------------------------------------------------

    def _begin_close(self, mode: CloseMode, timeout: float) -> None:
        if self._close_mode is not None:
            return
        self._close_mode = mode
        if self._state is PoolState.RUNNING:
            self._state = PoolState.CLOSING
        if mode is CloseMode.GRACEFUL:
            self._close_deadline = math.inf
        else:
            for job in list(self._jobs.values()):
                self._cancel(job, mode is CloseMode.KILL)
            self._close_deadline = time.monotonic() + timeout
        self._later(0.05, lambda: None)  # wake up to look at the jobs again

    def _ready_to_close(self) -> bool:
        if not any(not j.internal for j in self._jobs.values()):
            return True
        if time.monotonic() >= self._close_deadline:
            return True
        self._later(0.05, lambda: None)
        return False

    def _teardown(self) -> None:
        for job in list(self._jobs.values()):
            job.fail_all(PoolClosedError("the pool was shut down"))
        for flight in list(self._flights.values()):
            self._drop(flight)
        client = self._client
        self._admin.shutdown(wait=True)
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(self._topic)
            for ref in self._fn_refs.values():
                with contextlib.suppress(Exception):
                    ref.release()
            self._fn_refs.clear()
            if not self._owns_client:
                for name in self._replays:
                    with contextlib.suppress(Exception):
                        client.unregister_worker_plugin(name)
            elif self._cluster is not None:
                with contextlib.suppress(Exception):
                    client.close()
                with contextlib.suppress(Exception):
                    self._cluster.close()
            else:
                with contextlib.suppress(Exception):
                    client.close()
        if self._state is not PoolState.BROKEN:
            self._state = PoolState.CLOSED
        for w in list(self._workers.values()):
            if self._cluster is not None:
                self.publish(WorkerExited(w.id, w.pid or 0, None, "shutdown"))
        self._workers.clear()
        with self._stats_lock:
            self._stats_workers = ()
        # Deliver what was published, then let the bus's delivery thread end (joined by join()).
        self._ending = self.events.close(join=False)
        self._closed.set_result(None)


def _pending_runs(job: Job, flight: _Flight) -> list[tuple[int, int]]:
    """Runs of consecutive PENDING items of ``flight`` (the ones that start now)."""
    runs: list[tuple[int, int]] = []
    index = flight.start
    end = flight.start + flight.count
    while index < end:
        if job.states[index] != TaskState.PENDING:
            index += 1
            continue
        run_start = index
        while index < end and job.states[index] == TaskState.PENDING:
            index += 1
        runs.append((run_start, index - run_start))
    return runs


# --- connecting ---------------------------------------------------------------------------------

_PROBE_SOURCE = '''
def orchestra_probe():
    import sys
    try:
        import orchestra_nb
    except ImportError as exc:
        return (None, sys.version_info[:2], str(exc))
    return (getattr(orchestra_nb, "__version__", None), sys.version_info[:2],
            getattr(orchestra_nb, "__file__", None))
'''


def _probe() -> Callable[[], Any]:
    # Defined outside any importable module, so that cloudpickle sends it by value: it must
    # run on a worker that has no orchestra_nb (or another version of it) to say so.
    namespace: dict[str, Any] = {"__name__": "orchestra_probe"}
    exec(_PROBE_SOURCE, namespace)
    fn: Callable[[], Any] = namespace["orchestra_probe"]
    return fn


def check_versions(client: Any) -> None:
    """Raise :class:`DaskVersionError` naming every worker whose orchestra_nb is missing or
    another version, or whose Python differs (functions travel as bytecode)."""
    found = client.run(_probe(), on_error="return")
    here = sys.version_info[:2]
    problems = []
    for address, answer in sorted(found.items()):
        if isinstance(answer, BaseException):
            problems.append(f"{address}: the check failed ({type(answer).__name__}: {answer})")
            continue
        version, python, where = answer
        if version is None:
            problems.append(f"{address}: orchestra_nb is not installed ({where})")
        elif version != __version__:
            problems.append(f"{address}: orchestra_nb {version} ({where}), here {__version__}")
        elif tuple(python) != tuple(here):
            problems.append(f"{address}: Python {python[0]}.{python[1]}, here {here[0]}.{here[1]}")
    if problems:
        raise DaskVersionError(
            "the Dask workers cannot run orchestra tasks; install orchestra_nb "
            f"{__version__} (pip install \"orchestra_nb[dask]=={__version__}\") on every worker, "
            "with the same Python:\n  " + "\n  ".join(problems)
        )


def _key_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return cleaned[:40] or "task"


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def create_dask_backend(
    events: EventBus,
    address: str | None = None,
    client: Any = None,
    workers: int | None = None,
    **options: Any,
) -> DaskBackend:
    """The Dask backend for a Pool.

    ``client``: a ``distributed.Client`` you made (never closed by orchestra); ``address``:
    a scheduler to connect to (``"tcp://host:8786"``, ``"tls://..."`` with ``security=``);
    neither: the current client if there is one, else a ``LocalCluster`` of ``workers``
    processes on 127.0.0.1 that orchestra starts and stops with the pool. Options:
    ``security`` (a ``distributed.Security``), ``threads_per_worker``, ``cancel_grace``,
    ``timeout_grace``, ``start_timeout``, ``retry_random``, ``cluster_options`` (more
    ``LocalCluster`` arguments).
    """
    if client is not None and address is not None:
        raise ValueError("give the Dask backend a client or an address, not both")
    if client is not None and not isinstance(client, distributed.Client):
        raise TypeError(f"client must be a distributed.Client, got {type(client).__qualname__}")
    if client is None and address is None:
        with contextlib.suppress(ValueError):
            current = distributed.Client.current(allow_global=True)  # type: ignore[no-untyped-call]
            if current.status == "running" and not current.asynchronous:
                client = current
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown Dask backend option(s): {', '.join(sorted(unknown))}; "
                        f"known: {', '.join(sorted(_OPTIONS))}")
    return DaskBackend(events, client=client, address=address, workers=workers, **options)


_OPTIONS = frozenset({"security", "threads_per_worker", "cancel_grace", "timeout_grace",
                      "start_timeout", "retry_random", "cluster_options"})
