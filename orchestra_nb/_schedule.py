"""Scheduled work (layer 3): ``run_after``, ``run_at`` and ``every``.

One :class:`Scheduler` owns one thread (``orchestra-scheduler``, started on first use) that
sleeps until the next start is due, then starts the work with the pool's public ``run`` (or
``step.run(pool)`` for a ``Task``/``Sequence``/...). Each scheduled piece of work has a
:class:`ScheduledHandle`: SCHEDULED until a run starts, then the run's own state, SCHEDULED
again between the runs of a periodic task; ``cancel()`` at any time (it cancels a run in
progress too); ``next_start`` says when it starts next.

Time comes from an injected clock (:class:`SystemClock` by default): tests pass
``orchestra_nb.testing.FakeClock`` and move time with ``clock.advance(s)``, which returns
once the scheduler has started everything due by then, so a schedule can be checked
exactly without sleeping.

Periodic tasks run at fixed times (first start + k * interval, no drift). When a run is due
while the previous one is still going, ``overlap="skip"`` drops it (recorded in
``skipped_times``) and ``overlap="queue"`` starts it as soon as the previous one ends (one
at most waits; later due times are skipped): runs never pile up. A failed or cancelled run
ends the periodic task with that outcome.

``Scheduler.close()`` (and, for the default scheduler, interpreter exit) cancels what is
still scheduled and stops the thread.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextvars
import datetime
import heapq
import itertools
import math
import threading
import time
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

from . import _api
from ._api import default_pool
from ._driver import Deferred, lend_driver_loop, wait_outcome
from ._state import TaskState
from ._stats import ScheduledStatistics

if TYPE_CHECKING:
    from ._api import Pool

__all__ = [
    "Clock",
    "ScheduledHandle",
    "Scheduler",
    "SystemClock",
    "default_scheduler",
    "every",
    "run_after",
    "run_at",
]

OVERLAP_POLICIES = ("skip", "queue")

_ids = itertools.count(1)  # ScheduledHandle.id: unique in this process, over every scheduler
_open: weakref.WeakSet[Scheduler] = weakref.WeakSet()  # the schedulers not closed (status views)
_open_lock = threading.Lock()  # a WeakSet must not change while another thread copies it


class Clock(Protocol):
    """Where a scheduler gets its time (see :class:`SystemClock`, ``testing.FakeClock``)."""

    def monotonic(self) -> float:
        """Seconds, never going back; schedules are kept in these."""

    def now(self) -> datetime.datetime:
        """The wall-clock time now (aware), to place ``run_at`` times and show next starts."""

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        """Wait on ``cond`` (held) until notified or until ``monotonic()`` reaches ``deadline``."""

    def attach(self, on_advance: Callable[[], None]) -> None:
        """Call ``on_advance()`` after the time jumps (a fake clock's ``advance``)."""

    def detach(self, on_advance: Callable[[], None]) -> None: ...


class SystemClock:
    """``time.monotonic`` and the local wall clock; time never jumps."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime.datetime:
        return datetime.datetime.now().astimezone()

    def wait(self, cond: threading.Condition, deadline: float | None) -> None:
        cond.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def attach(self, on_advance: Callable[[], None]) -> None:
        pass

    def detach(self, on_advance: Callable[[], None]) -> None:
        pass


class ScheduledHandle:
    """Work that starts later, or again and again. ``await`` it or call ``result()`` for
    the run's result (``every``: the list of the runs' results, once the last has run)."""

    def __init__(
        self,
        scheduler: Scheduler,
        name: str,
        target: Callable[[Pool], Any],
        first: float,
        interval: float | None,
        count: int | None,
        overlap: str,
        pool: Pool | None,
    ) -> None:
        self.id = next(_ids)
        self.name = name
        self._scheduler = scheduler
        self._target = target
        self._first = first
        self._interval = interval
        self._count = count
        self._overlap = overlap
        self._pool = pool
        self._outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._context = contextvars.copy_context()  # runs start in the scheduling caller's context
        self._next: float | None = first  # clock time of the next due start
        self._due_index = 0  # which multiple of the interval is due next
        self._launched = 0  # runs started or queued
        self._queued = False  # a run waits for the current one to end (overlap="queue")
        self._active: Any = None  # the current run's handle
        self._results: list[Any] = []
        self.runs: list[Any] = []  # the handles of the runs started so far
        self.start_times: list[float] = []  # clock readings when each run started
        self.skipped_times: list[float] = []  # clock readings of due runs skipped (overlap)

    # --- inspection -------------------------------------------------------------------

    @property
    def state(self) -> TaskState:
        """SCHEDULED while waiting to start; the current run's state while one runs; final."""
        outcome = self._outcome
        if outcome.done():
            if outcome.cancelled():
                return TaskState.CANCELLED
            return TaskState.FAILED if outcome.exception() is not None else TaskState.SUCCEEDED
        active = self._active
        if active is None:
            return TaskState.SCHEDULED
        state: TaskState = active.state
        return TaskState.RUNNING if state is TaskState.SCHEDULED else state

    @property
    def next_start(self) -> datetime.datetime | None:
        """When the next run is due (wall clock), or None if no more runs are scheduled."""
        due = self._next
        if due is None:
            return None
        clock = self._scheduler.clock
        return clock.now() + datetime.timedelta(seconds=due - clock.monotonic())

    @property
    def next_start_in(self) -> float | None:
        """Seconds until the next run is due (0 if due now), or None."""
        due = self._next
        return None if due is None else max(0.0, due - self._scheduler.clock.monotonic())

    @property
    def interval(self) -> float | None:
        """The period in seconds (``every``), or None for work that runs once."""
        return self._interval

    @property
    def count(self) -> int | None:
        """How many runs were asked for (None: until cancelled; 1 for ``run_after``/``run_at``)."""
        return 1 if self._interval is None else self._count

    def runs_on(self, pool: Pool | None) -> bool:
        """Whether its runs go to ``pool`` (None, or the default pool: those given no pool)."""
        target = self._pool
        if target is None:
            return pool is None or pool is _api.current_default_pool()
        return target is pool

    def counts(self) -> dict[TaskState, int]:
        """Runs by state (scheduled ones count as SCHEDULED; skipped ones not at all)."""
        counts = dict.fromkeys(TaskState, 0)
        for run in self.runs:
            counts[run.state] += 1
        if self._next is not None and not self._outcome.done():
            counts[TaskState.SCHEDULED] += 1
        return counts

    def statistics(self) -> ScheduledStatistics:
        """A frozen snapshot for the status views (``Pool.statistics().scheduled``)."""
        return ScheduledStatistics(
            id=self.id,
            name=self.name,
            state=self.state,
            next_start=self.next_start,
            next_start_in=self.next_start_in,
            interval=self._interval,
            count=self.count,
            runs=len(self.runs),
            skipped=len(self.skipped_times),
            overlap=self._overlap,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for a status view (see :meth:`ScheduledStatistics.as_dict`)."""
        return self.statistics().as_dict()

    def done(self) -> bool:
        return self._outcome.done()

    def cancelled(self) -> bool:
        return self._outcome.cancelled()

    def on_done(self, fn: Callable[[ScheduledHandle], object]) -> None:
        """Call ``fn(handle)`` once done (in the thread that ends it; keep it quick)."""
        self._outcome.add_done_callback(lambda _: fn(self))

    # --- control ----------------------------------------------------------------------

    def cancel(self) -> bool:
        """Unschedule; a run in progress is cancelled too. False if already done."""
        return self._scheduler._cancel(self)

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._outcome.result(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def __await__(self) -> Generator[Any, None, Any]:
        return wait_outcome(self._outcome, self.cancel, self.name).__await__()

    def __repr__(self) -> str:
        due = self.next_start_in
        when = "" if due is None else f" next in {due:.3g} s"
        return (
            f"<ScheduledHandle id={self.id} {self.name!r} {self.state.name.lower()} runs={len(self.runs)} "
            f"skipped={len(self.skipped_times)}{when}>"
        )

    # --- the scheduler's side (under its lock) ------------------------------------------

    def _plan_next(self) -> float | None:
        """After run number ``_launched`` was started or queued: the next due time."""
        if self._interval is None or (self._count is not None and self._launched >= self._count):
            self._next = None
        else:
            self._due_index += 1
            self._next = self._first + self._due_index * self._interval
        return self._next


class Scheduler:
    """A thread that starts work at given times, on a clock (``SystemClock()`` by default).

    ``with Scheduler(clock) as s:`` closes it at the end: what is still scheduled is
    cancelled, and the thread stops.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = SystemClock() if clock is None else clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, ScheduledHandle]] = []
        self._order = itertools.count()
        self._ready: collections.deque[ScheduledHandle] = collections.deque()  # queued runs now due
        self._ended: collections.deque[tuple[ScheduledHandle, Any]] = collections.deque()  # finished runs
        self._live: set[ScheduledHandle] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._handled_until = -math.inf  # clock time up to which all due work was started
        self.clock.attach(self._after_advance)
        with _open_lock:
            _open.add(self)

    # --- scheduling -------------------------------------------------------------------

    def run_after(
        self,
        delay: float,
        fn: Callable[..., Any],
        /,
        *args: Any,
        pool: Pool | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> ScheduledHandle:
        """Run ``fn(*args, **kwargs)`` (or a step) once, ``delay`` seconds from now."""
        _check_seconds("delay", delay, zero=True)
        return self._add(fn, args, kwargs, self.clock.monotonic() + delay, None, None, "skip", pool, name)

    def run_at(
        self,
        when: datetime.datetime,
        fn: Callable[..., Any],
        /,
        *args: Any,
        pool: Pool | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> ScheduledHandle:
        """Run ``fn(*args, **kwargs)`` once at ``when`` (a naive datetime is local time; a
        time in the past runs at once)."""
        if not isinstance(when, datetime.datetime):
            raise TypeError(f"run_at needs a datetime, got {when!r}")
        delay = (when.astimezone() - self.clock.now()).total_seconds()
        return self._add(
            fn, args, kwargs, self.clock.monotonic() + max(0.0, delay), None, None, "skip", pool, name
        )

    def every(
        self,
        interval: float,
        fn: Callable[..., Any],
        /,
        *args: Any,
        count: int | None = None,
        overlap: str = "skip",
        delay: float | None = None,
        pool: Pool | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> ScheduledHandle:
        """Run ``fn(*args, **kwargs)`` every ``interval`` seconds, first after ``delay``
        (default: ``interval``), ``count`` times (default: until cancelled). ``overlap``:
        ``"skip"`` or ``"queue"`` a run that is due while the previous one still runs."""
        _check_seconds("interval", interval, zero=False)
        if delay is not None:
            _check_seconds("delay", delay, zero=True)
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError(f"count must be a positive int or None, got {count!r}")
        if overlap not in OVERLAP_POLICIES:
            raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {overlap!r}")
        first = self.clock.monotonic() + (interval if delay is None else delay)
        return self._add(fn, args, kwargs, first, interval, count, overlap, pool, name)

    def status(self) -> list[dict[str, Any]]:
        """:meth:`pending` as plain data (see :meth:`ScheduledHandle.as_dict`)."""
        return [handle.as_dict() for handle in self.pending()]

    def pending(self) -> list[ScheduledHandle]:
        """The scheduled work not done yet, soonest first."""
        with self._cond:
            live = list(self._live)
        return sorted(live, key=_soonest)

    def find(self, key: int | str) -> ScheduledHandle | None:
        """The pending work with id ``key`` (an int) or name ``key`` (a str), if any; a name
        shared by several raises ``ValueError`` listing their ids."""
        return _find(self.pending(), key)

    def cancel(self, key: int | str) -> bool:
        """Cancel the pending work ``key`` (its id or its name, see :meth:`find`); False if
        there is none."""
        handle = self.find(key)
        return handle is not None and handle.cancel()

    def _add(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        first: float,
        interval: float | None,
        count: int | None,
        overlap: str,
        pool: Pool | None,
        name: str | None,
    ) -> ScheduledHandle:
        if isinstance(fn, Deferred):
            if args or kwargs:
                raise TypeError(f"{fn.name}: a step takes no arguments here (give them to its Tasks)")
            step = fn

            def target(p: Pool) -> Any:
                return step._start_on(p)

            label = name or step.name
        elif callable(fn):

            def target(p: Pool) -> Any:
                return p.run(fn, *args, **kwargs)

            label = name or getattr(fn, "__qualname__", None) or repr(fn)
        else:
            raise TypeError(f"cannot schedule {fn!r}: not callable and not a step")
        handle = ScheduledHandle(self, label, target, first, interval, count, overlap, pool)
        with self._cond:
            if self._closed:
                raise RuntimeError("this scheduler is closed")
            self._live.add(handle)
            heapq.heappush(self._heap, (first, next(self._order), handle))
            self._handled_until = -math.inf  # an advance() from now on waits for a new pass
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="orchestra-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return handle

    # --- the thread -------------------------------------------------------------------

    def _main(self) -> None:
        with self._cond:
            while not self._closed:
                now = self.clock.monotonic()
                ended = list(self._ended)
                self._ended.clear()
                starts = list(self._ready)
                self._ready.clear()
                while self._heap and self._heap[0][0] <= now:
                    _, _, handle = heapq.heappop(self._heap)
                    if self._due(handle, now):
                        starts.append(handle)
                if ended or starts:
                    self._cond.release()
                    try:
                        for handle, run in ended:
                            self._settle_run(handle, run)
                        for handle in starts:
                            self._start(handle, now)
                    finally:
                        self._cond.acquire()
                    continue
                self._handled_until = now
                self._cond.notify_all()  # an advance() waiting for this pass
                self.clock.wait(self._cond, self._heap[0][0] if self._heap else None)

    def _due(self, handle: ScheduledHandle, now: float) -> bool:
        """A due time of ``handle`` came (lock held): start it now? Plans the next one."""
        if handle._outcome.done() or handle._next is None:
            return False
        start = False
        if handle._active is None and not handle._queued:
            start = True
            handle._launched += 1
        elif handle._overlap == "queue" and not handle._queued:
            handle._queued = True  # started by _run_ended's hand-over when the current run ends
            handle._launched += 1
        else:
            handle.skipped_times.append(now)
        upcoming = handle._plan_next()
        if upcoming is not None:
            heapq.heappush(self._heap, (upcoming, next(self._order), handle))
        return start

    def _start(self, handle: ScheduledHandle, now: float) -> None:
        """Start one run of ``handle`` (on this thread, without the lock)."""
        if handle._outcome.done():
            return
        try:
            pool = handle._pool if handle._pool is not None else default_pool()
            run = handle._context.run(handle._target, pool)
        except BaseException as exc:
            self._end(handle, exc)
            return
        with self._cond:
            handle._active = run
            handle._queued = False
            handle.runs.append(run)
            handle.start_times.append(now)
        if handle._outcome.cancelled():  # cancelled while it was starting
            run.cancel()
        run.on_done(lambda r: self._run_ended(handle, r))
        lend_driver_loop(run)  # nobody else may wait for the run: the driver does

    def _run_ended(self, handle: ScheduledHandle, run: Any) -> None:
        """A run finished (on whatever thread finished it): quick, hand it to the thread."""
        with self._cond:
            if handle._active is run:
                handle._active = None
            if handle._queued:
                self._ready.append(handle)
            self._ended.append((handle, run))
            self._handled_until = -math.inf
            self._cond.notify_all()

    def _settle_run(self, handle: ScheduledHandle, run: Any) -> None:
        if handle._outcome.done():
            return
        if run.cancelled():
            self._end(handle, None, cancelled=True)
            return
        try:
            value = run.result(0)
        except BaseException as exc:
            exc.add_note(f"in run {len(handle._results) + 1} of scheduled {handle.name!r}")
            self._end(handle, exc)
            return
        handle._results.append(value)
        with self._cond:
            # Every run started or queued has ended, and none is due any more.
            finished = handle._next is None and len(handle._results) == handle._launched
        if finished:
            result = handle._results if handle._interval is not None else handle._results[0]
            self._end(handle, None, result=result)

    def _end(
        self, handle: ScheduledHandle, exc: BaseException | None, *, cancelled: bool = False, result: Any = None
    ) -> None:
        with self._cond:
            handle._next = None
            handle._queued = False
            self._live.discard(handle)
        if handle._outcome.done():
            return
        if cancelled:
            handle._outcome.cancel()
        elif exc is not None:
            handle._outcome.set_exception(exc)
        else:
            handle._outcome.set_result(result)

    def _cancel(self, handle: ScheduledHandle) -> bool:
        with self._cond:
            if handle._outcome.done():
                return False
            active = handle._active
            handle._next = None
            handle._queued = False
            self._live.discard(handle)
            handle._outcome.cancel()
            self._cond.notify_all()  # its heap entry is dropped when it comes up
        if active is not None:
            active.cancel()
        return True

    def _after_advance(self) -> None:
        """The clock jumped: wake the thread and wait until it has started what is due."""
        with self._cond:
            if self._thread is None or self._closed:
                return
            target = self.clock.monotonic()
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._handled_until >= target or self._closed, 30.0):
                raise TimeoutError("the scheduler did not catch up with the clock within 30 s")

    # --- closing ----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything still scheduled (and its runs in progress), stop the thread."""
        with _open_lock:
            _open.discard(self)
        with self._cond:
            self._closed = True
            live = list(self._live)
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        for handle in live:
            handle.cancel()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self.clock.detach(self._after_advance)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_seconds(what: str, value: float, *, zero: bool) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or math.isnan(value)
        or value < 0
        or (value == 0 and not zero)
        or math.isinf(value)
    ):
        raise ValueError(
            f"{what} must be a {'non-negative' if zero else 'positive'} number of seconds, got {value!r}"
        )


def _soonest(handle: ScheduledHandle) -> tuple[float, int]:
    # In seconds from now, not clock readings: schedulers may run on different clocks.
    due = handle.next_start_in
    return (math.inf if due is None else due, handle.id)


def _find(handles: list[ScheduledHandle], key: int | str) -> ScheduledHandle | None:
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise TypeError(f"a scheduled task is named by its id (an int) or its name (a str), got {key!r}")
    if isinstance(key, int):
        return next((h for h in handles if h.id == key), None)
    named = [h for h in handles if h.name == key]
    if len(named) > 1:
        ids = ", ".join(str(h.id) for h in named)
        raise ValueError(f"{len(named)} scheduled tasks are named {key!r} (ids {ids}): cancel one by its id")
    return named[0] if named else None


def pending_on(pool: Pool | None) -> list[ScheduledHandle]:
    """The pending work of every open scheduler whose runs go to ``pool`` (see
    :meth:`ScheduledHandle.runs_on`), soonest first."""
    with _open_lock:
        schedulers = list(_open)
    handles = [h for s in schedulers for h in s.pending() if h.runs_on(pool)]
    return sorted(handles, key=_soonest)


def statistics_on(pool: Pool | None) -> tuple[ScheduledStatistics, ...]:
    """``Pool.statistics().scheduled``: the snapshots of :func:`pending_on`."""
    return tuple(h.statistics() for h in pending_on(pool))


def cancel_on(pool: Pool | None, key: int | str) -> bool:
    """Cancel the pending work ``key`` (id or name) whose runs go to ``pool``; False if none."""
    handle = _find(pending_on(pool), key)
    return handle is not None and handle.cancel()


# --- the default scheduler ------------------------------------------------------------------

_default_lock = threading.Lock()
_default: Scheduler | None = None


def default_scheduler() -> Scheduler:
    """The shared scheduler on the system clock (created on first use, closed at exit)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Scheduler()
        return _default


def close_service(timeout: float = 3.0) -> None:
    """Close the default scheduler (``orchestra.shutdown()`` and interpreter exit)."""
    with _default_lock:
        scheduler = _default
    if scheduler is not None:
        scheduler.close(timeout=timeout)


atexit.register(close_service)


def run_after(
    delay: float,
    fn: Callable[..., Any],
    /,
    *args: Any,
    pool: Pool | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> ScheduledHandle:
    """``fn(*args, **kwargs)`` (or a step) in ``delay`` seconds, on ``pool`` (default: the
    default pool); see :class:`Scheduler`."""
    return default_scheduler().run_after(delay, fn, *args, pool=pool, name=name, **kwargs)


def run_at(
    when: datetime.datetime,
    fn: Callable[..., Any],
    /,
    *args: Any,
    pool: Pool | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> ScheduledHandle:
    """``fn(*args, **kwargs)`` (or a step) at ``when``; see :meth:`Scheduler.run_at`."""
    return default_scheduler().run_at(when, fn, *args, pool=pool, name=name, **kwargs)


def every(
    interval: float,
    fn: Callable[..., Any],
    /,
    *args: Any,
    count: int | None = None,
    overlap: str = "skip",
    delay: float | None = None,
    pool: Pool | None = None,
    name: str | None = None,
    **kwargs: Any,
) -> ScheduledHandle:
    """``fn(*args, **kwargs)`` (or a step) every ``interval`` seconds; see :meth:`Scheduler.every`."""
    return default_scheduler().every(
        interval, fn, *args, count=count, overlap=overlap, delay=delay, pool=pool, name=name, **kwargs
    )
