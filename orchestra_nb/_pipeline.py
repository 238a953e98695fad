"""Composed work (layer 3): ``Task``, ``Sequence``, ``Parallel`` and ``Map``, nestable.

A step is a description, not started::

    etl = Sequence(
        Task(load, "data.csv"),                  # load("data.csv")
        Map(clean),                              # clean(row) for each row loaded, in a map
        Parallel(Task(mean), Task(spread), limit=2),  # mean(rows), spread(rows) at once
        Task(report),                            # report([mean, spread])
    )
    handle = etl.run(pool)                       # starts it; or ``await etl`` / ``etl.result()``

How input flows: a ``Sequence`` gives each step the previous step's result as its first
argument (``pass_results=False``: every step runs as given); a ``Parallel`` gives its input
to every child and returns the children's results in the order given; a ``Map`` maps its
function over its input (or over the iterable given to it). The first step of the whole
runs as given.

Starting (``run``) makes a :class:`~orchestra_nb._driver.CompositeHandle` and runs the
composite on the driver thread (see ``_driver``), where it submits each part with the
pool's public ``run``/``map`` as the previous one finishes. Every part's task goes through
``circuit=`` when one is given (one breaker for the whole group). A failure stops a
``Sequence`` and raises :class:`StepFailed` naming the step (its path, from the root), with
the step's own exception as ``__cause__``; a ``Parallel`` fails fast (the other children are
cancelled), or collects exceptions in place with ``return_exceptions=True``, and
``stop_after=n`` stops it (cancelling the rest) at the n-th failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._api import default_pool
from ._callbacks import Callbacks
from ._driver import (
    CompositeHandle,
    Deferred,
    StepFailed,
    StepRecord,
    await_owned,
    has_deferred,
    is_deferred,
    resolve,
    wait_foreign,
)
from ._state import FINAL_STATES, TaskState

if TYPE_CHECKING:
    from ._api import Pool
    from ._circuit import CircuitBreaker

__all__ = ["Map", "Parallel", "Sequence", "Step", "Task"]


class _Run:
    """What every part of one run shares: the pool, the handle (its pause gate), the breaker."""

    __slots__ = ("circuit", "handle", "pool")

    def __init__(self, pool: Pool, handle: CompositeHandle[Any], circuit: CircuitBreaker | None) -> None:
        self.pool = pool
        self.handle = handle
        self.circuit = circuit


class Step(Deferred):
    """A description of work; ``run(pool)`` starts it and returns its handle.

    ``await step`` and ``step.result()`` start it on the default pool and wait. A step can
    be run any number of times; each run is independent. Steps (and handles) are also
    accepted as arguments of ``run``, ``map`` and ``Task``: they are started and awaited
    first, and replaced by their results.
    """

    name: str
    kind: str = "step"

    def run(
        self,
        pool: Pool | None = None,
        *,
        on_success: Callable[[Any], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        circuit: CircuitBreaker | None = None,
    ) -> CompositeHandle[Any]:
        """Start on ``pool`` (default: the default pool). ``on_success(result)`` or
        ``on_error(exception)`` is called once when it ends (not if cancelled), on the
        callback thread; ``circuit`` routes every task of the composite through one breaker."""
        return self._start(default_pool() if pool is None else pool, circuit,
                           Callbacks.of(on_success, on_error, self.name))

    def _start_on(self, pool: Pool, circuit: Any = None) -> CompositeHandle[Any]:
        return self._start(pool, circuit, None)

    def _start(self, pool: Pool, circuit: CircuitBreaker | None,
               callbacks: Callbacks | None) -> CompositeHandle[Any]:
        root = StepRecord(self.name, self.kind, self.name, 0)
        self._plan(root)

        async def body(handle: CompositeHandle[Any]) -> Any:
            return await _execute(self, _Run(pool, handle, circuit), root, False, None)

        return CompositeHandle(pool, root, body, callbacks, circuit=circuit)

    def result(self, timeout: float | None = None) -> Any:
        """Run on the default pool and wait for the result."""
        return self.run().result(timeout)

    def __await__(self) -> Any:
        return self.run().__await__()

    def _plan(self, record: StepRecord) -> None:
        """Add the records of this step's children under ``record``."""

    async def _execute(self, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
        raise NotImplementedError


async def _execute(step: Step, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
    """Run ``step`` with its record kept up to date; parts never reached end CANCELLED.
    A leaf (Task, Map) stays PENDING until it is submitted (e.g. while paused)."""
    if step.kind in ("sequence", "parallel"):
        record.state = TaskState.RUNNING
    try:
        result = await step._execute(run, record, has_input, value)
    except asyncio.CancelledError:
        _close(record, TaskState.CANCELLED)
        raise
    except BaseException as exc:
        if record.state not in FINAL_STATES:
            record.state = TaskState.FAILED
        if not record.children and record.error is None:
            record.error = exc.__cause__ if isinstance(exc, StepFailed) and exc.step == record.path else exc
        _close(record, TaskState.CANCELLED)
        raise
    record.state = TaskState.SUCCEEDED
    return result


def _close(record: StepRecord, state: TaskState) -> None:
    for r in record.walk():
        if r.state not in FINAL_STATES:
            r.state = state


class Task(Step):
    """``fn(*args, **kwargs)`` as one task; in a Sequence, ``fn(previous, *args, **kwargs)``.

    ``name`` (keyword-only, so ``fn`` cannot take a keyword argument called ``name``; wrap
    it with ``functools.partial`` then) labels the step; default: ``fn``'s name. Arguments
    that are handles or steps are awaited first and replaced by their results.
    """

    kind = "task"

    def __init__(self, fn: Callable[..., Any], /, *args: Any, name: str | None = None, **kwargs: Any) -> None:
        if not callable(fn):
            raise TypeError(f"Task needs a callable, got {fn!r}")
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.name = name or _name(fn)

    async def _execute(self, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
        args = (value, *self.args) if has_input else self.args
        kwargs = self.kwargs
        if has_deferred(args, kwargs):
            record.state = TaskState.SCHEDULED  # waiting for its arguments
            args, kwargs = await resolve(run.pool, args, kwargs, record.path, run.circuit)
            record.state = TaskState.PENDING
        await run.handle.gate()
        try:
            handle = run.pool.options(name=self.name, circuit=run.circuit).run(self.fn, *args, **kwargs)
        except Exception as exc:  # an unpicklable argument, a closed pool...
            raise StepFailed(record.path, exc) from exc
        record.handle = handle
        record.state = TaskState.RUNNING
        return await await_owned(handle, record)

    def __repr__(self) -> str:
        return f"Task({self.name})"


class Map(Step):
    """``fn`` over every item of ``iterable`` if given, else of its input (the previous
    step's result), as one map.

    Keyword options are ``map``'s (``chunksize``, ``ordered``, ``return_exceptions``,
    ``timeout``, ``retries``, ``retry_on``, ``on_item_success``, ``on_item_error``...).
    ``iterable`` may be a handle or a step: it is awaited first.
    """

    kind = "map"

    def __init__(self, fn: Callable[..., Any], iterable: Iterable[Any] | None = None, /, *,
                 name: str | None = None, **map_options: Any) -> None:
        if not callable(fn):
            raise TypeError(f"Map needs a callable, got {fn!r}")
        for bad in ("circuit", "name"):
            if bad in map_options:
                raise TypeError(f"Map({_name(fn)}): {bad}= is set by the composite's run()")
        self.fn = fn
        self.iterable = iterable
        self.map_options = map_options
        self.name = name or f"map({_name(fn)})"

    async def _execute(self, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
        if self.iterable is not None:  # given explicitly: the input is not used
            source = self.iterable
        elif has_input:
            source = value
        else:
            raise StepFailed(record.path, TypeError(
                f"{self.name} has no input: give it an iterable, or put it after a step in a Sequence"))
        if is_deferred(source):
            try:
                source = await (wait_foreign(source) if not isinstance(source, Deferred)
                                else await_owned(source._start_on(run.pool, run.circuit), record))
            except (StepFailed, asyncio.CancelledError):
                raise
            except BaseException as exc:
                raise StepFailed(f"{record.path} / input", exc) from exc
        await run.handle.gate()
        try:
            handle = run.pool.map(self.fn, source, name=self.name, circuit=run.circuit, **self.map_options)
        except Exception as exc:
            raise StepFailed(record.path, exc) from exc
        record.handle = handle
        record.state = TaskState.RUNNING
        run.handle.track(handle)
        try:
            return await await_owned(handle, record)
        finally:
            run.handle.untrack(handle)

    def __repr__(self) -> str:
        return f"Map({self.name})"


class Sequence(Step):
    """Steps one after another; each gets the previous result (unless ``pass_results=False``:
    then every step runs as given). Its result is the last step's. Callables are taken as
    ``Task(fn)``."""

    kind = "sequence"

    def __init__(self, *steps: Step | Callable[..., Any], name: str | None = None,
                 pass_results: bool = True) -> None:
        if not steps:
            raise ValueError("Sequence needs at least one step")
        self.steps = tuple(_as_step(s, i, "Sequence") for i, s in enumerate(steps))
        self.pass_results = pass_results
        self.name = name or "sequence"

    def _plan(self, record: StepRecord) -> None:
        for i, step in enumerate(self.steps):
            step._plan(record.child(i, step.name, step.kind))

    async def _execute(self, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
        feed = has_input and self.pass_results
        for step, child in zip(self.steps, record.children, strict=True):
            value = await _execute(step, run, child, feed, value)
            feed = self.pass_results
        return value

    def __repr__(self) -> str:
        return f"Sequence({', '.join(map(repr, self.steps))})"


class _Stop(Exception):
    """Raised inside a Parallel's task group at the ``stop_after``-th failure."""


class Parallel(Step):
    """Steps at the same time, each given the same input; the results in the order given.

    ``limit``: at most that many children run at once (the others wait, in order).
    A failure cancels the other children and fails the Parallel (``StepFailed`` naming the
    child); with ``return_exceptions=True`` failed children give their exception in place
    instead, until ``stop_after`` failures (default: never), when the rest are cancelled and
    the Parallel fails with a ``StepFailed`` whose cause is an ``ExceptionGroup`` of them.
    """

    kind = "parallel"

    def __init__(self, *steps: Step | Callable[..., Any], limit: int | None = None,
                 return_exceptions: bool = False, stop_after: int | None = None,
                 name: str | None = None) -> None:
        if not steps:
            raise ValueError("Parallel needs at least one step")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"Parallel limit must be a positive int, got {limit!r}")
        if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
            raise ValueError(f"Parallel stop_after must be a positive int, got {stop_after!r}")
        if stop_after not in (None, 1) and not return_exceptions:
            raise ValueError("stop_after > 1 needs return_exceptions=True (the failed children's "
                             "places in the result hold their exceptions)")
        self.steps = tuple(_as_step(s, i, "Parallel") for i, s in enumerate(steps))
        self.limit = limit
        self.return_exceptions = return_exceptions
        self.stop_after = stop_after
        self.name = name or "parallel"

    def _plan(self, record: StepRecord) -> None:
        for i, step in enumerate(self.steps):
            step._plan(record.child(i, step.name, step.kind))

    async def _execute(self, run: _Run, record: StepRecord, has_input: bool, value: Any) -> Any:
        results: list[Any] = [None] * len(self.steps)
        failures: list[BaseException] = []
        slots = asyncio.Semaphore(self.limit) if self.limit is not None else None

        stopped: list[BaseException] = []  # the failures that stopped it, once it stopped

        async def one(i: int) -> None:
            step, child = self.steps[i], record.children[i]
            if stopped:  # a slot freed by the stopping failure: start nothing more
                _close(child, TaskState.CANCELLED)
                return
            try:
                results[i] = await _execute(step, run, child, has_input, value)
            except StepFailed as exc:
                if not self.return_exceptions:
                    raise
                original = exc.__cause__ if exc.__cause__ is not None else exc
                results[i] = original
                failures.append(original)
                if self.stop_after is not None and len(failures) >= self.stop_after and not stopped:
                    stopped.extend(failures)
                    raise _Stop from None

        async def child(i: int) -> None:
            if slots is None:
                await one(i)
                return
            async with slots:
                await one(i)

        try:
            async with asyncio.TaskGroup() as group:
                for i in range(len(self.steps)):
                    group.create_task(child(i), name=f"orchestra: {record.children[i].path}")
        except BaseExceptionGroup as group_error:
            first = group_error.exceptions[0]
            if isinstance(first, _Stop):
                failed = BaseExceptionGroup(f"stopped after {len(stopped)} failures", stopped)
                raise StepFailed(record.path, failed) from failed
            if isinstance(first, StepFailed):  # the first failure (others may have been in flight)
                raise first from first.__cause__
            raise
        return results

    def __repr__(self) -> str:
        return f"Parallel({', '.join(map(repr, self.steps))}, limit={self.limit})"


def _as_step(step: Any, index: int, where: str) -> Step:
    if isinstance(step, Step):
        return step
    if callable(step):
        return Task(step)
    raise TypeError(f"{where} step {index} must be a Task, Map, Sequence, Parallel or callable, got {step!r}")


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
