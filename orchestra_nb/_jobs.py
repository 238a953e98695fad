"""A job's task table (layer 2): which items exist, their states, results and errors.

A job is one ``map`` or one ``run``. It pulls items lazily from its input, so a generator
of a million items is never materialised; ``results`` grows as items are pulled. Every
item's state is one byte of ``states``; transitions are applied to ranges (a chunk), so
per-item accounting costs a slice assignment per chunk, not a Python call per item.

Only the I/O thread mutates a job. Other threads read ``counts`` (a list of ints, each read
atomic under the GIL) and wait on ``finished`` / the handle's future.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import itertools
import math
import pickle
import reprlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._events import JobFinished, JobPaused, JobProgress, JobStarted, TaskStateChanged
from ._feed import FeedBuffer
from ._policy import RetryPolicy
from ._state import FINAL_STATES, LEGAL, TaskState, done_count
from ._stats import JobStatistics
from ._table import SEGMENT, SegmentedList, SegmentedStates
from ._waiting import wait_interruptibly

if TYPE_CHECKING:
    from ._bus import EventBus

__all__ = [
    "DEFAULT_RETRY", "MAX_CHUNK", "STREAM_WINDOW", "Chunk", "IllegalTransition", "Job", "JobFuture",
    "LazyEvent", "adaptive_chunk_size", "describe_input", "next_job_id",
]

DEFAULT_RETRY = RetryPolicy()

# A job being iterated runs at most this many items ahead of its consumer (backpressure).
STREAM_WINDOW = 32_768
# Items in one chunk at most, on every backend: a chunk then spans at most two segments of a
# streamed job's table.
MAX_CHUNK = SEGMENT


def adaptive_chunk_size(
    job: Job, estimate: float | None, *, target_seconds: float, balance_slots: int,
    floor_seconds: float = 0.0,
) -> int:
    """The size of ``job``'s next chunk, the one rule every backend follows.

    One item for calls with a timeout or a circuit breaker (each is judged alone) and for a
    function not timed yet (``estimate`` None: the probe whose timing sizes what follows); the
    user's ``chunksize`` if given; otherwise ``target_seconds`` of estimated work, but to a
    known end no more than the remaining items spread over ``balance_slots`` chunks, so that
    the last ones balance, and never below ``floor_seconds`` of work (a chunk's dispatch then
    costs more than the balance it buys)."""
    if job.timeout is not None or job.circuit is not None:
        return 1
    if job.chunksize is not None:
        return job.chunksize
    if estimate is None:
        return 1
    estimate = max(estimate, 1e-7)
    size = math.ceil(target_seconds / estimate)
    remaining = job.remaining()
    if remaining is not None:
        balanced = math.ceil(remaining / max(1, balance_slots))
        size = min(size, max(balanced, int(floor_seconds / estimate)))
    return max(1, min(size, MAX_CHUNK))

_NOT_DONE: Any = object()  # placeholder in ``results`` for items without an outcome yet

_STATE_BYTES = {s: bytes([s]) for s in TaskState}
_FINAL = FINAL_STATES
_TASK_STATES = tuple(TaskState)  # byte value -> member, without an enum call

# Guards every job's stream registry (consumers register, advance and leave on their own
# threads; held for a few dict operations, once per batch of results).
_streams_lock = threading.Lock()
_stream_tokens = itertools.count(1)


class IllegalTransition(RuntimeError):
    """A backend tried a move the task state machine does not allow (a bug)."""

    def __init__(self, job: Job, index: int, old: int, new: int) -> None:
        super().__init__(f"job {job.id} ({job.name!r}): task {index} cannot go from "
                         f"{TaskState(old).name} to {TaskState(new).name}")


class LazyEvent:
    """``threading.Event`` that builds its Condition only if somebody blocks on it: jobs are
    created at up to tens of thousands per second, and a Condition costs ~8 us."""

    __slots__ = ("_event", "_flag", "_lock")

    def __init__(self) -> None:
        self._flag = False
        self._event: threading.Event | None = None
        self._lock = threading.Lock()  # a plain Lock is cheap; a Condition is not

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        self._flag = True
        with self._lock:
            event = self._event
        if event is not None:
            event.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        # set() stores the flag before it reads _event: either it sees our event, or we see
        # the flag here.
        return self._flag or wait_interruptibly(event.wait, timeout)



class JobFuture:
    """The outcome of a job, with the parts of ``concurrent.futures.Future`` handles use.

    Cheap to create, because tens of thousands may be alive at once (and the GC walks them
    all): no Condition or Event until someone blocks in ``result``, no callback list until
    a second callback, and the handle that watches it held directly. Callbacks run in the
    thread that sets the outcome, like ``concurrent.futures``.
    """

    __slots__ = ("_callback", "_callbacks", "_event", "_exception", "_lock", "_result", "_state",
                 "watcher")

    def __init__(self) -> None:
        self._state = "pending"  # -> "finished" | "cancelled"
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callback: Callable[[JobFuture], object] | None = None
        self._callbacks: list[Callable[[JobFuture], object]] | None = None
        self._event: threading.Event | None = None
        self._lock = threading.Lock()  # a plain Lock is cheap, and not tracked by the GC
        # Told first when the outcome is set (``watcher.job_done(self)``): the handle.
        self.watcher: Any = None

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def cancel(self) -> bool:
        return self._settle("cancelled", None, None, strict=False)

    def set_result(self, result: Any) -> None:
        self._settle("finished", result, None, strict=True)

    def set_exception(self, exception: BaseException) -> None:
        self._settle("finished", None, exception, strict=True)

    def _settle(self, state: str, result: Any, exc: BaseException | None, strict: bool) -> bool:
        with self._lock:
            if self._state != "pending":
                if strict:
                    raise concurrent.futures.InvalidStateError(f"job future already {self._state}")
                return self._state == "cancelled"
            self._state, self._result, self._exception = state, result, exc
            event = self._event
            first, more = self._callback, self._callbacks
            self._callback = self._callbacks = None
            watcher, self.watcher = self.watcher, None  # no cycle left with the handle
        if event is not None:
            event.set()
        if watcher is not None:
            self._call(watcher.job_done)
        if first is not None:
            self._call(first)
        for callback in more or ():
            self._call(callback)
        return True

    def _call(self, callback: Callable[[JobFuture], object]) -> None:
        # Callbacks run in the thread that settles, usually the pool's I/O thread: one that
        # fails (e.g. it posts to a caller loop that was closed since) must not break it.
        try:
            callback(self)
        except Exception:
            import traceback

            traceback.print_exc()

    def drop_result(self, value: Any) -> None:
        """Forget the result if it is ``value``: a stream took the job's result list over,
        and nothing may read it any more (``Job.pin_results`` refuses)."""
        with self._lock:
            if self._result is value:
                self._result = None

    def add_done_callback(self, fn: Callable[[JobFuture], object]) -> None:
        with self._lock:
            if self._state == "pending":
                if self._callback is None:
                    self._callback = fn
                elif self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        self._call(fn)

    def watch(self, watcher: Any) -> None:
        """Set :attr:`watcher`; told at once if the outcome is already set."""
        with self._lock:
            if self._state == "pending":
                self.watcher = watcher
                return
        watcher.job_done(self)

    def wait(self, timeout: float | None = None) -> bool:
        if self._state != "pending":
            return True
        with self._lock:
            if self._state != "pending":
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return wait_interruptibly(event.wait, timeout)

    def result(self, timeout: float | None = None) -> Any:
        if not self.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        if self._state == "cancelled":
            raise concurrent.futures.CancelledError()
        if self._exception is not None:
            raise self._exception
        return self._result

    def outcome(self) -> tuple[str, Any, BaseException | None]:
        """``(state, result, exception)`` read at once, without waiting: for a future that
        is done (a caller handing the outcome over; "pending" otherwise)."""
        return self._state, self._result, self._exception

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        if self._state == "cancelled":
            raise concurrent.futures.CancelledError()
        return self._exception


class Chunk:
    """Consecutive items of one job sent to one worker in one ``Run`` message."""

    __slots__ = (
        "attempt", "count", "items", "job", "payload", "start", "started_at", "suspect", "target",
        "worker",
    )

    def __init__(self, job: Job, start: int, items: list[Any], target: int | None = None) -> None:
        self.job = job
        self.start = start
        self.items = items
        self.count = len(items)
        self.target = target  # a worker id this chunk must run on (setup broadcasts)
        self.worker: int | None = None
        self.payload: tuple[list[Any], tuple[str | None, ...]] | None = None  # pre-pickled
        self.started_at = 0.0
        self.attempt = 0
        # One item that may have killed a worker: it runs alone on its worker until it
        # either returns or dies alone (then it is blamed).
        self.suspect = False


class Job:
    def __init__(
        self,
        job_id: int,
        name: str,
        digest: bytes,
        fn_payload: bytes,
        source: Iterator[Any] | FeedBuffer | None,
        total: int | None,
        *,
        star: bool = False,
        call: bool = False,
        chunksize: int | None = None,
        ordered: bool = True,
        return_exceptions: bool = False,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        targets: list[int] | None = None,
    ) -> None:
        self.id = job_id
        self.name = name
        self.digest = digest
        self.fn_payload = fn_payload
        # Large buffers the function captures, left out of its payload (``_shared``): set
        # only for a backend that places them (``Backend.places_buffers``).
        self.fn_buffers: tuple[pickle.PickleBuffer, ...] = ()
        self.source = source
        self.total = total
        self.star = star
        self.call = call
        self.chunksize = chunksize
        self.ordered = ordered
        self.return_exceptions = return_exceptions
        self.timeout = timeout
        self.retry = retry or DEFAULT_RETRY
        self.targets = targets
        self.pulled = 0
        # One slot and one state byte per item read: a plain list and bytearray, swapped
        # for segmented ones (``_table``) once a stream hands results over.
        self.results: list[Any] | SegmentedList = []
        self.states: bytearray | SegmentedStates = bytearray()
        self.counts = [0] * len(TaskState)
        self.errors: dict[int, BaseException] = {}
        self.attempts: dict[int, int] = {}  # failures so far, for retries
        # Of each failed item: how long its failing attempt ran (seconds, at most?), and where
        self.failed_durations: dict[int, tuple[float, bool]] = {}
        self.failed_workers: dict[int, int] = {}
        self.crashes: dict[int, int] = {}  # workers killed so far, per item
        self.requeued: collections.deque[Chunk] = collections.deque()
        self.inflight: dict[int, Chunk] = {}  # start -> chunk
        self.cancelled = False
        self.finished = LazyEvent()
        self.future = JobFuture()
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        # Streaming consumers: called on the I/O thread with (start, count) of finished items.
        self.watchers: list[Callable[[int, int], object]] = []
        self.first_error: int | None = None
        self.internal = False  # setup replays: no handle, not waited for by close()
        # A batch of run() calls: one future per item, and items cancelled one by one.
        self.item_futures: list[JobFuture] | None = None
        self.cancelled_items: set[int] = set()
        # run(): the arguments as pickled by the caller, used by the first dispatch only.
        self.first_payload: tuple[list[Any], tuple[str | None, ...]] | None = None
        self.queued = False  # in the pool's ready_jobs deque
        self.paused = False  # no new chunk is handed out while set (set_paused)
        # Only kept for ordered=False (8 bytes an item), and not once a stream took results.
        self.completion_order: array.array[int] | None = array.array("q")
        # A CircuitBreaker every task goes through (the pool admits each one at dispatch).
        self.circuit: Any = None
        # Set by the backend when it takes the job: where its events go (None: nowhere),
        # and what it does when the job finishes (forget it, free its resources).
        self.bus: EventBus | None = None
        self.on_finished: Callable[[Job], object] | None = None
        # The callable itself, for backends that run it in this process (inline).
        self.fn: Callable[..., Any] | None = None
        # A burst of run() calls: closes the burst to new calls (see seal()).
        self.sealer: Callable[[], object] | None = None
        # What the input raised (read by a feeder): the job fails with it at the end.
        self.input_error: BaseException | None = None
        # Results taken by a stream consumer (None: nobody iterates), and whether take()
        # stopped because the consumer is STREAM_WINDOW items behind.
        self.stream_consumed: int | None = None
        self.stream_blocked = False
        # Hand-over of a streamed job's results: what every stream consumer has taken is
        # dropped from the table (``released`` items so far), unless something asked for
        # the whole list first (``results_pinned``: an await, result(), item callbacks).
        self.results_pinned = False
        self.handed_over = 0  # items every stream consumer has taken (never decreases)
        self.released = 0  # items dropped from states and results (multiple of SEGMENT)
        self._streams: dict[int, int] = {}  # consumer token -> items it took
        # A worker may hold one chunk of this job behind a running one even when chunks are
        # long: its producer keeps only a few items in flight (a joblib call), so a worker
        # that waited for its next chunk to come back through the producer would idle.
        self.queue_one_more = False

    def close_input(self) -> None:
        """No more items wanted: stop the feeder, if the input has one."""
        source, self.source = self.source, None
        if isinstance(source, FeedBuffer):
            source.close()

    def seal(self) -> None:
        """Called by the backend when it takes the job, on its own thread, before it reads
        any item: a burst of ``run`` calls stops taking new calls then, not at submit."""
        sealer, self.sealer = self.sealer, None
        if sealer is not None:
            sealer()

    def open(self, bus: EventBus | None) -> None:
        """A backend takes the job: its events go to ``bus`` from now on."""
        self.bus = bus
        if bus is not None and bus.active:
            bus.publish(JobStarted(self.id, self.name, self.total))

    # --- pulling work -----------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return self.source is None

    def has_work(self) -> bool:
        return bool(self.requeued) or (self.source is not None and not self.cancelled)

    def take(self, size: int, target: int | None = None) -> Chunk | None:
        """The next chunk of at most ``size`` items (re-queued ones first), or None.

        Never waits: an input read by a feeder (``_feed``) gives what it has read so far;
        None then means "nothing yet" until the input has ended (``source`` is None)."""
        if self.requeued:
            return self.requeued.popleft()
        source = self.source
        if source is None or self.cancelled:
            return None
        if self.stream_consumed is not None:  # backpressure from a stream consumer
            room = self.stream_consumed + STREAM_WINDOW - self.pulled
            if room <= 0:
                self.stream_blocked = True
                return None
            size = min(size, room)
        if isinstance(source, FeedBuffer):
            items, ended = source.take(size)
            if ended:
                self.source = None
                self.total = self.pulled + len(items)
                if source.error is not None:
                    self.input_error = source.error
        else:
            items = list(itertools.islice(source, size))
            if len(items) < size:
                self.source = None
                self.total = self.pulled + len(items)
        if not items:
            return None
        if self.handed_over >= self.released + SEGMENT:
            self.release_handed_over()
        start = self.pulled
        self.pulled += len(items)
        self.results.extend([_NOT_DONE] * len(items))
        self.states.extend(_STATE_BYTES[TaskState.PENDING] * len(items))
        self._arrived(start, len(items), TaskState.PENDING)
        if self.total is not None and self.pulled >= self.total:
            self.source = None  # a sized input read to its end: no extra take() needed
        chunk = Chunk(self, start, items, target)
        if start == 0 and self.first_payload is not None:
            chunk.payload, self.first_payload = self.first_payload, None
        return chunk

    def remaining(self) -> int | None:
        if self.total is None:
            return None
        return self.total - self.pulled + sum(c.count for c in self.requeued)

    # --- transitions: the one place a task's state changes ----------------------------

    def transition(
        self, start: int, count: int, new: TaskState, worker_id: int | None = None,
        attempt: int | None = None, delay: float | None = None, *, unfinished_only: bool = False,
    ) -> None:
        """Move tasks ``start..start+count-1`` to ``new``, keeping ``counts`` exact and
        publishing one :class:`TaskStateChanged` per run of tasks that shared a state.

        Every move is checked against ``_state.LEGAL``; a move to the state a task is in
        already does nothing. ``unfinished_only``: tasks in a final state are left alone
        (a range of which some were cancelled one by one); otherwise moving a final task is
        an :class:`IllegalTransition`, a bug in the backend.
        """
        states = self.states
        if count == 1:
            old = states[start]
            if old == new:
                return
            if (old, new) not in LEGAL:
                if unfinished_only and old in _FINAL:
                    return
                raise IllegalTransition(self, start, old, new)
            self.counts[old] -= 1
            states[start] = new
            self.counts[new] += 1
            self._moved(start, 1, old, new, worker_id, attempt, delay)
            return
        segment = states[start : start + count]
        first = segment[0]
        if segment.count(first) == count:
            if first == new:
                return
            if (first, new) not in LEGAL:
                if unfinished_only and first in _FINAL:
                    return
                raise IllegalTransition(self, start, first, new)
            self.counts[first] -= count
            states[start : start + count] = _STATE_BYTES[new] * count
            self.counts[new] += count
            self._moved(start, count, first, new, worker_id, attempt, delay)
            return
        # Mixed states: one move per run of equal states, each checked on its own.
        offset = 0
        while offset < count:
            old = segment[offset]
            end = offset + 1
            while end < count and segment[end] == old:
                end += 1
            if old != new:
                if (old, new) in LEGAL:
                    self.counts[old] -= end - offset
                    states[start + offset : start + end] = _STATE_BYTES[new] * (end - offset)
                    self.counts[new] += end - offset
                    self._moved(start + offset, end - offset, old, new, worker_id, attempt, delay)
                elif not (unfinished_only and old in _FINAL):
                    raise IllegalTransition(self, start + offset, old, new)
            offset = end

    def _moved(
        self, start: int, count: int, old: int, new: TaskState, worker_id: int | None,
        attempt: int | None, delay: float | None,
    ) -> None:
        bus = self.bus
        if bus is not None and bus.active:
            bus.publish(TaskStateChanged(self.id, start, count, new, worker_id, attempt, delay,
                                         _TASK_STATES[old]))
        if new in _FINAL:
            if not self.ordered and self.completion_order is not None:
                self.completion_order.extend(range(start, start + count))
            if self.item_futures is not None:
                self._resolve_items(start, count, new)

    def _arrived(self, start: int, count: int, state: TaskState) -> None:
        """Tasks that came into being (read from the input) in ``state``."""
        self.counts[state] += count
        bus = self.bus
        if bus is not None and bus.active:
            bus.publish(TaskStateChanged(self.id, start, count, state, None, None, None, None))

    def _resolve_items(self, start: int, count: int, new: TaskState) -> None:
        """A call batch: each item is a ``run`` call with a handle (and future) of its own."""
        futures = self.item_futures
        assert futures is not None
        for index in range(start, start + count):
            fut = futures[index]
            if fut.done():
                continue
            if new == TaskState.SUCCEEDED:
                fut.set_result(self.results[index])
            elif new == TaskState.FAILED:
                fut.set_exception(self.errors[index])
            else:
                fut.cancel()

    def statistics(self, now: float) -> JobStatistics:
        """This job's line of ``Pool.statistics()`` (``now``: ``time.monotonic()``)."""
        counts = tuple(self.counts)
        return JobStatistics(
            id=self.id, name=self.name, total=self.total, read=self.pulled,
            counts={s: counts[s] for s in TaskState},
            elapsed=(self.ended_at or now) - self.started_at,
            finished=self.finished.is_set(), cancelled=self.cancelled, paused=self.paused,
        )

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume: the backend calls this where it hands out tasks (its dispatch
        thread, or under its table lock), so that the :class:`JobPaused` it publishes comes
        before any task handed out after it. False if nothing changed."""
        if paused == self.paused:
            return False
        self.paused = paused
        bus = self.bus
        if bus is not None and bus.active:
            bus.publish(JobPaused(self.id, paused))
        return True

    # --- streams: results handed over to ``for`` / ``async for`` ---------------------------

    def open_stream(self) -> int:
        """A stream consumer starts (any thread): its token for :meth:`advance_stream`.

        Raises RuntimeError once a stream took a segment of results: they may be gone."""
        with _streams_lock:
            if self.handed_over >= SEGMENT:
                raise RuntimeError(self._handed_over_message("iterate it again"))
            token = next(_stream_tokens)
            self._streams[token] = 0
            return token

    def advance_stream(self, token: int, consumed: int) -> None:
        """The consumer ``token`` has taken the first ``consumed`` results (ordered) or every
        result before index ``consumed`` (unordered): once every consumer has, and nothing
        pinned the results, the table may drop them."""
        with _streams_lock:
            if token not in self._streams:
                return
            self._streams[token] = consumed
            if not self.results_pinned:
                self.handed_over = max(self.handed_over, min(self._streams.values()))
        if self.finished.is_set() and self.handed_over >= self.released + SEGMENT:
            self.release_handed_over()  # the engine is done with this job: drop them here

    def close_stream(self, token: int) -> None:
        with _streams_lock:
            self._streams.pop(token, None)

    def pin_results(self) -> None:
        """Keep every result from now on (the whole list will be asked for). Raises
        RuntimeError once a stream took a segment of results (they may be gone)."""
        with _streams_lock:
            if self.handed_over >= SEGMENT:
                raise RuntimeError(self._handed_over_message("get its list of results"))
            self.results_pinned = True

    def _handed_over_message(self, wanted: str) -> str:
        return (f"cannot {wanted}: job {self.id} ({self.name!r}) was consumed as a stream "
                f"(for / async for), which took {self.handed_over:,} results and so no longer keeps "
                "them. Await the map (or call result()) instead of iterating it, or before, "
                "to keep them all")

    def release_handed_over(self) -> None:
        """Drop the results and states every stream consumer has taken, a segment at a time.

        Called on the engine's thread (``take``, ``progress``), or by a consumer once the
        job has finished. A job's table is swapped for segmented columns the first time;
        a consumer still reading the old ones reads the same values, only older."""
        with _streams_lock:
            upto = self.handed_over
            if self.results_pinned or upto < self.released + SEGMENT:
                return
            if not isinstance(self.states, SegmentedStates):
                # results first: a reader takes states then results, and a state it sees
                # final must find its value (new values go to the new columns only)
                kept = self.results
                self.results = SegmentedList(kept)
                self.states = SegmentedStates(self.states)
                self.completion_order = None  # only an await reads it, and it can't now
                self.future.drop_result(kept)  # the job finished before the stream took them
            assert isinstance(self.results, SegmentedList)
            self.states.release(upto)
            self.released = self.results.release(upto)

    def snapshot(self) -> tuple[int, bytes, list[Any]]:
        """(first item held, their states, their results) at one moment, for
        ``partial_results()``: no segment is dropped meanwhile. The states are read before
        the results, so a final state always finds its value."""
        with _streams_lock:
            released, states, results = self.released, self.states, self.results
            held = len(states)
            return released, bytes(states[released:held]), list(results[released:held])

    def held(self) -> int:
        """Items whose state and result the table still holds."""
        return self.pulled - self.released

    def state_of(self, index: int) -> TaskState:
        return _TASK_STATES[self.states[index]]

    def done_count(self) -> int:
        return done_count(self.counts)

    def is_complete(self) -> bool:
        return self.source is None and self.done_count() == self.pulled

    def succeed(self, start: int, values: list[Any], worker_id: int | None = None) -> None:
        """Tasks ``start..`` returned ``values``."""
        self.results[start : start + len(values)] = values
        self.transition(start, len(values), TaskState.SUCCEEDED, worker_id)

    def fail(
        self, index: int, exc: BaseException, worker_id: int | None = None,
        duration: float | None = None, duration_bound: bool = False,
    ) -> bool:
        """Task ``index`` failed for good with ``exc`` (False: it was final already).
        ``duration``: how long the failing attempt ran, when known (``duration_bound``: at
        most that long)."""
        if self.states[index] in _FINAL:
            return False
        self.errors[index] = exc
        if duration is not None:
            self.failed_durations[index] = (duration, duration_bound)
        if worker_id is not None:
            self.failed_workers[index] = worker_id
        self.results[index] = exc if self.return_exceptions else None
        if self.first_error is None or index < self.first_error:
            self.first_error = index
        self.transition(index, 1, TaskState.FAILED, worker_id)
        return True

    def cancel_pending(self) -> list[int]:
        """Mark every task not handed to a worker (PENDING or RETRYING) CANCELLED.

        Items are RUNNING from the moment their chunk is sent, so in-flight chunks are left
        to the worker's answer (or its death). Returns the cancelled indices.
        """
        self.cancelled = True
        self.close_input()
        unread = 0 if self.total is None else max(0, self.total - self.pulled)
        if unread:  # a sized input: its unread items are tasks too, and now cancelled
            self.results.extend([None] * unread)
            self.states.extend(_STATE_BYTES[TaskState.CANCELLED] * unread)
            if not self.ordered and self.completion_order is not None:
                self.completion_order.extend(range(self.pulled, self.pulled + unread))
            self._arrived(self.pulled, unread, TaskState.CANCELLED)
            self.pulled += unread
        self.total = self.pulled
        self.requeued.clear()
        self.close_input()
        out: list[int] = []
        for state in (TaskState.PENDING, TaskState.RETRYING, TaskState.SCHEDULED):
            marker = _STATE_BYTES[state]
            index = self.states.find(marker)
            while index != -1:
                end = index + 1
                while end < len(self.states) and self.states[end] == state:
                    end += 1
                self.results[index:end] = [None] * (end - index)
                self.transition(index, end - index, TaskState.CANCELLED)
                out.extend(range(index, end))
                index = self.states.find(marker, end)
        return out

    # --- completion -------------------------------------------------------------------

    def progress(self) -> None:
        """Counts changed: tell the watchers and the bus, and finish if all is final."""
        if self.handed_over >= self.released + SEGMENT:
            self.release_handed_over()
        self.notify(0, 0)
        bus = self.bus
        if bus is not None and bus.active:
            bus.publish(JobProgress(self.id, self.total, tuple(self.counts),
                                    time.monotonic() - self.started_at))
        self.check_done()

    def check_done(self) -> None:
        # ``inflight`` first: right after a send (the common call) it decides alone.
        if not self.inflight and self.is_complete() and not self.finished.is_set():
            self.finish(None)

    def fail_all(self, exc: BaseException) -> None:
        """The job cannot go on (the pool closed or broke, its input raised): every task
        not final fails with ``exc``, and so does the job."""
        for index in range(self.released, self.pulled):  # dropped items were final
            self.fail(index, exc)
        self.close_input()
        self.total = self.pulled
        self.requeued.clear()
        for fut in (self.item_futures or [])[self.pulled :]:  # calls of a batch never read
            if not fut.done():
                fut.set_exception(exc)
        self.finish(exc)

    def finish(self, exc: BaseException | None) -> None:
        """Settle the job's future (``exc``, cancelled, the first error, or the results)."""
        if self.finished.is_set():
            return
        self.ended_at = time.monotonic()
        self.close_input()
        if self.on_finished is not None:
            self.on_finished(self)
        fut = self.future
        if exc is None and self.input_error is not None and not self.cancelled:
            exc = self.input_error
            exc.add_note(f"raised by the input of job {self.id} ({self.name!r}) after "
                         f"{self.pulled} item(s); their results are in partial_results()")
        try:
            if exc is not None:
                fut.set_exception(exc)
            elif self.cancelled:
                fut.cancel()
            elif self.errors and not self.return_exceptions:
                assert self.first_error is not None
                first = self.errors[self.first_error]
                others = len(self.errors) - 1
                if others:
                    first.add_note(f"{others} other task(s) of this job failed too; "
                                   "handle.exceptions() lists them all")
                fut.set_exception(first)
            else:
                fut.set_result(self.results)
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled the handle first
        self.finished.set()
        bus = self.bus
        if bus is not None and bus.active:
            bus.publish(JobFinished(self.id, tuple(self.counts), self.ended_at - self.started_at,
                                    self.cancelled))
        self.notify(-1, 0)

    def notify(self, start: int, count: int) -> None:
        for watch in self.watchers:
            watch(start, count)

    def outcome(self) -> list[Any] | SegmentedList:
        return self.results


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60


def describe_input(job: Job, item: Any) -> str:
    """A task's input as error notes show it: ``f(1, x=2)`` for calls, else the item's
    shortened repr."""
    try:
        if job.call:
            args, kwargs = item
            parts = [_short.repr(a) for a in args] + [f"{k}={_short.repr(v)}" for k, v in kwargs.items()]
            return f"({', '.join(parts)})"
        return _short.repr(item)
    except Exception:  # a repr that raises must not hide the task's own error
        return f"<{type(item).__qualname__}>"


_job_ids = itertools.count(1)


def next_job_id() -> int:
    return next(_job_ids)
