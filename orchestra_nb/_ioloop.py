"""The one I/O thread (layer 2): a private asyncio loop that owns every pool's sockets,
process table and task table.

Why a thread and not the caller's loop: a notebook kernel's loop stops while a synchronous
cell runs, and ``result()`` must work from plain scripts without ``nest_asyncio``
(docs/design.md, "Why an I/O thread").

The engine lock: the I/O thread holds :attr:`IOThread.engine` at all times except while it
waits for events. Another thread that takes the lock (:meth:`IOThread.run_now`) therefore
finds the engine idle and may drive it itself: a coroutine awaiting a ``run()`` sends the
call and reads the result on its own thread, with no hand-over to the I/O thread and back.
Each hand-over costs a wake-up, which is most of a round trip on a small machine
(``benchmarks/README.md``). Work that nobody drives this way is handed over with
``call_soon_threadsafe`` and done by the I/O thread, as before.

Workers are spawned from this thread, which lives as long as some pool uses it: PDEATHSIG
fires when the *thread* that forked a child exits (docs/design.md), so the thread stops only
once the last pool closed (``release_io_thread``), and the next pool starts a new one.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import selectors
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, TypeVarTuple, Unpack

__all__ = ["IOThread", "acquire_io_thread", "release_io_thread"]

T = TypeVar("T")
_Ts = TypeVarTuple("_Ts")

HOT_INTERVAL = 0.005  # s between hot ticks: the most a stuck caller loop delays its work
HOT_WINDOW = 0.05  # s a loop stays hot after the engine was last borrowed
TIMER_SLACK = 0.001  # s a busy poll may delay the I/O thread's timers (not its events)


class _EngineSelector(selectors.EpollSelector):
    """Releases the engine lock while the I/O thread waits for events.

    A thread that holds the engine for a while (a busy poll) calls :meth:`wants_engine`
    and lets go when it is true: at once when the wait ended with events (a worker's exit,
    a cancel, a message), and within ``TIMER_SLACK`` when only a timer is due, so that the
    hot ticks (every 5 ms) do not interrupt every poll they meet.
    """

    def __init__(self, engine: threading.RLock) -> None:
        super().__init__()
        self._engine = engine
        self.engine_wanted = False  # from the end of a wait until the lock is back
        self._events = False  # ... and that wait ended with events, not a timeout
        self._wanted_at = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._engine.release()
        ready: list[tuple[selectors.SelectorKey, int]] = []
        try:
            ready = super().select(timeout)
            return ready
        finally:
            self._events = bool(ready)
            self._wanted_at = time.perf_counter()
            self.engine_wanted = True
            self._engine.acquire()
            self.engine_wanted = False

    def wants_engine(self) -> bool:
        return self.engine_wanted and (
            self._events or time.perf_counter() - self._wanted_at >= TIMER_SLACK
        )


class EngineLoop(asyncio.SelectorEventLoop):
    """The I/O thread's loop; other threads may use it while they hold the engine lock.

    A callback or timer scheduled by such a thread is noted, and the I/O thread is woken
    once when the thread lets go of the engine, so that it recomputes its next deadline.
    :meth:`defer` runs a callback at the end of the borrowing thread's turn instead.

    *Hot* mode: for a while after other threads used the engine (and for as long as a
    check is registered), the loop runs its checks every ``HOT_INTERVAL``. Work that a
    caller loop left for itself to do later (a call it will send when it next gets to run,
    a result it will read) is then picked up here within a few milliseconds even if that
    loop is stuck in a long synchronous cell, and the caller need not wake this thread
    for every call.
    """

    def __init__(self) -> None:
        self.engine = threading.RLock()
        self.engine_selector = _EngineSelector(self.engine)
        super().__init__(self.engine_selector)
        self.owner: int | None = None  # the I/O thread's ident, once it runs
        self._borrower: int | None = None
        self._wake_owner = False
        self._deferred: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self.hot = False  # a hot tick is scheduled; changed only by the engine's holder
        self.hot_until = 0.0
        self._hot_checks: list[Callable[[], object]] = []
        self._permanent_checks = 0

    def call_soon(self, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        handle = super().call_soon(callback, *args, context=context)
        self._note_foreign()
        return handle

    def call_at(self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: *_Ts,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        handle = super().call_at(when, callback, *args, context=context)
        self._note_foreign()
        return handle

    def _note_foreign(self) -> None:
        ident = threading.get_ident()
        if ident == self.owner:
            return
        if ident == self._borrower:
            self._wake_owner = True
        else:  # not holding the engine: behave like call_soon_threadsafe
            self.call_soon_threadsafe(_nothing)

    def defer(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback`` after the current callback, on the thread driving the engine."""
        if threading.get_ident() == self._borrower and self._deferred is not None:
            self._deferred.append((callback, args))
        else:
            self.call_soon(callback, *args)

    def borrow(self) -> bool:
        """Take the engine for the calling thread (blocking); False if it already has it."""
        ident = threading.get_ident()
        if ident == self.owner or ident == self._borrower:
            return False
        self.engine.acquire()
        self._borrower = ident
        self._deferred = []
        self.keep_hot()
        return True

    # --- hot mode -------------------------------------------------------------------

    def keep_hot(self) -> None:
        """Run the hot checks every HOT_INTERVAL for at least HOT_WINDOW from now."""
        self.hot_until = time.monotonic() + HOT_WINDOW
        if not self.hot:
            self.hot = True
            self.call_later(HOT_INTERVAL, self._hot_tick)

    def add_hot_check(self, check: Callable[[], object], *, permanent: bool = False) -> None:
        """Run ``check`` at every hot tick; a non-permanent check also keeps the loop hot."""
        self._hot_checks.append(check)
        if permanent:
            self._permanent_checks += 1
        else:
            self.keep_hot()

    def remove_hot_check(self, check: Callable[[], object]) -> None:
        with contextlib.suppress(ValueError):
            self._hot_checks.remove(check)

    def _hot_tick(self) -> None:
        for check in list(self._hot_checks):
            try:
                check()
            except Exception as exc:
                self.call_exception_handler(
                    {"message": f"orchestra: error in {check!r}", "exception": exc}
                )
        if len(self._hot_checks) > self._permanent_checks or time.monotonic() < self.hot_until:
            self.call_later(HOT_INTERVAL, self._hot_tick)
            return
        self.hot = False
        for check in list(self._hot_checks):  # anything queued while deciding: done now
            check()

    def give_back(self) -> None:
        """Run the deferred callbacks, wake the I/O thread if it has new work, let go.

        Callbacks deferred while these run go to the I/O thread: a borrower does a bounded
        share of the work, never the whole backlog of a busy pool.
        """
        deferred, self._deferred = self._deferred, None
        try:
            for callback, args in deferred or ():
                try:
                    callback(*args)
                except Exception as exc:
                    self.call_exception_handler(
                        {"message": f"orchestra: error in {callback!r}", "exception": exc}
                    )
        finally:
            self._borrower = None
            if self._wake_owner:
                self._wake_owner = False
                self.call_soon_threadsafe(_nothing)
            self.engine.release()


