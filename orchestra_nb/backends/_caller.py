"""The awaiting caller's fast path of the local pool (layer 2).

A short call's result comes back in about a hundred microseconds, and on a small machine
most of a round trip is thread wake-ups. So instead of waiting for the I/O thread to read
the result and hand it over, the caller's own thread takes the engine (``_ioloop``) and
reads it: a blocking ``result()`` busy-polls the data socket for up to the pool's
``busy_poll`` window (:func:`busy_poll`), and a loop awaiting a ``run()`` watches the socket
itself while anything on it awaits (:class:`CallerDrain`); a thread that serves work of its
own (a joblib call's callbacks) does the same while it is attached (:class:`ThreadDrain`).
"""

from __future__ import annotations

import asyncio
import select
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._spin import yield_cpu
from .._state import PoolState

if TYPE_CHECKING:
    from .._ioloop import IOThread
    from .._pool import PoolCore

__all__ = ["CallerDrain", "ThreadDrain", "busy_poll"]

# An awaiting coroutine polls for its result for at most this long (or the pool's busy_poll
# if shorter): its loop runs nothing else meanwhile.
LOOP_POLL_LIMIT = 0.002
# A loop lets go of the socket this long after its last await ended (back-to-back awaits,
# the common case in a cell, keep it).
IDLE_DETACH = 0.1


def busy_poll(io: IOThread, core: PoolCore, done: Callable[[], bool], limit: float | None = None) -> None:
    """Send what this thread queued, then read results on it until ``done()``, for up to
    the pool's ``busy_poll`` window (or ``limit`` s). Whenever the I/O thread needs the
    engine (a worker exited, a cancel, a timer), it gets it before the polling goes on."""
    window = core.caller_poll.window
    until = time.perf_counter() + (window if limit is None else min(window, limit))
    selector = io.loop.engine_selector
    first = True
    # Each pass ends with a hit, a miss (past ``until``), or the I/O thread wanting in.
    while io.run_now(core.busy_poll_results, done, until, first) and not done():
        first = False
        while selector.engine_wanted and time.perf_counter() < until:
            yield_cpu()  # until the I/O thread has the engine; then wait for it


_drains: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, CallerDrain]] = (
    weakref.WeakKeyDictionary()
)


class CallerDrain:
    """While a coroutine on ``loop`` awaits a ``run()``, that loop reads the results itself.

    The loop watches the pool's data socket; when a result arrives it takes the engine and
    reads it on its own thread, so the awaiting coroutine resumes without a hand-over from
    the I/O thread. It lets go ``IDLE_DETACH`` s after the last await on it ended, so
    back-to-back awaits keep it; the I/O thread's hot checks cover a loop that stops
    turning meanwhile (it takes the socket back).
    """

    def __init__(self, io: IOThread, core: PoolCore, loop: asyncio.AbstractEventLoop) -> None:
        self._io = io
        self._core = core
        self._loop = loop
        self._fd = core.wire.data_fd
        self._users = 0
        self._attached = False
        self._detach_scheduled = False
        self._take_backs = 0

    @classmethod
    def acquire(
        cls, io: IOThread, core: PoolCore, loop: asyncio.AbstractEventLoop, *, flush: bool = True
    ) -> CallerDrain | None:
        if core.wire.data_fd < 0:
            return None
        drains = _drains.setdefault(loop, {})
        drain = drains.get(id(core))
        if drain is None or drain._core is not core:
            drain = drains[id(core)] = cls(io, core, loop)
        if not drain._attached:
            try:
                loop.add_reader(drain._fd, drain._on_readable)
            except (NotImplementedError, ValueError, OSError):
                return None  # a loop without add_reader (Windows proactor): the I/O thread reads
            drain._attached = True
            drain._take_backs = core.take_backs
            io.run_now(core.attach_caller)
        elif drain._take_backs != core.take_backs:  # the I/O thread took the socket back
            drain._take_backs = core.take_backs
            io.run_now(core.reclaim)
        elif flush:
            io.flush()
        drain._users += 1
        return drain

    def _on_readable(self) -> None:
        self._io.run_now(self._core.drain_results)

    def busy_poll(self, done: Callable[[], bool]) -> None:
        """Send the calls queued on this thread, then read results on it for a moment
        before the loop goes to sleep (one engine borrow for both)."""
        busy_poll(self._io, self._core, done, LOOP_POLL_LIMIT)

    def release(self) -> None:
        self._users -= 1
        if not self._users and not self._detach_scheduled:
            self._detach_scheduled = True
            self._loop.call_later(IDLE_DETACH, self._detach)

    def _detach(self) -> None:
        self._detach_scheduled = False
        if self._users or not self._attached:
            return
        self._attached = False
        self._loop.remove_reader(self._fd)
        if self._core.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._io.run_now(self._core.detach_caller)
        drains = _drains.get(self._loop)
        if drains is not None and drains.get(id(self._core)) is self:
            del drains[id(self._core)]

    def forget(self) -> None:
        """The pool closed: stop watching its socket (on the loop's thread)."""
        if self._attached:
            self._attached = False
            self._loop.remove_reader(self._fd)


# A thread attached with ThreadDrain sleeps on the socket at most this long at a time: the
# socket's notifications are edge-triggered and a send on it (by any thread) can swallow
# one, so a sleep is cut short by this; the bound doubles while nothing comes, up to
# THREAD_WAIT_MAX (a long task costs no more than that many wake-ups a second).
THREAD_WAIT = 0.001
THREAD_WAIT_MAX = 0.032


class ThreadDrain:
    """While a thread waits for the results of work it drives (a joblib call whose batches
    its callbacks dispatch), that thread reads the pool's data socket itself: it sleeps on
    the socket, then takes the engine and reads, with no hand-over from the I/O thread.

    Like :class:`CallerDrain`: the I/O thread stops reading the socket while a thread or a
    loop is attached, and takes it back if a result waits unread through a whole hot tick
    (the thread is busy elsewhere); the next :meth:`wait` hands it back. :meth:`close`
    detaches (once; from the thread that attached).
    """

    def __init__(self, io: IOThread, core: PoolCore) -> None:
        self._io = io
        self._core = core
        self._poll = select.poll()
        self._poll.register(core.wire.data_fd, select.POLLIN)
        self._take_backs = core.take_backs
        self._attached = True
        self._sleep = THREAD_WAIT
        io.run_now(core.attach_caller)

    def wait(self, done: Callable[[], bool]) -> bool:
        """Read results on this thread until ``done()`` or for a short while; False if the
        pool no longer runs (then the caller waits for the I/O thread instead)."""
        core, io = self._core, self._io
        if not self._attached or core.state != PoolState.RUNNING:
            return False
        if self._take_backs != core.take_backs:  # the I/O thread took the socket back
            self._take_backs = core.take_backs
            io.run_now(core.reclaim)
        if self._sleep == THREAD_WAIT:  # right after a result: the next may be microseconds away
            busy_poll(io, core, done)  # (sends what this thread queued, reads what is there)
            if done():
                return True
        self._poll.poll(max(1, round(self._sleep * 1000)))
        io.run_now(core.drain_results)
        self._sleep = THREAD_WAIT if done() else min(2 * self._sleep, THREAD_WAIT_MAX)
        return True

    def close(self) -> None:
        if not self._attached:
            return
        self._attached = False
        if self._core.state in (PoolState.RUNNING, PoolState.CLOSING):
            self._io.run_now(self._core.detach_caller)
