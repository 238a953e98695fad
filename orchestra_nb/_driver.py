"""Work driven for the caller (layer 3): composites, and calls whose arguments are handles.

Built on the pools' public API only:

* **the driver**: one thread (``orchestra-pipelines``) running a private asyncio loop, on
  which every composite (``Sequence``, ``Parallel``...) and every call whose arguments must
  be awaited first runs as an asyncio task. A composite is a coroutine that submits its
  parts with ``pool.run``/``pool.map`` and awaits their handles; cancelling the coroutine
  cancels the handle it awaits, so "cancel the composite" reaches every running part;
* :class:`CompositeHandle`, the handle of driven work: state, per-step states and counts,
  ``cancel``, ``pause``/``resume``, ``await``, ``result()``, ``on_done``;
* the hooks ``Pool.run``/``Pool.map`` call when a call has callbacks (``_callbacks``) or
  arguments that are handles or steps.

The driver thread is started on first use and has one way out: :func:`close` (also
registered with :mod:`atexit`) stops it, cancelling what still runs on it, then drains and
stops the callback thread. Both start again on next use.

Arguments given as handles: ``pool.run(f, handle)`` returns a :class:`CompositeHandle` at
once; the driver waits for ``handle``, then submits ``f(result)``. **The value passes
through the calling process** (it is unpickled here and pickled again for the worker that
needs it); sending it from worker to worker is a backend feature still to come.

Data flow::

    caller thread            driver thread (asyncio)              I/O thread / workers
    ─────────────            ───────────────────────              ────────────────────
    step.run(pool) ───────▶  task: for each part:
                               wait at the pause gate
                               pool.run / pool.map  ──────────▶  job runs
                               await its handle     ◀──────────  result
    handle.result() ◀──────  outcome future settled ──▶ callback thread: on_success(value)
"""

from __future__ import annotations

import abc
import asyncio
import atexit
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import html
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _callbacks
from ._callbacks import Callbacks, attach_callbacks
from ._exceptions import OrchestraError
from ._handles import MapHandle, TaskHandle
from ._state import FINAL_STATES, TaskState

if TYPE_CHECKING:
    from ._api import Pool

__all__ = [
    "CompositeHandle",
    "Deferred",
    "StepFailed",
    "StepStatus",
    "close",
    "render_html",
    "summary_line",
]

T = TypeVar("T")

_WAKE_INTERVAL = 0.1  # an awaiting notebook cell notices "interrupt" only when its loop wakes

# The notebook layer (loaded only by %load_ext) registers how a composite handle shown as a
# cell's value displays itself (its live block, once per cell), as ``_handles.display_hook``
# does for the job handles.
display_hook: Callable[[Any], None] | None = None


class StepFailed(OrchestraError):
    """A step of a composite failed. ``step`` is its path (``"etl / 1:transform / 0:clean"``),
    ``__cause__`` the step's own exception."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"step {step!r} failed: {type(cause).__name__}: {cause}")
        self.step = step
        self.__cause__ = cause
        self.__suppress_context__ = True

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_step_failed, (self.step, self.__cause__))


def _rebuild_step_failed(step: str, cause: BaseException) -> StepFailed:
    return StepFailed(step, cause)


# --- the driver thread ----------------------------------------------------------------------


class _Driver:
    """A private asyncio loop on one thread, started on first use; :meth:`close` ends it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=self._main, args=(loop,), name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def in_thread(self) -> bool:
        return self._thread is threading.current_thread()

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Closing: whatever still runs is cancelled (its handles cancel their jobs).
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout)


_driver = _Driver("orchestra-pipelines")


def close(timeout: float = 10.0) -> None:
    """Stop the driver (cancelling the composites still running) and the callback thread
    (after the callbacks already queued). Both start again when next needed."""
    _driver.close(timeout)
    _callbacks.close(timeout)


atexit.register(close, 3.0)


# --- arguments that are handles -------------------------------------------------------------


