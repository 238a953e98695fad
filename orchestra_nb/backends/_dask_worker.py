"""What runs inside the Dask workers for :mod:`orchestra_nb.backends.dask` (layer 2).

Workers import this module by name (orchestra_nb must be installed on them, in the same
version; the backend checks that at connect). Three parts:

* :func:`run_chunk`, the one dask task function: it runs consecutive items of one job and
  returns their values and errors as one pickled ``bytes`` (dask never walks orchestra's
  data: arguments arrive as bytes orchestra pickled, results leave as bytes);
* :class:`Runtime`, one per worker process, installed by :class:`RuntimePlugin`: which
  thread runs which item (for interrupts and output tagging), a per-thread stdout/stderr
  router, the loaded functions (by digest), and one watcher thread that flushes task output
  every ``FLUSH_INTERVAL`` through ``Worker.log_event`` and enforces per-task deadlines;
* :class:`ReplayPlugin`: ``run_on_all(replay=True)``'s call, run on workers that join later.

Stopping a running task: :meth:`Runtime.interrupt` raises :class:`Interrupted` in the
executing thread with ``PyThreadState_SetAsyncExc``. It is an ``Exception`` on purpose: a
``BaseException`` such as ``KeyboardInterrupt`` escaping a dask task kills the worker, and
the scheduler would then run the task again elsewhere. Code that never returns to the
interpreter (a long C call, ``time.sleep(600)``) is not reached by it; the client then
restarts that worker through its nanny after a grace period.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import inspect
import io
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from distributed import WorkerPlugin, get_worker

from .._exceptions import TaskTimeoutError
from .._serialize import ErrorRecord, blame_results, capture_exception, dumps_result

__all__ = [
    "CancelInterrupt",
    "Interrupted",
    "ReplayPlugin",
    "Runtime",
    "RuntimePlugin",
    "TimeoutInterrupt",
    "cancel",
    "run_chunk",
    "still_running",
]

FLUSH_INTERVAL = 0.02  # seconds between output flushes (and deadline checks)
FUNCTION_CACHE = 64  # loaded callables kept per worker process
CANCELLED_MEMORY = 4096  # cancelled (topic, job) pairs remembered per worker
PLUGIN_NAME = "orchestra-nb-runtime"

_CANCELLED = ErrorRecord(None, "CancelledError", "cancelled", "", "cancelled")


class Interrupted(Exception):
    """Raised asynchronously in a task's thread to stop it."""


class CancelInterrupt(Interrupted):
    """The task's job (or the task) was cancelled."""


class TimeoutInterrupt(Interrupted):
    """The task ran past its ``timeout``."""


# Two handles on one C function (``pythonapi[name]`` makes a new one each time): one passes
# an exception type, the other NULL, which clears an exception set but not raised yet.
_set_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
_set_async_exc.restype = ctypes.c_int
_clear_async_exc = ctypes.pythonapi["PyThreadState_SetAsyncExc"]
_clear_async_exc.argtypes = (ctypes.c_ulong, ctypes.c_void_p)
_clear_async_exc.restype = ctypes.c_int


def _raise_in(thread_id: int, exc_type: type[BaseException]) -> None:
    _set_async_exc(thread_id, exc_type)


def _clear_in(thread_id: int) -> None:
    _clear_async_exc(thread_id, None)


class _Running:
    __slots__ = ("deadline", "index", "interrupted", "job", "topic")

    def __init__(self, topic: str, job: int, index: int, deadline: float | None) -> None:
        self.topic = topic
        self.job = job
        self.index = index
        self.deadline = deadline
        self.interrupted = False  # at most one asynchronous exception per registration


