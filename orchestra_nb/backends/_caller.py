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
import collections
import contextlib
import functools
import select
import selectors
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from .. import _protocol as proto
from .._spin import BusyPoll, yield_cpu
from .._state import PoolState

if TYPE_CHECKING:
    from .._ioloop import EngineLoop, IOThread
    from .._pool import PoolCore
    from .._pool_wire import Wire
    from .._pool_workers import PoolStatus

__all__ = ["CallerDrain", "ResultReaders", "ThreadDrain", "busy_poll"]

# Where the thread of a turning asyncio loop is: asleep in its selector (the default ones),
# or between callbacks (see ResultReaders._a_caller_loop_is_waking).
_TURNING_CODES = frozenset(
    [
        *(
            cls.select.__code__
            for name in ("EpollSelector", "PollSelector", "DevpollSelector", "KqueueSelector", "SelectSelector")
            if (cls := getattr(selectors, name, None)) is not None
        ),
        asyncio.BaseEventLoop._run_once.__code__,  # type: ignore[attr-defined]
    ]
)

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
    readers = core.readers
    window = readers.poll.window
    until = time.perf_counter() + (window if limit is None else min(window, limit))
    selector = io.loop.engine_selector
    first = True
    # Each pass ends with a hit, a miss (past ``until``), or the I/O thread wanting in.
    while io.run_now(readers.busy_poll, done, until, first) and not done():
        first = False
        while selector.engine_wanted and time.perf_counter() < until:
            yield_cpu()  # until the I/O thread has the engine; then wait for it



class ResultReaders:
    """Who reads the pool's data socket (the engine's side of the fast path, under the
    engine): the I/O thread, or the loops and threads attached to it (:class:`CallerDrain`,
    :class:`ThreadDrain`), and the busy polls of callers that expect a result within
    microseconds (``poll``, shared by all callers of the pool)."""

    def __init__(self, loop: EngineLoop, wire: Wire, pool: PoolStatus, busy_poll: float,
                 drain: Callable[[zmq.Socket[Any]], None]) -> None:
        self.loop = loop
        self.wire = wire
        self.pool = pool
        self._drain = drain  # reads and handles what a socket holds (PoolCore._drain)
        self.poll = BusyPoll(busy_poll)  # shared by callers, under the engine
        self.attached = 0  # loops reading the data socket themselves (under the engine)
        self.threads: collections.Counter[int] = collections.Counter()  # ... their threads
        self._unread_seen = False
        self.io_reads = True  # the I/O thread watches the data socket (no loop reads it)
        self.take_backs = 0  # times the I/O thread took the socket back from stopped loops
        self._data_poll = select.poll()

    def busy_poll(self, done: Callable[[], bool], until: float, first: bool) -> bool:
        """Poll the data socket until ``until`` (a ``time.perf_counter`` deadline), reading
        what arrives, until ``done()``: for a caller that expects its result within
        microseconds and would otherwise sleep for it (see ``_spin``). Runs under the
        engine. ``first``: a new wait (the back-off may skip it), not the resumption of
        one. Returns True if it stopped early because the I/O thread needs the engine (a
        worker exited, a cancel or a timer is due): the caller lets go, then resumes."""
        poll = self.poll
        if self.pool.state != PoolState.RUNNING or (first and not poll.start()):
            return False
        sock = self.wire.data
        has_input = functools.partial(proto.has_input, sock)
        wants_engine = self.loop.engine_selector.wants_engine
        while not done():
            got = poll.poll(has_input, until, wants_engine)
            if got is None:
                return True
            if not got:
                return False
            self._drain(sock)
        return False

    def attach(self) -> None:
        """A loop awaiting a ``run()`` reads the data socket itself from now on (under the
        engine; see :class:`CallerDrain`): this thread stops watching it, rather than
        race that loop for each result and hand it over. It only checks, at each hot tick,
        for results left unread; if a result waits through a whole tick, that loop is not
        turning (stopped, or stuck in synchronous code), and this thread takes the socket
        back (``take_backs`` counts it) until a loop awaits again (:meth:`reclaim`). Runs on
        the loop's thread."""
        self.attached += 1
        self.threads[threading.get_ident()] += 1
        self.reclaim()

    def reclaim(self) -> None:
        """An attached loop awaits again: leave the socket to the loops once more."""
        if self.io_reads and self.pool.state in (PoolState.RUNNING, PoolState.CLOSING):
            self.io_reads = False
            self.loop.remove_reader(self.wire.data_fd)
            self._unread_seen = False
            self._data_poll.register(self.wire.data_fd, select.POLLIN)
            self.loop.add_hot_check(self._check_unread)

    def detach(self) -> None:
        """The loop of this thread lets go of the socket."""
        self.attached -= 1
        ident = threading.get_ident()
        self.threads[ident] -= 1
        if self.threads[ident] <= 0:
            del self.threads[ident]
        if not self.attached:
            self._read_here()

    def _read_here(self) -> None:
        if self.io_reads:
            return
        self.io_reads = True
        self.loop.remove_hot_check(self._check_unread)
        with contextlib.suppress(KeyError, ValueError):
            self._data_poll.unregister(self.wire.data_fd)
        if self.pool.state in (PoolState.RUNNING, PoolState.CLOSING):
            self.loop.add_reader(self.wire.data_fd, self._drain, self.wire.data)
            self._drain(self.wire.data)

    def _check_unread(self) -> None:
        # The FD stays readable until someone reads the socket.
        unread = bool(self._data_poll.poll(0))
        if unread and self._unread_seen and not self._a_caller_loop_is_waking():
            self.take_backs += 1
            self._read_here()
            unread = False
        self._unread_seen = unread

    def _a_caller_loop_is_waking(self) -> bool:
        """Whether an attached loop's thread is turning: asleep in its selector (which the
        unread socket wakes), between callbacks, or taking or handing back the engine (to
        read). That loop reads the socket however long it then waits for a CPU (under load,
        longer than a tick). A loop in synchronous code, or stopped, is elsewhere."""
        frames = sys._current_frames()
        turning = _TURNING_CODES | {type(self.loop).borrow.__code__, type(self.loop).give_back.__code__}
        for ident in self.threads:
            frame = frames.get(ident)
            if frame is not None and frame.f_code in turning:
                return True
        return False

    def close(self) -> None:
        self.loop.remove_hot_check(self._check_unread)


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
            drain._take_backs = core.readers.take_backs
            io.run_now(core.readers.attach)
        elif drain._take_backs != core.readers.take_backs:  # the I/O thread took the socket back
            drain._take_backs = core.readers.take_backs
            io.run_now(core.readers.reclaim)
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
            self._io.run_now(self._core.readers.detach)
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
        self._take_backs = core.readers.take_backs
        self._attached = True
        self._sleep = THREAD_WAIT
        io.run_now(core.readers.attach)

    def wait(self, done: Callable[[], bool]) -> bool:
        """Read results on this thread until ``done()`` or for a short while; False if the
        pool no longer runs (then the caller waits for the I/O thread instead)."""
        core, io = self._core, self._io
        if not self._attached or core.state != PoolState.RUNNING:
            return False
        if self._take_backs != core.readers.take_backs:  # the I/O thread took the socket back
            self._take_backs = core.readers.take_backs
            io.run_now(core.readers.reclaim)
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
            self._io.run_now(self._core.readers.detach)