class Deferred(abc.ABC):
    """A description of work (``Task``, ``Sequence``...) that the driver can start on a pool."""

    name: str

    @abc.abstractmethod
    def _start_on(self, pool: Pool, circuit: Any = None) -> CompositeHandle[Any]:
        """Start this work on ``pool`` now; its handle."""


def is_deferred(value: object) -> bool:
    return isinstance(value, _DEFERRED)


def has_deferred(args: Iterable[Any], kwargs: dict[str, Any] | None = None) -> bool:
    """Whether any argument is a handle or a step (cheap: the check every ``run`` makes)."""
    for arg in args:
        if isinstance(arg, _DEFERRED):
            return True
    if kwargs:
        for arg in kwargs.values():
            if isinstance(arg, _DEFERRED):
                return True
    return False


async def wait_foreign(handle: Any) -> Any:
    """The outcome of a handle someone else owns (it may be awaited on another loop too):
    waited for through ``on_done``, never cancelled from here."""
    if not handle.done():
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        handle.on_done(lambda _: loop.call_soon_threadsafe(_wake, ready))
        if isinstance(handle, TaskHandle | MapHandle):
            handle.lend_loop()  # a backend without workers (inline) runs the work on this loop
        await ready
    try:
        return handle.result(0)
    except asyncio.CancelledError as exc:
        # That handle was cancelled (JobCancelled is also asyncio's CancelledError), not
        # this coroutine: report it as an outcome, or asyncio would cancel the waiter.
        raise concurrent.futures.CancelledError(str(exc)) from exc