class IOThread:
    def __init__(self) -> None:
        self.loop = EngineLoop()
        self.loop.set_debug(False)  # debug mode would reject the engine's borrowers
        self._ready = threading.Event()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._inbox_scheduled = False
        self.loop.add_hot_check(self._check_inbox, permanent=True)
        self.thread = threading.Thread(target=self._main, name="orchestra-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.engine.acquire()
        self.loop.owner = threading.get_ident()
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.owner = None
            self.loop.engine.release()

    def _stop_loop(self) -> None:
        self._run_inbox()  # calls handed over before the stop still run
        self.loop.stop()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop and, from another thread, wait for the thread to end."""
        with contextlib.suppress(RuntimeError):  # closed already
            self.loop.call_soon_threadsafe(self._stop_loop)
        if not self.in_thread():
            self.thread.join(timeout)
            if not self.thread.is_alive() and not self.loop.is_closed():
                self.loop.close()

    def in_thread(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` soon, in call order, with the engine held (from any thread).

        Calls are batched: a burst of 20,000 submissions wakes the loop once, not 20,000
        times (each wake-up is a syscall that also hands the GIL over). From a thread
        running an asyncio loop while the I/O loop is hot, nothing is woken: the calls run
        when that loop awaits a handle (:meth:`flush`), or at the next hot tick.
        """
        self._inbox.append((fn, args))
        if self._inbox_scheduled:  # a drain is on its way, and runs this call too
            return
        engine = self.loop
        caller = asyncio._get_running_loop()
        if engine.hot and caller is not None and caller is not engine:
            # Left to the hot ticks, with no flag: a tick may drain the inbox right now,
            # and a flag set after it would stop every later call from waking the loop.
            engine.hot_until = time.monotonic() + HOT_WINDOW
            return
        self._inbox_scheduled = True  # cleared by that drain, first thing
        engine.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Clear the flag first: a call appended from now on schedules another drain.
        self._inbox_scheduled = False
        self._run_inbox()

    def _run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception as exc:  # one failing call must not strand the ones after it
                self.loop.call_exception_handler(
                    {"message": f"orchestra: error in {fn!r}", "exception": exc}
                )

    def run_now(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the calling thread, holding the engine.

        The pending :meth:`call` calls run first, so the order of calls is kept. Blocks while
        the I/O thread is busy (its callbacks are short); never from inside ``fn``.
        """
        loop = self.loop
        if not loop.borrow():
            return fn(*args)
        try:
            if self._inbox:
                self._drain_inbox()
            return fn(*args)
        finally:
            loop.give_back()

    def flush(self) -> None:
        """Run the pending :meth:`call` calls now, on the calling thread."""
        if self._inbox:
            self.run_now(_nothing)

    def _check_inbox(self) -> None:
        if self._inbox:
            self._drain_inbox()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.in_thread():
            coro.close()
            raise RuntimeError("orchestra: a blocking call from the I/O thread would deadlock")
        return self.submit(coro).result(timeout)

    def on_exit(self, closer: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Register a coroutine factory run at interpreter exit (pools close their workers)."""
        self._closers.append(closer)

    def forget(self, closer: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with contextlib.suppress(ValueError):
            self._closers.remove(closer)

    def _close_all(self) -> None:
        closers, self._closers = self._closers, []
        if not closers or not self.thread.is_alive():
            return

        async def close_all() -> None:
            await asyncio.gather(*(c() for c in closers), return_exceptions=True)

        # At exit, best effort: PDEATHSIG and the stdin watchdog finish the job.
        with contextlib.suppress(Exception):
            self.submit(close_all()).result(timeout=10)


def _nothing() -> None:
    pass


_lock = threading.Lock()
_instance: IOThread | None = None
_users = 0


def acquire_io_thread() -> IOThread:
    """The process's I/O thread, started if no pool uses one; pair with
    :func:`release_io_thread`. All open pools share one thread."""
    global _instance, _users
    with _lock:
        if _instance is None:
            _instance = IOThread()
        _users += 1
        return _instance


def release_io_thread(io: IOThread) -> bool:
    """One user less; the last one stops the thread (joined unless called from it) and
    gets True."""
    global _instance, _users
    with _lock:
        _users -= 1
        if _users > 0 or _instance is not io:
            return False
        _instance = None
    io.stop()
    return True


@atexit.register
def _close_at_exit() -> None:
    io = _instance
    if io is not None:
        io._close_all()