class _Router(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker process: text written by a thread that runs
    an orchestra task is buffered, tagged with that task; anything else goes through."""

    def __init__(self, runtime: Runtime, stream: str, fallback: Any) -> None:
        self._runtime = runtime
        self._stream = stream
        self.fallback = fallback

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        running = self._runtime.running.get(threading.get_ident())
        if running is None:
            return int(self.fallback.write(text))
        self._runtime.output.append((running.topic, running.job, running.index, self._stream, text))
        return len(text)

    def flush(self) -> None:
        self.fallback.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return str(getattr(self.fallback, "encoding", "utf-8"))


class Runtime:
    """Orchestra's state in one worker process (see the module docstring)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.address: str = worker.address
        self.lock = threading.Lock()
        self.running: dict[int, _Running] = {}  # thread id -> the item it runs
        self.output: list[tuple[str, int, int, str, str]] = []
        self.cancelled: collections.OrderedDict[tuple[str, int], set[int] | None] = collections.OrderedDict()
        self.functions: collections.OrderedDict[bytes, Callable[..., Any]] = collections.OrderedDict()
        self._stop = threading.Event()
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = _Router(self, "stdout", sys.stdout)
        sys.stderr = _Router(self, "stderr", sys.stderr)
        self._thread = threading.Thread(target=self._watch, name="orchestra-dask-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()
        if isinstance(sys.stdout, _Router) and sys.stdout._runtime is self:
            sys.stdout = self._streams[0]
        if isinstance(sys.stderr, _Router) and sys.stderr._runtime is self:
            sys.stderr = self._streams[1]

    # --- events to the client -----------------------------------------------------------

    def log(self, topic: str, msg: dict[str, Any]) -> None:
        self.worker.log_event(topic, msg)

    def flush(self) -> None:
        """Send buffered task output, one event per topic, consecutive writes joined."""
        with self.lock:
            if not self.output:
                return
            out, self.output = self.output, []
        by_topic: dict[str, list[list[Any]]] = {}
        for topic, job, index, stream, text in out:
            entries = by_topic.setdefault(topic, [])
            last = entries[-1] if entries else None
            if last is not None and last[0] == job and last[1] == index and last[2] == stream:
                last[3] += text
            else:
                entries.append([job, index, stream, text])
        for topic, entries in by_topic.items():
            self.log(topic, {"k": "out", "w": self.address, "o": entries})

    def _watch(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            try:
                self.flush()
                self._check_deadlines()
            except Exception:  # never let the watcher die: output and deadlines need it
                traceback.print_exc(file=self._streams[1])

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self.lock:
            for thread_id, running in self.running.items():
                if running.deadline is not None and now > running.deadline and not running.interrupted:
                    running.interrupted = True
                    _raise_in(thread_id, TimeoutInterrupt)

    # --- running items --------------------------------------------------------------------

    def begin(self, topic: str, job: int, index: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.running[threading.get_ident()] = _Running(topic, job, index, deadline)

    def end(self) -> None:
        thread_id = threading.get_ident()
        while True:
            try:
                with self.lock:
                    running = self.running.pop(thread_id, None)
                if running is not None and running.interrupted:
                    _clear_in(thread_id)  # sent, maybe not raised yet: the item is over
                return
            except Interrupted:
                continue  # it arrived here, after the item's own code: nothing to stop

    def is_cancelled(self, topic: str, job: int, index: int) -> bool:
        if not self.cancelled:
            return False
        found = self.cancelled.get((topic, job), ())
        return found is None or (bool(found) and index in found)

    def interrupt(self, topic: str, job: int, index: int | None) -> int:
        """Cancel a job (``index`` None) or one of its items here: remember it, so that its
        items not started yet are skipped, and interrupt the threads running it."""
        key = (topic, job)
        with self.lock:
            if index is None:
                self.cancelled[key] = None
            else:
                items = self.cancelled.setdefault(key, set())
                if items is not None:
                    items.add(index)
            while len(self.cancelled) > CANCELLED_MEMORY:
                self.cancelled.popitem(last=False)
            hit = 0
            for thread_id, running in self.running.items():
                if (
                    running.topic == topic
                    and running.job == job
                    and not running.interrupted
                    and (index is None or running.index == index)
                ):
                    running.interrupted = True
                    _raise_in(thread_id, CancelInterrupt)
                    hit += 1
        return hit

    def still_running(self, topic: str, job: int, index: int | None) -> list[int]:
        with self.lock:
            return [
                r.index
                for r in self.running.values()
                if r.topic == topic and r.job == job and (index is None or r.index == index)
            ]

    def function(self, digest: bytes, payload: bytes) -> Callable[..., Any]:
        fn = self.functions.get(digest)
        if fn is not None:
            self.functions.move_to_end(digest)
            return fn
        fn = pickle.loads(payload)
        if inspect.iscoroutinefunction(fn):
            fn = _sync_wrapper(fn)
        self.functions[digest] = fn
        while len(self.functions) > FUNCTION_CACHE:
            self.functions.popitem(last=False)
        return fn


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime(worker: Any = None) -> Runtime:
    """This worker's runtime (made here if the plugin has not run yet)."""
    global _runtime
    rt = _runtime
    if rt is None:
        with _runtime_lock:
            if _runtime is None:
                _runtime = Runtime(worker if worker is not None else get_worker())
            rt = _runtime
    return rt


class RuntimePlugin(WorkerPlugin):
    """Installs the :class:`Runtime` on every worker, present and future. Idempotent: a
    second orchestra client on the same cluster keeps the first one's runtime."""

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker: Any) -> None:
        runtime(worker)

    def teardown(self, worker: Any) -> None:
        global _runtime
        with _runtime_lock:
            rt, _runtime = _runtime, None
        if rt is not None:
            rt.close()


_thread_loops = threading.local()


def _sync_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run_coroutine(*args: Any, **kwargs: Any) -> Any:
        loop = getattr(_thread_loops, "loop", None)
        if loop is None:
            loop = _thread_loops.loop = asyncio.new_event_loop()
        return loop.run_until_complete(fn(*args, **kwargs))

    return run_coroutine


# --- the task function ------------------------------------------------------------------------


def run_chunk(spec: tuple[Any, ...], fn_payload: bytes, items_payload: bytes) -> tuple[float, bytes]:
    """Run items ``start..`` of job ``job`` here; returns the wall-clock time it ended (the
    client orders results that arrive together by it) and ``dumps_result((values, errors,
    elapsed))``, ``errors`` mapping an offset to an :class:`ErrorRecord` (or None)."""
    topic, job, start, count, digest, star, call, timeout = spec
    t0 = time.perf_counter()
    rt = runtime()
    rt.log(topic, {"k": "run", "j": job, "s": start, "w": rt.address})
    errors: dict[int, ErrorRecord] = {}
    values: list[Any] = []
    try:
        fn = rt.function(digest, fn_payload)
    except BaseException as exc:
        record = capture_exception(exc, "serialization")
        record = record._replace(evalue=f"cannot load the function in the worker: {record.evalue}")
        return _result([], dict.fromkeys(range(count), record), t0, start)
    try:
        items = pickle.loads(items_payload)
    except BaseException as exc:
        record = capture_exception(exc, "arguments")
        record = record._replace(evalue=f"cannot unpickle the arguments in the worker: {record.evalue}")
        return _result([], dict.fromkeys(range(count), record), t0, start)
    append = values.append
    clock = time.perf_counter
    for offset, item in enumerate(items):
        index = start + offset
        if rt.is_cancelled(topic, job, index):
            errors[offset] = _CANCELLED
            append(None)
            continue
        started = clock()  # each item is timed: its failure says how long it ran
        try:
            rt.begin(topic, job, index, timeout)
            if call:
                args, kwargs = item
                append(fn(*args, **kwargs))
            elif star:
                append(fn(*item))
            else:
                append(fn(item))
        except TimeoutInterrupt as exc:
            err = TaskTimeoutError(f"task {index} exceeded its timeout of {timeout} s and was interrupted")
            err.__cause__ = exc
            errors[offset] = capture_exception(err, "timeout")._replace(duration=clock() - started)
            _align(values, offset)
        except CancelInterrupt:
            errors[offset] = _CANCELLED
            _align(values, offset)
        except BaseException as exc:
            ran = clock() - started
            errors[offset] = capture_exception(exc, "error", skip_frames=1)._replace(duration=ran)
            _align(values, offset)
        finally:
            rt.end()
    rt.flush()  # the output of this chunk arrives before its result
    return _result(values, errors, t0, start)


def _align(values: list[Any], offset: int) -> None:
    # The value of item ``offset`` may or may not have been appended when it was interrupted.
    del values[offset:]
    values.append(None)


def _result(values: list[Any], errors: dict[int, ErrorRecord], t0: float, start: int) -> tuple[float, bytes]:
    body = (values, errors or None, time.perf_counter() - t0)
    try:
        return time.time(), dumps_result(body)
    except Exception:
        pass
    blame_results(values, errors, start)
    return time.time(), dumps_result((values, errors or None, time.perf_counter() - t0))


# --- called through Client.run (on the worker's event loop) -------------------------------------


def cancel(topic: str, job: int, index: int | None = None) -> int:
    """Interrupt the threads running ``job`` (or its item ``index``); how many were hit."""
    return runtime().interrupt(topic, job, index)


def still_running(topic: str, job: int, index: int | None = None) -> list[int]:
    """The items of ``job`` (or just ``index``) still running on this worker."""
    return runtime().still_running(topic, job, index)


def identity(dask_worker: Any) -> tuple[int, str]:
    """This worker's pid and its ``Worker.id`` (unique per worker process)."""
    import os

    return os.getpid(), str(dask_worker.id)


class ReplayPlugin(WorkerPlugin):
    """``run_on_all(replay=True)``: run the call on every worker that starts later (those
    in ``skip``, by ``Worker.id``, had it as a task), before the worker takes work."""

    def __init__(
        self, name: str, topic: str, digest: bytes, fn_payload: bytes, item: Any, skip: frozenset[str]
    ) -> None:
        self.name = name
        self.topic = topic
        self.digest = digest
        self.fn_payload = fn_payload
        self.item = item
        self.skip = skip

    async def setup(self, worker: Any) -> None:
        if worker.id in self.skip:
            return
        # In a thread: a long set-up (imports) must not stall the worker's event loop.
        await asyncio.to_thread(self._run, worker)

    def _run(self, worker: Any) -> None:
        try:
            fn = runtime(worker).function(self.digest, self.fn_payload)
            args, kwargs = self.item
            fn(*args, **kwargs)
        except Exception as exc:
            text = "".join(traceback.format_exception(exc))
            print(f"orchestra_nb: the replayed set-up call {self.name} failed:\n{text}", file=sys.__stderr__)
            worker.log_event(self.topic, {"k": "replay", "w": worker.address, "error": text})
        else:
            worker.log_event(self.topic, {"k": "replay", "w": worker.address, "error": None})