def lend_driver_loop(handle: Any) -> None:
    """Wait for ``handle`` on the driver's loop, as an awaiting caller would: work submitted
    from a thread without an event loop (the scheduler's) then runs on every backend,
    including one that runs tasks only where they are waited for (inline)."""
    if isinstance(handle, TaskHandle | MapHandle) and not handle.done():
        with contextlib.suppress(RuntimeError):  # the driver is closing: nothing runs any more
            _driver.loop().call_soon_threadsafe(handle.lend_loop)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def resolve(
    pool: Pool, args: tuple[Any, ...], kwargs: dict[str, Any], what: str, circuit: Any = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args``/``kwargs`` with every handle replaced by its result and every step started
    on ``pool`` and replaced by its result (all awaited at once). A failed one raises
    :class:`StepFailed` naming the argument."""
    slots: list[tuple[int | str, Any]] = [(i, a) for i, a in enumerate(args) if isinstance(a, _DEFERRED)]
    slots += [(k, v) for k, v in kwargs.items() if isinstance(v, _DEFERRED)]
    if not slots:
        return args, kwargs
    started: list[CompositeHandle[Any]] = []

    async def one(slot: int | str, value: Any) -> Any:
        if isinstance(value, Deferred):
            handle = value._start_on(pool, circuit)
            started.append(handle)
            value = handle
        label = f"argument {slot}" if isinstance(slot, int) else f"keyword argument {slot!r}"
        try:
            return await wait_foreign(value)
        except asyncio.CancelledError:  # this call is being cancelled
            raise
        except concurrent.futures.CancelledError:  # the argument's own work was cancelled
            cancelled = concurrent.futures.CancelledError(f"{label} of {what} was cancelled")
            raise StepFailed(f"{what} / {label}", cancelled) from cancelled
        except BaseException as exc:
            raise StepFailed(f"{what} / {label}", exc) from exc

    try:
        values = await asyncio.gather(*(one(slot, value) for slot, value in slots))
    except BaseException:
        for handle in started:
            handle.cancel()
        raise
    new_args, new_kwargs = list(args), dict(kwargs)
    for (slot, _), value in zip(slots, values, strict=True):
        if isinstance(slot, int):
            new_args[slot] = value
        else:
            new_kwargs[slot] = value
    return tuple(new_args), new_kwargs


# --- step records and their snapshots -------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class StepStatus:
    """One step of a composite, as :meth:`CompositeHandle.steps` sees it now.

    ``path`` names it from the root (``"etl / 1:transform"``); ``kind`` is ``"task"``,
    ``"map"``, ``"sequence"``, ``"parallel"`` or ``"call"``; ``done``/``failed``/``total``
    count its tasks (a task counts 1, a map its items; ``total`` is None while unknown).
    """

    path: str
    name: str
    kind: str
    depth: int
    state: TaskState
    done: int
    failed: int
    total: int | None
    running: int


class StepRecord:
    """A step's live record (written on the driver thread, read from anywhere)."""

    __slots__ = ("children", "depth", "error", "handle", "kind", "name", "path", "state")

    def __init__(self, name: str, kind: str, path: str, depth: int) -> None:
        self.name = name
        self.kind = kind
        self.path = path
        self.depth = depth
        self.state = TaskState.PENDING
        self.handle: Any = None  # a leaf's TaskHandle / MapHandle once submitted
        self.error: BaseException | None = None
        self.children: list[StepRecord] = []

    def child(self, index: int, name: str, kind: str) -> StepRecord:
        record = StepRecord(name, kind, f"{self.path} / {index}:{name}", self.depth + 1)
        self.children.append(record)
        return record

    def walk(self) -> Iterator[StepRecord]:
        yield self
        for child in self.children:
            yield from child.walk()

    def leaf_counts(self) -> tuple[dict[TaskState, int], int | None]:
        """(task counts by state, total or None) of this subtree's leaves."""
        counts = dict.fromkeys(TaskState, 0)
        total: int | None = 0
        for record in self.walk():
            if record.children or record.kind in ("sequence", "parallel"):
                continue
            handle = record.handle
            if record.kind == "task" and record.state in FINAL_STATES:
                counts[record.state] += 1  # final as soon as the step is (a cancel may lag)
                total = None if total is None else total + 1
            elif handle is not None:
                for state, n in handle.counts().items():
                    counts[state] += n
                t = handle.total
                total = None if total is None or t is None else total + t
                if record.state in FINAL_STATES and t is None:
                    total = None
            elif record.kind == "map":
                total = None
                if record.state in FINAL_STATES:
                    counts[record.state] += 1
            else:
                counts[record.state] += 1
                total = None if total is None else total + 1
        return counts, total

    def status(self) -> StepStatus:
        state = self.state
        if self.handle is not None and state not in FINAL_STATES:
            live = self.handle.state if isinstance(self.handle, TaskHandle) else None
            if live is not None and live in (TaskState.PENDING, TaskState.RUNNING):
                state = live
        counts, total = self.leaf_counts()
        done = counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
        return StepStatus(
            self.path,
            self.name,
            self.kind,
            self.depth,
            state,
            done,
            counts[TaskState.FAILED],
            total,
            counts[TaskState.RUNNING],
        )


# --- the handle of driven work --------------------------------------------------------------


class CompositeHandle(Generic[T]):
    """The handle of a composite (``Sequence``, ``Parallel``...) or of a call that waits for
    its arguments: the same verbs as a :class:`TaskHandle` (``await``, ``result()``,
    ``cancel()``, ``done()``, ``state``, ``counts()``, ``on_done``), plus :meth:`steps`,
    :meth:`pause` and :meth:`resume`.

    ``state`` is PENDING until the driver starts it, RUNNING (also while paused: see
    :attr:`paused`), then SUCCEEDED, FAILED or CANCELLED; a call waiting for arguments that
    are handles is SCHEDULED until they are ready. Pausing stops new parts from
    being submitted; parts already running finish (and a running map, whose items the pool
    hands out, goes on to its end). ``cancel()`` cancels every part, running ones included.
    """

    def __init__(
        self,
        pool: Pool,
        root: StepRecord,
        body: Callable[[CompositeHandle[T]], Coroutine[Any, Any, T]],
        callbacks: Callbacks | None = None,
        *,
        circuit: Any = None,
    ) -> None:
        self.pool = pool
        self.circuit = circuit
        self._root = root
        self._callbacks = callbacks
        self._outcome: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._done_callbacks: list[Callable[[CompositeHandle[T]], object]] = []
        self._paused = False
        self._held = 0  # parts waiting at the pause gate right now
        self._cancel_requested = False
        self._task: asyncio.Task[None] | None = None
        self._gate: asyncio.Event | None = None
        self._inner: Any = None  # a call's own handle, once submitted (for job_id, iteration)
        self._running_maps: set[Any] = set()  # paused with the composite if they can be
        self._inner_ready = threading.Event()
        # The composite runs in its starter's context: what its parts display or print goes
        # to the notebook cell that started it (and a caller can suppress per-job views).
        self._context = contextvars.copy_context()
        self._loop = _driver.loop()
        self._loop.call_soon_threadsafe(self._begin, body)

    # --- the driver side (runs on the driver thread) -----------------------------------

    def _begin(self, body: Callable[[CompositeHandle[T]], Coroutine[Any, Any, T]]) -> None:
        self._gate = asyncio.Event()
        if not self._paused:
            self._gate.set()
        self._task = self._loop.create_task(
            self._main(body), name=f"orchestra: {self.name}", context=self._context
        )
        if self._cancel_requested:
            self._task.cancel()

    async def _main(self, body: Callable[[CompositeHandle[T]], Coroutine[Any, Any, T]]) -> None:
        root = self._root
        root.state = TaskState.RUNNING
        try:
            value = await body(self)
        except asyncio.CancelledError:
            root.state = TaskState.CANCELLED
            self._settle(lambda: self._outcome.cancel())
            return
        except BaseException as exc:
            root.state = TaskState.FAILED
            root.error = error = exc
            _callbacks.submit(self._callbacks, "on_error", error)
            self._settle(lambda: self._outcome.set_exception(error))
            return
        root.state = TaskState.SUCCEEDED
        _callbacks.submit(self._callbacks, "on_success", value)
        self._settle(lambda: self._outcome.set_result(value))

    def _settle(self, set_outcome: Callable[[], object]) -> None:
        # The callbacks were queued first: whoever sees the outcome can wait for them.
        self._inner_ready.set()
        with self._lock:
            set_outcome()
            callbacks, self._done_callbacks = self._done_callbacks, []
        for fn in callbacks:
            fn(self)

    async def gate(self) -> None:
        """Wait here while the composite is paused (before submitting a part)."""
        gate = self._gate
        assert gate is not None
        if gate.is_set():
            return
        self._held += 1
        try:
            await gate.wait()
        finally:
            self._held -= 1

    def set_inner(self, handle: Any) -> None:
        self._inner = handle
        self._inner_ready.set()

    # --- the caller side ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._root.name

    @property
    def events(self) -> Any:
        """The event bus of the pool the parts run on (their jobs' events)."""
        return self.pool.events

    @property
    def job_id(self) -> int | None:
        """The job id of a call's own task once submitted; None for a composite."""
        inner = self._inner
        return None if inner is None else int(inner.job_id)

    @property
    def state(self) -> TaskState:
        state = self._root.state
        if state is TaskState.RUNNING and self._root.kind == "call":
            return self._root.children[0].status().state  # the call's own: SCHEDULED, PENDING...
        return state

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def held(self) -> int:
        """How many parts are waiting at the pause gate now (0 unless paused)."""
        return self._held

    def steps(self) -> list[StepStatus]:
        """Every step, depth first from the root, with its state and counts now."""
        return [record.status() for record in self._root.walk()]

    def counts(self) -> dict[TaskState, int]:
        """Tasks in each state, over every part (a map's items counted one by one)."""
        return self._root.leaf_counts()[0]

    @property
    def total(self) -> int | None:
        """Tasks in all, or None while some map's input is not known yet."""
        return self._root.leaf_counts()[1]

    def exceptions(self) -> dict[str, BaseException]:
        """The exceptions of the failed steps, by step path."""
        return {r.path: r.error for r in self._root.walk() if r.error is not None and not r.children}

    def partial_results(self, fill: Any = None) -> list[Any]:
        """A call's map results so far (see ``MapHandle.partial_results``); [] before it started."""
        inner = self._inner
        return [] if inner is None else list(inner.partial_results(fill))

    def done(self) -> bool:
        return self._outcome.done()

    def cancelled(self) -> bool:
        return self._outcome.cancelled()

    def finished(self) -> bool:
        """True once done and every part's tasks are final (after a cancel: once it took
        effect in the pool)."""
        return self._outcome.done() and all(r.handle is None or r.handle.finished() for r in self._root.walk())

    def on_done(self, fn: Callable[[CompositeHandle[T]], object]) -> None:
        """Call ``fn(handle)`` once done (at once if done already), on the driver thread:
        ``fn`` must be quick."""
        with self._lock:
            if not self._outcome.done():
                self._done_callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> bool:
        """Cancel every part (running tasks are interrupted); False if already done."""
        if self._outcome.done():
            return False
        self._cancel_requested = True
        with contextlib.suppress(RuntimeError):  # the driver closed: nothing runs any more
            self._loop.call_soon_threadsafe(self._cancel_now)
        return True

    def _cancel_now(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def pause(self) -> None:
        """Submit no new part until :meth:`resume`; running parts finish."""
        self._paused = True
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_gate, False)

    def resume(self) -> None:
        self._paused = False
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set_gate, True)

    def _set_gate(self, open_: bool) -> None:
        if self._gate is None:
            return
        if open_ and not self._paused:
            self._gate.set()
        elif not open_ and self._paused:
            self._gate.clear()
        for handle in list(self._running_maps):
            _pause_handle(handle, self._paused)

    def track(self, handle: Any) -> None:
        """A part's map handle is running: pause and resume it with the composite."""
        self._running_maps.add(handle)
        if self._paused:
            _pause_handle(handle, True)

    def untrack(self, handle: Any) -> None:
        self._running_maps.discard(handle)

    def result(self, timeout: float | None = None) -> T:
        """Block until done; the value, or the exception (``StepFailed`` naming the step)."""
        try:
            return self._outcome.result(timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise

    def wait_finished(self, timeout: float | None = None) -> bool:
        """Block until :meth:`finished`; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._outcome.exception(timeout)
        except concurrent.futures.TimeoutError:
            return False
        except concurrent.futures.CancelledError:
            pass
        for record in self._root.walk():
            if record.handle is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not record.handle.wait_finished(left):
                    return False
        return True

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        return await wait_outcome(self._outcome, self.cancel, self.name)

    def __iter__(self) -> Iterator[Any]:
        """A call's map results as they come (waits until it is submitted)."""
        self._inner_ready.wait()
        inner = self._inner
        if inner is None:
            self.result()  # raises why it never started
            return iter(())
        return iter(inner)

    def _ipython_display_(self) -> None:
        hook = display_hook
        if hook is not None:
            hook(self)
        else:
            print(repr(self))

    def _repr_html_(self) -> str:
        """The composite block as it is now (front ends that render HTML without the widgets)."""
        return render_html(self)

    def __repr__(self) -> str:
        counts = self.counts()
        done = counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
        total = self.total
        paused = " paused" if self._paused else ""
        return (
            f"<CompositeHandle {self.name!r} ({_what(self._root)}) {self.state.name.lower()}{paused} "
            f"{done}/{'?' if total is None else total} tasks failed={counts[TaskState.FAILED]}>"
        )


# --- how a composite shows itself -----------------------------------------------------------


def _what(root: StepRecord) -> str:
    """What a handle's root is, for its repr: ``sequence of 3 steps``, ``task``, ``call ...``."""
    if root.kind == "call":
        return "a call waiting for its arguments"
    n = len(root.children)
    return f"{root.kind} of {n} step{'' if n == 1 else 's'}" if n else root.kind


_COLORS = {
    TaskState.SUCCEEDED: "#2e7d32",
    TaskState.FAILED: "#c62828",
    TaskState.CANCELLED: "#757575",
    TaskState.RUNNING: "#1565c0",
    TaskState.PENDING: "#616161",
    TaskState.SCHEDULED: "#6a1b9a",
    TaskState.RETRYING: "#ef6c00",
}
_BAR_WIDTH = 10


def _bar(done: int, total: int | None) -> str:
    if not total:
        return ""
    filled = min(_BAR_WIDTH, round(_BAR_WIDTH * done / total))
    return "█" * filled + "░" * (_BAR_WIDTH - filled)


def _state_label(state: TaskState, paused: bool) -> str:
    return "paused" if paused and state is TaskState.RUNNING else state.name.lower()


def _title_parts(handle: CompositeHandle[Any]) -> tuple[str, TaskState, str, str]:
    """(name, state, state label, "done/total tasks[ · failed n]") of ``handle`` now."""
    counts = handle.counts()
    done = counts[TaskState.SUCCEEDED] + counts[TaskState.FAILED] + counts[TaskState.CANCELLED]
    total = handle.total
    tally = f"{done}/{'?' if total is None else total} tasks"
    if counts[TaskState.FAILED]:
        tally += f" · failed {counts[TaskState.FAILED]}"
    return handle.name, handle.state, _state_label(handle.state, bool(handle.paused)), tally


def summary_line(handle: CompositeHandle[Any]) -> str:
    """One line of plain text: ``etl · running · 12/40 tasks · failed 1``."""
    name, _, label, tally = _title_parts(handle)
    return f"{name} · {label} · {tally}"


def render_html(handle: CompositeHandle[Any]) -> str:
    """The composite block's HTML for ``handle`` as it is now: a title line, then one row
    per step (its state, done/total and a bar)."""
    name, state, label, tally = _title_parts(handle)
    paused = bool(handle.paused)
    title = f"<b>{html.escape(name)}</b> · <span style='color:{_COLORS[state]}'>{label}</span> · {tally}"
    rows = []
    for step in handle.steps()[1:]:
        step_label = html.escape(step.path.rsplit(" / ", 1)[-1])
        pad = 1.2 * (step.depth - 1)
        step_tally = f"{step.done}/{'?' if step.total is None else step.total}"
        rows.append(
            f"<tr><td style='padding-left:{pad:.1f}em'>{step_label}</td>"
            f"<td style='color:{_COLORS[step.state]}'>{_state_label(step.state, paused)}</td>"
            f"<td style='text-align:right'>{step_tally}</td>"
            f"<td style='font-family:monospace'>{_bar(step.done, step.total)}</td></tr>"
        )
    table = "<table style='border-collapse:collapse'>" + "".join(rows) + "</table>"
    return f"<div>{title}</div>{table}"


def _pause_handle(handle: Any, paused: bool) -> None:
    """Pause or resume a running map, where the pool's handles support it."""
    method = getattr(handle, "pause" if paused else "resume", None)
    if method is not None and not handle.done():
        with contextlib.suppress(ValueError):  # it cannot pause: the gate still holds the rest
            method()


async def wait_outcome(outcome: concurrent.futures.Future[T], cancel: Callable[[], object], name: str) -> T:
    """Await a thread-safe future from any loop; interrupting the await calls ``cancel()``.
    The loop is woken every 0.1 s meanwhile, so that a notebook's interrupt gets through."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    outcome.add_done_callback(lambda _: loop.call_soon_threadsafe(_wake, fut))
    ticker = _Ticker(loop)
    try:
        await fut
    except asyncio.CancelledError:
        cancel()  # the awaiting cell was interrupted: stop the work too
        raise
    finally:
        ticker.stop()
    try:
        return outcome.result(0)
    except concurrent.futures.CancelledError:
        raise asyncio.CancelledError(f"{name} was cancelled") from None


class _Ticker:
    """Wakes ``loop`` every 0.1 s while a handle is awaited (so an interrupt gets through)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = loop.call_later(_WAKE_INTERVAL, self._tick)

    def _tick(self) -> None:
        if self._timer is not None:
            self._timer = self._loop.call_later(_WAKE_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_DEFERRED: tuple[type[Any], ...] = (TaskHandle, MapHandle, CompositeHandle, Deferred)


# --- the hooks of Pool.run and Pool.map -----------------------------------------------------


def run_call(
    pool: Pool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    submit: Callable[[tuple[Any, ...], dict[str, Any]], Any],
    name: str,
    on_success: Callable[..., object] | None,
    on_error: Callable[..., object] | None,
) -> Any:
    """``pool.run`` with callbacks or arguments to wait for. ``submit(args, kwargs)`` is
    the plain call (no callbacks, no deferred arguments)."""
    callbacks = Callbacks.of(on_success, on_error, name)
    if not has_deferred(args, kwargs):
        handle = submit(args, kwargs)
        attach_callbacks(handle, callbacks)
        return handle
    return _driven_call(pool, args, kwargs, submit, callbacks, name, "call")


def map_call(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Any, ...],
    options: dict[str, Any],
    name: str,
    on_success: Callable[..., object] | None,
    on_error: Callable[..., object] | None,
    on_item_success: Callable[..., object] | None,
    on_item_error: Callable[..., object] | None,
) -> Any:
    """``pool.map(fn, *iterables, **options)`` with callbacks, or with iterables that are
    handles or steps (their results are mapped over once they are ready)."""
    callbacks = Callbacks.of(on_success, on_error, name)
    items = Callbacks.of(on_item_success, on_item_error, name)

    def submit(ready: tuple[Any, ...], _: dict[str, Any]) -> Any:
        return pool.map(fn, *ready, **options)

    if not has_deferred(iterables):
        handle = submit(iterables, {})
        attach_callbacks(handle, callbacks, items)
        return handle
    return _driven_call(pool, iterables, {}, submit, callbacks, name, "map", items)


def _driven_call(
    pool: Pool,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    submit: Callable[[tuple[Any, ...], dict[str, Any]], Any],
    callbacks: Callbacks | None,
    name: str,
    kind: str,
    items: Callbacks | None = None,
) -> CompositeHandle[Any]:
    root = StepRecord(name, "call", name, 0)
    record = root.child(0, name, "task" if kind == "call" else "map")

    async def body(handle: CompositeHandle[Any]) -> Any:
        record.state = TaskState.SCHEDULED  # waiting for its arguments
        ready_args, ready_kwargs = await resolve(pool, args, kwargs, name, handle.circuit)
        record.state = TaskState.PENDING
        await handle.gate()
        inner = submit(ready_args, ready_kwargs)
        record.handle = inner
        record.state = TaskState.RUNNING
        handle.set_inner(inner)
        if items is not None:
            attach_callbacks(inner, None, items)
        if kind == "map":
            handle.track(inner)
        return await await_owned(inner, record)

    return CompositeHandle(pool, root, body, callbacks)


async def await_owned(handle: Any, record: StepRecord) -> Any:
    """Await a handle this driver submitted (nobody else awaits it): its record follows."""
    try:
        value = await handle
    except asyncio.CancelledError:
        record.state = TaskState.CANCELLED
        raise
    except BaseException as exc:
        record.state = TaskState.FAILED
        record.error = exc
        raise StepFailed(record.path, exc) from exc
    record.state = TaskState.SUCCEEDED
    return value


def close_service(timeout: float = 3.0) -> None:
    """``orchestra.shutdown()``: stop this module's thread (it starts again on next use)."""
    close(timeout)
