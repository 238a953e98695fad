"""The event bus (layer 2): typed events from the pool to any number of subscribers.

Publishing is an append to each interested subscriber's bounded queue, done on the I/O
thread, and nothing more: a subscriber that falls behind loses its *oldest* events (counted
in ``dropped``) and never slows the pool. Two kinds of subscriber:

* callbacks, called in order on one delivery thread (``orchestra-events``), so a slow or
  failing callback cannot block the I/O thread; the bus owns that thread, and its owner
  (the pool) ends it with :meth:`EventBus.close`;
* async iterators (``async for event in bus.events()``), woken on the loop that iterates.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

from ._events import Event

__all__ = ["EventBus", "Subscription"]

DEFAULT_MAXLEN = 10_000


class Subscription:
    """One subscriber's queue. ``close()`` (or leaving ``async for``) unsubscribes."""

    def __init__(
        self,
        bus: EventBus,
        types: tuple[type[Any], ...] | None,
        maxlen: int,
        callback: Callable[[Event], object] | None = None,
        job_id: int | None = None,
    ) -> None:
        self._bus = bus
        self.types = types
        self.job_id = job_id
        self.callback = callback
        self.queue: collections.deque[Event] = collections.deque(maxlen=maxlen)
        self.dropped = 0
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    def wants(self, event: Event) -> bool:
        if self.types is not None and not isinstance(event, self.types):
            return False
        return self.job_id is None or getattr(event, "job_id", self.job_id) == self.job_id

    def _push(self, event: Event) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(event)
        waiter = self._waiter
        if waiter is not None and self._loop is not None:
            self._waiter = None
            self._loop.call_soon_threadsafe(_wake, waiter)

    def close(self) -> None:
        self.closed = True
        self._bus._remove(self)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        self._loop = asyncio.get_running_loop()
        try:
            while not self.closed or self.queue:
                if self.queue:
                    yield self.queue.popleft()
                    continue
                waiter = self._loop.create_future()
                self._waiter = waiter
                if self.queue or self.closed:  # raced with a push: do not sleep on it
                    self._waiter = None
                    continue
                await waiter
        finally:
            if not self.closed:
                self.close()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class EventBus:
    def __init__(self) -> None:
        self._subs: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._delivery: threading.Thread | None = None
        self._closing: threading.Thread | None = None  # the delivery thread told to end
        self.callback_errors = 0

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def publish(self, event: Event) -> None:
        notify = False
        for sub in self._subs:
            if sub.wants(event):
                sub._push(event)
                notify = notify or sub.callback is not None
        if notify:
            with self._cond:
                self._cond.notify()

    def subscribe(
        self,
        callback: Callable[[Event], object],
        *,
        types: tuple[type[Any], ...] | None = None,
        job_id: int | None = None,
        maxlen: int = DEFAULT_MAXLEN,
    ) -> Subscription:
        """Call ``callback(event)`` on the delivery thread for every matching event."""
        sub = Subscription(self, types, maxlen, callback, job_id)
        self._add(sub)
        with self._lock:
            if self._delivery is None:
                self._delivery = threading.Thread(
                    target=self._deliver, name="orchestra-events", daemon=True
                )
                self._delivery.start()
        return sub

    def events(
        self,
        *,
        types: tuple[type[Any], ...] | None = None,
        job_id: int | None = None,
        maxlen: int = DEFAULT_MAXLEN,
    ) -> Subscription:
        """An async iterator over matching events: ``async for event in bus.events(): ...``."""
        sub = Subscription(self, types, maxlen, None, job_id)
        self._add(sub)
        return sub

    def _add(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = (*self._subs, sub)

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    def _deliver(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while self._closing is not me and not any(
                    s.queue for s in self._subs if s.callback is not None
                ):
                    self._cond.wait()
                subs = [s for s in self._subs if s.callback is not None and s.queue]
                if self._closing is me and not subs:
                    return
            for sub in subs:
                while sub.queue and not sub.closed:
                    event = sub.queue.popleft()
                    try:
                        sub.callback(event)  # type: ignore[misc]
                    except Exception:
                        self.callback_errors += 1
                        traceback.print_exc()

    def close(self, join: bool = True) -> threading.Thread | None:
        """Deliver what is queued, then stop the delivery thread (the pool's close path);
        returns that thread (joined with ``join``, unless called from it). Async iterators
        end once they have read what was published; later subscriptions work again (a new
        delivery thread starts)."""
        with self._cond:
            thread, self._delivery = self._delivery, None
            if thread is not None:
                self._closing = thread
            self._cond.notify_all()
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()
        for sub in self._subs:
            if sub.callback is None:
                sub.close()
        return thread
