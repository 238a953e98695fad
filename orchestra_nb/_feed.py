"""Reading a job's input (layer 2): user code never runs on the I/O thread.

A map's input may be anything iterable. Iterating the built-in containers (lists, tuples,
ranges, dicts, sets, strings, numpy arrays) runs no user code, so the engine reads those
itself, lazily, a chunk at a time. Anything else (a generator, a file, a database cursor,
another job's handle, an async iterator) may block or raise at any moment: a
:class:`Feeder` thread of the job's own reads it into a bounded :class:`FeedBuffer`, and
the backend takes items from the buffer without ever waiting. So a slow generator delays
only its own job, ``pool.map(g, pool.map(f, xs))`` streams (``g`` starts on ``f``'s first
results), and a generator that raises fails its job with that exception while the items
read before keep their results.

The feeder reads at most ``capacity`` items ahead of what the backend took (twice the
largest chunk asked for, at least ``MIN_CAPACITY``), so an endless input costs no memory.
It ends when the input ends or raises, or when the job is cancelled or closed; a feeder
blocked inside the user's ``next()`` ends as soon as that call returns.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["FeedBuffer", "Feeder", "plan"]

MIN_CAPACITY = 64  # a small read-ahead: an input may be costly to read

# Iterating these runs no user code (their items are never touched).
_TRUSTED = (list, tuple, range, str, bytes, bytearray, dict, set, frozenset, collections.deque)


def _trusted(obj: object) -> bool:
    cls = type(obj)
    if cls in _TRUSTED:
        return True
    return cls.__name__ == "ndarray" and cls.__module__ == "numpy"


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))  # type: ignore[arg-type]
        except Exception:  # no len(), or a len() that fails: unknown until read
            return None
    return min(lengths)


def plan(iterables: tuple[Iterable[Any], ...], star: bool) -> tuple[Any, int | None, Feeder | None]:
    """(source, total, feeder) for a job over ``iterables``: an iterator the engine may
    read itself, or a :class:`FeedBuffer` filled by the returned feeder (not started)."""
    if all(_trusted(it) for it in iterables):
        source: Iterator[Any] = zip(*iterables, strict=False) if star else iter(iterables[0])
        return source, _length(iterables), None
    loop = None
    for it in iterables:
        if not hasattr(it, "__iter__"):
            if hasattr(it, "__aiter__"):
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    raise TypeError(
                        f"map() got an async iterable ({type(it).__qualname__}) outside a running "
                        "event loop: await the map in a coroutine, or pass a plain iterable"
                    ) from None
                continue
            raise TypeError(f"map() needs iterables, got {type(it).__qualname__}")
    total = _length(iterables) if loop is None else None
    buffer = FeedBuffer()
    return buffer, total, Feeder(iterables, star, buffer, loop)


class FeedBuffer:
    """Items read ahead by a feeder, taken by the backend without blocking."""

    def __init__(self) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self.capacity = MIN_CAPACITY
        self.ended = False  # the input is read to its end (or raised)
        self.error: BaseException | None = None
        self.closed = False  # the job no longer wants items
        self._waiting = False  # the backend found it empty and waits for items
        self.on_items: Callable[[], object] | None = None  # tells the backend: more to take

    def take(self, size: int) -> tuple[list[Any], bool]:
        """Up to ``size`` items now, and whether the input has ended after them."""
        with self._cond:
            if 2 * size > self.capacity:
                self.capacity = 2 * size
            if size >= len(self._items):
                items = list(self._items)
                self._items.clear()
            else:
                items = [self._items.popleft() for _ in range(size)]
            ended = self.ended and not self._items
            self._waiting = not items and not ended
            self._cond.notify_all()  # room for the feeder
        return items, ended

    def put(self, item: Any) -> bool:
        """Feeder side: add an item, waiting while the buffer is full; False once closed."""
        with self._cond:
            while len(self._items) >= self.capacity and not self.closed:
                self._cond.wait()
            if self.closed:
                return False
            self._items.append(item)
            wake, self._waiting = self._waiting, False
        if wake:
            self._wake()
        return True

    def put_many(self, items: list[Any]) -> bool:
        """Producer side, for a producer that bounds its own backlog (a joblib call keeps a
        few batches in flight) and then tells the backend itself (``input_ready_now``): add
        ``items`` at once, never waiting; False once closed or ended."""
        with self._cond:
            if self.closed or self.ended:
                return False
            self._items.extend(items)
            self._waiting = False
            self._cond.notify_all()
        return True

    def end(self, error: BaseException | None) -> None:
        with self._cond:
            self.ended = True
            self.error = error
            wake, self._waiting = self._waiting, False
        if wake:
            self._wake()

    def close(self) -> None:
        """The job is done with its input (cancelled, failed, closed): stop the feeder."""
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()

    def wait_for_items(self, timeout: float | None = None) -> None:
        """For backends that run tasks on the waiting thread: block until the feeder has
        added items or ended."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self.ended or self.closed, timeout)

    def _wake(self) -> None:
        callback = self.on_items
        if callback is not None:
            callback()
        with self._cond:
            self._cond.notify_all()


class Feeder:
    """The thread that reads one job's input into its :class:`FeedBuffer`. Owned by the
    buffer's job: it ends with the input or when the buffer is closed."""

    def __init__(
        self, iterables: tuple[Iterable[Any], ...], star: bool, buffer: FeedBuffer,
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self._iterables = iterables
        self._star = star
        self.buffer = buffer
        self._loop = loop
        self.thread: threading.Thread | None = None

    def start(self, name: str, on_items: Callable[[], object]) -> None:
        self.buffer.on_items = on_items
        self.thread = threading.Thread(target=self._run, name=f"orchestra-feed-{name}", daemon=True)
        self.thread.start()

    def _items(self) -> Iterator[Any]:
        if self._loop is None:
            if self._star:
                return zip(*self._iterables, strict=False)
            return iter(self._iterables[0])
        iterators = [_from_async(it, self._loop) if not hasattr(it, "__iter__") else iter(it)
                     for it in self._iterables]
        return zip(*iterators, strict=False) if self._star else iterators[0]

    def _run(self) -> None:
        buffer = self.buffer
        error: BaseException | None = None
        try:
            for item in self._items():
                if not buffer.put(item):
                    return
        except BaseException as exc:  # the user's input raised: the job fails with it
            error = exc
        finally:
            self._iterables = ()
            buffer.end(error)


def _from_async(aiterable: Any, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """Iterate an async iterable from this thread, on the loop it belongs to."""
    iterator = aiterable.__aiter__()
    for _ in itertools.count():
        future = asyncio.run_coroutine_threadsafe(_next_or_stop(iterator), loop)
        done, value = future.result()
        if done:
            return
        yield value


async def _next_or_stop(iterator: Any) -> tuple[bool, Any]:
    try:
        return False, await iterator.__anext__()
    except StopAsyncIteration:
        return True, None
