"""Callbacks (layer 3): ``on_success=``, ``on_error=`` and their per-item forms.

User callbacks run on one thread (``orchestra-callbacks``, started on first use), one at a
time, each exactly once, in the ``contextvars`` context of the call that registered them (so
that what they print goes to the notebook cell that started the work). They never run on
the pools' I/O thread. A callback that raises is reported with a :class:`CallbackWarning`
and changes nothing else. :func:`close` runs what is queued and stops the thread (the
driver's ``close`` calls it; it is also run at exit); the thread starts again on next use.

A handle is watched through its public ``on_done``; a map's items through its job's
``TaskStateChanged`` events (as wake-ups) and its public ``partial_results()`` and
``exceptions()``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextvars
import threading
import warnings
from collections.abc import Callable
from typing import Any

from ._events import TaskStateChanged
from ._handles import MapHandle
from ._state import TaskState

__all__ = ["CallbackWarning", "Callbacks", "attach_callbacks", "close", "wait_callbacks"]


class CallbackWarning(RuntimeWarning):
    """A callback (``on_success=``, ``on_error=``...) raised; the work it watched is unaffected.
    ``exception`` is what it raised."""

    def __init__(self, message: str, exception: BaseException) -> None:
        super().__init__(message)
        self.exception = exception


class _CallbackThread:
    """Runs callbacks one at a time on one thread (started on first use), each in the
    ``contextvars`` context it was registered in; reports the ones that raise."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[contextvars.Context, Callable[..., object], tuple[Any, ...],
                                             str]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._busy = False
        # Handles whose callbacks are queued when they settle: a handle wakes its waiters
        # before it runs its done-callbacks, so wait_idle() also waits for the done ones.
        self._watched: dict[int, Any] = {}
        self.errors = 0  # callbacks that raised, since the start of the process

    def when_done(self, handle: Any, fn: Callable[..., object], args: tuple[Any, ...], what: str) -> None:
        """Queue ``fn(*args)`` (in an empty context) once ``handle`` is done."""
        key = id(handle)
        with self._cond:
            self._watched[key] = handle

        def queue(_: Any) -> None:
            with self._cond:
                self._watched.pop(key, None)
            self.submit(_EMPTY_CONTEXT, fn, args, what)

        handle.on_done(queue)

    def submit(self, context: contextvars.Context, fn: Callable[..., object], args: tuple[Any, ...],
               what: str) -> None:
        with self._cond:
            self._queue.append((context, fn, args, what))
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def in_thread(self) -> bool:
        return self._thread is threading.current_thread()

    def _main(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()  # wait_idle()
                while not self._queue and self._thread is me:
                    self._cond.wait()
                # Closed (no owner): run what is queued, then stop. Replaced by a newer
                # thread (a submit right after close()): stop now, it takes the queue.
                if self._thread is not me and (not self._queue or self._thread is not None):
                    return
                context, fn, args, what = self._queue.popleft()
                self._busy = True
            try:
                context.run(fn, *args)
            except Exception as exc:
                self.errors += 1
                context.run(_report, what, exc)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until the callbacks of every finished handle have run; False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and not self._busy
                and not any(h.done() for h in self._watched.values()), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


def _report(what: str, exc: BaseException) -> None:
    warnings.warn(CallbackWarning(f"{what} raised {type(exc).__name__}: {exc}", exc), stacklevel=1)


_callbacks = _CallbackThread("orchestra-callbacks")
def close(timeout: float = 10.0) -> None:
    """Run the callbacks already queued, then stop the callback thread."""
    _callbacks.close(timeout)


atexit.register(close, 3.0)


def submit(callbacks: Callbacks | None, fn_name: str, *args: Any) -> None:
    """Queue ``callbacks.on_success``/``on_error`` (by ``fn_name``) with ``args``, if set."""
    if callbacks is not None:
        callbacks.call(getattr(callbacks, fn_name), fn_name, *args)


def wait_callbacks(timeout: float | None = None) -> bool:
    """Block until the callbacks (``on_success=``...) of all work finished so far have run;
    False on timeout. For scripts and tests that read what their callbacks recorded."""
    return _callbacks.wait_idle(timeout)


def callback_thread_name() -> str:
    return _callbacks._name


class Callbacks:
    """``on_success(value)`` / ``on_error(exception)`` for one piece of work, bound to the
    ``contextvars`` context of the caller that registered them."""

    __slots__ = ("_context", "on_error", "on_success", "what")

    def __init__(self, on_success: Callable[..., object] | None, on_error: Callable[..., object] | None,
                 what: str) -> None:
        for label, fn in (("on_success", on_success), ("on_error", on_error)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{label} must be callable, got {fn!r}")
        self.on_success = on_success
        self.on_error = on_error
        self.what = what
        self._context = contextvars.copy_context()

    @classmethod
    def of(cls, on_success: Callable[..., object] | None, on_error: Callable[..., object] | None,
           what: str) -> Callbacks | None:
        return None if on_success is None and on_error is None else cls(on_success, on_error, what)

    def call(self, fn: Callable[..., object] | None, label: str, *args: Any) -> None:
        if fn is not None:
            _callbacks.submit(self._context, fn, args, f"{label} of {self.what}")

    def settle(self, handle: Any) -> None:
        """Call ``on_success``/``on_error`` for a finished handle (nothing if cancelled)."""
        if handle.cancelled():
            return
        try:
            value = handle.result(0)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            return
        except BaseException as exc:
            self.call(self.on_error, "on_error", exc)
            return
        self.call(self.on_success, "on_success", value)


# --- per-item callbacks of a map ------------------------------------------------------------


_MISSING = object()


class _ItemWatcher:
    """Calls ``on_item_success(index, value)`` / ``on_item_error(index, exception)`` once per
    finished item of a map, then the job's callbacks. Woken by the job's events; each
    wake-up scans the handle's public ``partial_results()`` and ``exceptions()`` on the
    callback thread (scans are coalesced: at most one waits at a time)."""

    def __init__(self, handle: MapHandle[Any], items: Callbacks, job: Callbacks | None) -> None:
        handle._keep_results()  # each scan reads partial_results(): a stream must drop none
        self._handle = handle
        self._items = items
        self._job = job
        self._reported = bytearray()
        self._lock = threading.Lock()
        self._queued = False
        self._finished = False
        self._sub = handle.events.subscribe(self._on_event, types=(TaskStateChanged,), job_id=handle.job_id)
        self._queue_scan()  # items that finished before the subscription
        _callbacks.when_done(handle, self._finish, (), f"callbacks of {handle.name}")

    def _on_event(self, event: Any) -> None:
        if event.state in (TaskState.SUCCEEDED, TaskState.FAILED):
            self._queue_scan()

    def _queue_scan(self) -> None:
        with self._lock:
            if self._queued:
                return
            self._queued = True
        _callbacks.submit(_EMPTY_CONTEXT, self._scan, (), f"item callbacks of {self._handle.name}")

    def _scan(self) -> None:
        with self._lock:
            self._queued = False
        if not self._finished:
            self._report_new()

    def _report_new(self) -> None:
        items, handle, reported = self._items, self._handle, self._reported
        errors = handle.exceptions()
        values = handle.partial_results(fill=_MISSING)
        if len(reported) < len(values):
            reported.extend(bytes(len(values) - len(reported)))
        for index, value in enumerate(values):
            if reported[index]:
                continue
            if index in errors:
                reported[index] = 1
                items.call(items.on_error, "on_item_error", index, errors[index])
            elif value is not _MISSING:
                reported[index] = 1
                items.call(items.on_success, "on_item_success", index, value)

    def _finish(self) -> None:
        self._report_new()
        self._finished = True
        self._sub.close()
        if self._job is not None:
            self._job.settle(self._handle)


_EMPTY_CONTEXT = contextvars.Context()  # for internal steps; user callbacks carry their own


def attach_callbacks(handle: Any, job: Callbacks | None, items: Callbacks | None = None) -> None:
    """Register a handle's callbacks (``items`` only for a map's handle)."""
    if items is not None and isinstance(handle, MapHandle):
        _ItemWatcher(handle, items, job)
    elif job is not None:
        _callbacks.when_done(handle, job.settle, (handle,), f"callbacks of {job.what}")


def close_service(timeout: float = 3.0) -> None:
    """``orchestra.shutdown()``: stop this module's thread (it starts again on next use)."""
    close(timeout)
