"""The one I/O thread (layer 2): a private asyncio loop that owns every pool's sockets,
process table and task table.

Why a thread and not the caller's loop: a notebook kernel's loop stops while a synchronous
cell runs, and ``result()`` must work from plain scripts without ``nest_asyncio``
(``jupyter-runtime.md`` section 6). Work is handed over with ``call_soon_threadsafe``;
results come back through ``concurrent.futures.Future``.

Workers are spawned from this thread, which lives as long as the process: PDEATHSIG fires
when the *thread* that forked a child exits (``jupyter-runtime.md`` section 5).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["IOThread", "io_thread"]

T = TypeVar("T")


class IOThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._closers: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._inbox: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._inbox_scheduled = False
        self.thread = threading.Thread(target=self._main, name="orchestra-io", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def in_thread(self) -> bool:
        return threading.get_ident() == self.thread.ident

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` soon on the I/O thread (from any thread), in call order.

        Calls are batched: a burst of 20,000 submissions wakes the loop once, not 20,000
        times (each wake-up is a syscall that also hands the GIL over).
        """
        self._inbox.append((fn, args))
        if not self._inbox_scheduled:
            self._inbox_scheduled = True
            self.loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Clear the flag first: a call appended from now on schedules another drain.
        self._inbox_scheduled = False
        inbox = self._inbox
        while inbox:
            fn, args = inbox.popleft()
            try:
                fn(*args)
            except Exception as exc:  # one failing call must not strand the ones after it
                self.loop.call_exception_handler(
                    {"message": f"orchestra: error in {fn!r}", "exception": exc}
                )

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


_lock = threading.Lock()
_instance: IOThread | None = None


def io_thread() -> IOThread:
    """The process's I/O thread, started on first use."""
    global _instance
    if _instance is None:
        with _lock:
            if _instance is None:
                _instance = IOThread()
                atexit.register(_instance._close_all)
    return _instance
