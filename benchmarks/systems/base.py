"""The one interface every benchmarked system implements.

Each adapter offers a synchronous and an asynchronous form of the same four operations
(one call, an ordered map, many separate submissions, a streaming map). The workloads pick
the form through :meth:`System.prefer_async`: orchestra_nb is measured through its public
``await`` API, the peers through their fastest (synchronous) path unless a workload is about
asyncio by definition (event-loop lag, the await column of the round trip).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, ClassVar, TypeVar

from benchmarks import tasks

T = TypeVar("T")
WORKERS = 2


class System(ABC):
    """One parallel-execution system with a 2-worker pool."""

    key: ClassVar[str]
    label: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    #: Slow systems (thousands of tasks take tens of seconds) run heavy workloads once.
    slow: ClassVar[bool] = False
    #: Reference rows (fork) are shown but never count as "best peer": fork is not usable
    #: by a notebook tool (see performance.md).
    reference: ClassVar[bool] = False
    prefer_async: ClassVar[bool] = False
    #: Chunk size the system handles 1,000,000 items with; None means it cannot stream.
    scale_chunksize: ClassVar[int | None] = 2500
    #: Source run before the cold-start clock starts (what a notebook kernel has loaded).
    cold_preamble: ClassVar[str] = ""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        #: Set when a task never came back: close() must kill rather than wait.
        self.hung = False

    @classmethod
    def missing(cls) -> str | None:
        """Name of the first required module that is not installed, if any."""
        for mod in cls.requires:
            if importlib.util.find_spec(mod) is None:
                return mod
        return None

    # -- lifecycle ---------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start the pool and return once every worker is ready (warm)."""

    @abstractmethod
    def close(self) -> None:
        """Shut the pool down; must not hang even if the pool is broken."""

    def warm(self) -> None:
        """Make every worker exist and import the task module (on-demand spawners)."""
        self.map(tasks.nap, [0.2] * WORKERS, chunksize=1)
        self.map(tasks.inc, range(20), chunksize=1)

    def aio(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this system's own event loop (the 'notebook kernel' loop)."""
        return self.loop.run_until_complete(coro)

    def dispose(self) -> None:
        try:
            self.close()
        finally:
            self.loop.close()

    # -- cold start --------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def cold_code() -> str:
        """Source run in a fresh interpreter after the clock started: import the system,
        start a 2-worker pool, set ``first`` to the result of ``abs(-1)`` and define
        ``cleanup()``. ``_t0`` is taken just before it runs."""

    # -- synchronous API ---------------------------------------------------------------
    @abstractmethod
    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T: ...

    @abstractmethod
    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]: ...

    @abstractmethod
    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]: ...

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        """Results of a big map, in order, without holding them all."""
        raise NotImplementedError

    #: The broadcast forms this system is measured in ("captured", "argument").
    broadcast_forms: ClassVar[tuple[str, ...]] = ("captured", "argument")
    #: How this system runs the broadcast workload (shown as a note under its table).
    broadcast_how: ClassVar[str] = (
        "its own map with chunksize = items / (2 x workers): the array is pickled once per chunk"
    )

    def broadcast(self, fn: Callable[..., float], big: Any, parts: int, captured: bool) -> list[float]:
        """``fn(big, i, parts)`` for every ``i`` in ``range(parts)``, the one big array either
        captured by the function (``functools.partial``) or the same argument to every item.

        Default: the peer's own map, in chunks of ``parts / (2 x workers)`` (with chunksize 1
        it would pickle the array for every item)."""
        chunksize = max(1, parts // (2 * WORKERS))
        if captured:
            return self.map(functools.partial(fn, big, parts=parts), range(parts), chunksize)
        return self.starmap(functools.partial(fn, parts=parts), [(big, i) for i in range(parts)], chunksize)

    def starmap(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]], chunksize: int) -> list[T]:
        raise NotImplementedError

    def broadcast_warm(self) -> None:  # noqa: B027  (most systems need nothing)
        """Anything the broadcast path starts on first use (joblib's own executor)."""

    # -- asynchronous API --------------------------------------------------------------
    @abstractmethod
    async def acall(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def amap(self, fn: Callable[[Any], T], items: Sequence[Any], chunksize: int | None = None) -> list[T]:
        # Peers without an awaitable map run their blocking map in a thread, the way a
        # notebook user keeps the kernel responsive with them.
        return await asyncio.to_thread(self.map, fn, items, chunksize)

    async def asubmit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        return list(await asyncio.gather(*[self.acall(fn, x) for x in items]))

    async def astream_sum(
        self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int
    ) -> tuple[int, Any]:
        """Consume a big map as a stream: (count, sum of results)."""
        return await asyncio.to_thread(_count_sum, self.stream(fn, items, chunksize))


def _count_sum(values: Iterable[Any]) -> tuple[int, Any]:
    n, total = 0, 0
    for v in values:
        n += 1
        total += v
    return n, total


def await_cf(fut: Future[T]) -> Awaitable[T]:
    """A concurrent.futures.Future as an awaitable on the running loop."""
    return asyncio.wrap_future(fut)


def await_callback(
    register: Callable[[Callable[[Any], None], Callable[[BaseException], None]], None],
) -> asyncio.Future[Any]:
    """Bridge a callback-style result (called from another thread) to an asyncio future."""
    loop = asyncio.get_running_loop()
    out: asyncio.Future[Any] = loop.create_future()

    def _resolve(value: Any, exc: BaseException | None) -> None:
        if out.done():  # the awaiting task was cancelled meanwhile
            return
        if exc is None:
            out.set_result(value)
        else:
            out.set_exception(exc)

    def _set(value: Any) -> None:
        loop.call_soon_threadsafe(_resolve, value, None)

    def _err(exc: BaseException) -> None:
        loop.call_soon_threadsafe(_resolve, None, exc)

    register(_set, _err)
    return out


class FuturesExecutorSystem(System):
    """A peer that is a ``concurrent.futures`` executor, kept in ``self.ex`` by ``start``."""

    ex: Any

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.ex.submit(fn, *args).result(timeout)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]:
        return list(self.ex.map(fn, items, chunksize=chunksize or 1))

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        futs = [self.ex.submit(fn, x) for x in items]
        return [f.result() for f in futs]

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        return self.ex.map(fn, items, chunksize=chunksize)

    def starmap(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]], chunksize: int) -> list[T]:
        return list(self.ex.map(fn, *zip(*args, strict=True), chunksize=chunksize))

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await await_cf(self.ex.submit(fn, *args))
