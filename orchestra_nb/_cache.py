"""Cached and resumable maps (layer 3, on the public ``Pool`` API only).

``pool.map(f, xs, cache=True)``::

    items ──fingerprint──▶ keys ──store.get_many──▶ hits ─────────────────────┐
                                     │                                        ▼
                                     └─ misses ──pool.map(IndexedCall(f))──▶ CachedMapHandle
                                                     │ (completion order)     ▲
                                                     └──▶ recorder thread ────┘
                                                          store.put per item

Hits are read in the caller's thread and never reach a worker; the misses go through the
ordinary ``pool.map`` (all its options apply), unordered so that the recorder thread,
which iterates that map's handle, stores every result the moment it arrives: a map killed
half-way keeps what it finished, and rerunning it computes only the rest. The handle
returned, :class:`CachedMapHandle`, behaves like a ``MapHandle`` over all the items (hits
count as succeeded); ``await`` and ``result()`` return once the recorder has stored every
result, so a second identical map is all hits.

A store that fails (disk full, a read-only file system) degrades caching, never the map:
one ``RuntimeWarning`` names the store and the error, recording stops, and the results are
returned as usual.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import os
import queue
import threading
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _handles
from ._events import TasksCached
from ._fingerprint import FingerprintError, call_fingerprint, call_fingerprints, function_fingerprint
from ._indexed import IndexedCall, unwrap_unkeyed
from ._policy import parse_size
from ._state import TaskState
from ._store import ResultStore, StoreError, UnpicklableValueError, default_store_path

if TYPE_CHECKING:
    from ._api import Pool
    from ._handles import MapHandle

__all__ = [
    "CachedFunction",
    "CachedMapHandle",
    "CachedTaskHandle",
    "cached_map",
    "cached_run",
    "configure_store",
    "default_store",
    "resolve_store",
]

T = TypeVar("T")
_NOTHING: Any = object()  # "no value yet" in partial results

# --- which store --------------------------------------------------------------------------

_store_lock = threading.Lock()
_store_path: Path | None = None  # set by configure(store=...); None: default_store_path()
_stores: dict[Path, ResultStore] = {}
_size_cap: int | None = None  # configure(store_max_bytes=...)


def configure_store(options: dict[str, Any]) -> dict[str, Any] | None:
    """``orchestra.configure(store="path", store_max_bytes="10GB")``: apply the store's
    options; return the other (pool) options, or None if there were only store options."""
    if "store" in options:
        set_default_store(options["store"])
    if "store_max_bytes" in options:
        set_size_cap(options["store_max_bytes"])
    rest = {key: value for key, value in options.items() if key not in ("store", "store_max_bytes")}
    return None if options and not rest else rest


def set_default_store(path: str | os.PathLike[str] | None) -> None:
    """Use the store at ``path`` from now on (``None``: back to the default location)."""
    global _store_path
    with _store_lock:
        _store_path = None if path is None else Path(path).expanduser().resolve()


def set_size_cap(max_bytes: int | str | None) -> None:
    """After each cached map, evict the least recently used results above this size."""
    global _size_cap
    _size_cap = None if max_bytes is None else parse_size(max_bytes)


def default_store() -> ResultStore:
    """The store ``cache=True`` uses (opened on first use, then shared)."""
    with _store_lock:
        path = (_store_path or default_store_path()).expanduser().resolve()
        store = _stores.get(path)
        if store is None:
            store = _stores[path] = ResultStore(path)
        return store


def resolve_store(cache: bool | str | os.PathLike[str] | ResultStore) -> ResultStore:
    if isinstance(cache, ResultStore):
        return cache
    if cache is True:
        return default_store()
    if isinstance(cache, str | os.PathLike):
        path = Path(cache).expanduser().resolve()
        with _store_lock:
            store = _stores.get(path)
            if store is None:
                store = _stores[path] = ResultStore(path)
            return store
    raise TypeError(f"cache must be True, a path or a ResultStore, got {cache!r}")


def close_stores() -> None:
    """Close every store opened through :func:`default_store` / :func:`resolve_store`
    (after the writes queued for them)."""
    _writer.stop()
    with _store_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


# --- the cached map -----------------------------------------------------------------------


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


Call = tuple[tuple[Any, ...], dict[str, Any] | None]  # (args, kwargs) of one item


def call_keys(fn: Callable[..., Any], function_key: bytes, calls: list[Call]) -> list[bytes]:
    """Every call's key; an argument that cannot be fingerprinted raises, named with its item."""
    keys: list[bytes] = []
    try:
        keys.extend(call_fingerprints(function_key, calls))
    except FingerprintError as exc:
        raise FingerprintError(f"item {len(keys)} of {_name(fn)}: {exc}") from exc
    return keys


def cached_map(
    pool: Pool,
    fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...],
    *,
    cache: bool | str | os.PathLike[str] | ResultStore,
    checkpoint: str | None,
    **map_options: Any,
) -> CachedMapHandle[Any]:
    """``pool.map(fn, *iterables, cache=..., checkpoint=...)``: see the module docstring."""
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    if len(iterables) > 1:
        calls: list[Call] = [(item, None) for item in zip(*iterables, strict=False)]
    else:
        calls = [((item,), None) for item in iterables[0]]
    return _cached_calls(pool, fn, calls, cache=cache, checkpoint=checkpoint, **map_options)


def cached_run(
    pool: Pool, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
    cache: bool | str | os.PathLike[str] | ResultStore, **options: Any,
) -> CachedTaskHandle[Any]:
    """``pool.options(cache=True).run(fn, *args, **kwargs)``: a cached map of one call
    (the same key as the same call in a cached map)."""
    return CachedTaskHandle(_cached_calls(pool, fn, [(args, kwargs or None)], cache=cache, checkpoint=None,
                                          **options))


def _cached_calls(
    pool: Pool,
    fn: Callable[..., Any],
    calls: list[Call],
    *,
    cache: bool | str | os.PathLike[str] | ResultStore,
    checkpoint: str | None,
    ordered: bool = True,
    return_exceptions: bool = False,
    name: str | None = None,
    **map_options: Any,
) -> CachedMapHandle[Any]:
    if isinstance(fn, CachedFunction):
        if cache is False or cache is True:
            cache = fn.store if fn.store is not None else True
        fn = fn.fn
    if cache is False:
        cache = True  # a checkpoint is a cached map with a name
    if checkpoint is not None and not (isinstance(checkpoint, str) and checkpoint):
        raise ValueError(f"checkpoint must be a non-empty string, got {checkpoint!r}")
    store = resolve_store(cache)
    function_key = function_fingerprint(fn)
    keys = call_keys(fn, function_key, calls)
    label = name or _name(fn)
    try:
        if checkpoint is not None:
            store.record_run(checkpoint, function_key, label, keys)
        hits = store.get_many(list(dict.fromkeys(keys)), function_key)
    except StoreError as exc:
        warnings.warn(f"{exc}; the map runs without the cache", RuntimeWarning, stacklevel=4)
        hits = {}
    # Each missing key is computed once, however often it occurs in the input.
    miss_keys: dict[bytes, int] = {}
    miss_calls: list[tuple[int, tuple[Any, ...], dict[str, Any] | None]] = []
    for key, (args, kwargs) in zip(keys, calls, strict=True):
        if key not in hits and key not in miss_keys:
            miss_keys[key] = len(miss_calls)
            miss_calls.append((len(miss_calls), args, kwargs))
    with _handles.quietly():  # the notebook shows the whole map (hits too), not the misses' job
        misses: MapHandle[Any] = pool.map(IndexedCall(fn), miss_calls, ordered=False,
                                          return_exceptions=True, name=label, **map_options)
    misses._keep_results()  # the recorder streams them while the caller may await them all
    handle: CachedMapHandle[Any] = CachedMapHandle(
        store, function_key, label, keys, hits, list(miss_keys), misses,
        ordered=ordered, return_exceptions=return_exceptions)
    _handles.announce(handle)
    pool.publish(TasksCached(misses.job_id, handle.cached, len(keys)))
    return handle


class _Recorder:
    """Stores a cached map's computed results, each as soon as it arrives.

    With more than one item to compute, a thread of its own iterates the miss map's
    handle (in completion order) and ends with it: all done, cancelled, or the pool closed.
    A single call (every cached ``run``) is stored when it is done by the shared
    :data:`_writer` thread instead: a thread per call would cost more than the call.
    """

    def __init__(self, store: ResultStore, function_key: bytes, function_name: str,
                 miss_keys: list[bytes], misses: MapHandle[Any]) -> None:
        self.store = store
        self.recorded = 0
        self.error: BaseException | None = None
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._function = (function_key, function_name)
        self._miss_keys = miss_keys
        self._misses = misses
        self._unpicklable = 0
        if not miss_keys:
            self._finish()
        elif len(miss_keys) == 1:
            misses.on_done(lambda _: _writer.submit(self._store_all))
        else:
            threading.Thread(target=self._stream, name=f"orchestra-cache {function_name}",
                             daemon=True).start()

    def _stream(self) -> None:
        try:
            for result in self._misses:
                if not self._store(result):
                    break
        except BaseException:  # cancelled or the pool closed: the handle reports it
            pass
        finally:
            self._finish()

    def _store_all(self) -> None:
        try:
            for result in self._misses.partial_results(fill=_NOTHING):
                if not self._store(result):
                    break
        finally:
            self._finish()

    def _store(self, result: Any) -> bool:
        """Store one ``(index, value)``; False once the store fails (recording stops)."""
        if type(result) is not tuple:  # a failed task's exception, or not computed: not cached
            return True
        index, value = result
        try:
            self.store.put(self._miss_keys[index], *self._function, value)
        except UnpicklableValueError:  # returned, just not stored
            self._unpicklable += 1
            return True
        except StoreError as exc:
            self.error = exc
            warnings.warn(f"{exc}; results are no longer cached (the map goes on)",
                          RuntimeWarning, stacklevel=1)
            return False
        self.recorded += 1
        return True

    def _finish(self) -> None:
        cap = _size_cap
        if cap is not None and self.error is None and self._miss_keys:
            try:
                self.store.evict(max_bytes=cap)
            except StoreError as exc:
                warnings.warn(f"{exc} (evicting down to {cap} bytes)", RuntimeWarning, stacklevel=1)
        if self._unpicklable:
            warnings.warn(f"{self._unpicklable} result(s) of {self._function[1]} could not be pickled "
                          "and were not cached", RuntimeWarning, stacklevel=1)
        self.done.set_result(None)


class _Writer:
    """The thread that stores the results of single cached calls, in order.

    Started on first use; :func:`close_stores` (and interpreter exit) stops it after what
    is queued.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="orchestra-store-writer", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # the interpreter is exiting: write here, now
                    job()
                    return
                self._thread = thread
            self._queue.put(job)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except Exception:  # one failed write must not stop the others
                traceback.print_exc()

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)  # after everything queued so far
        if thread is not None and thread is not threading.current_thread():
            thread.join()


_writer = _Writer()
atexit.register(_writer.stop)


class CachedMapHandle(Generic[T]):
    """The handle of a cached map: a ``MapHandle`` over every item, hits included.

    ``await h`` / ``h.result(timeout)`` give all results in input order (completion order
    with ``ordered=False``: hits first), after every computed result has been stored;
    ``for``/``async for`` stream them; ``counts()`` counts hits as ``SUCCEEDED`` and
    ``total`` is the number of items. ``job_id``, ``events`` and ``cancel()`` are those of
    the job computing the misses (``h.misses``, a ``MapHandle``); ``h.cached`` is the
    number of items served by the store and ``h.recorded`` how many computed results have
    been stored so far.
    """

    def __init__(self, store: ResultStore, function_key: bytes, name: str, keys: list[bytes],
                 hits: dict[bytes, Any], miss_keys: list[bytes], misses: MapHandle[Any], *,
                 ordered: bool, return_exceptions: bool) -> None:
        self.store = store
        self.misses = misses
        self._name = name
        self._keys = keys
        self._hits = hits
        self._miss_of = {key: j for j, key in enumerate(miss_keys)}
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self.cached = sum(1 for key in keys if key in hits)
        self._recorder = _Recorder(store, function_key, name, miss_keys, misses)

    # --- inspection -----------------------------------------------------------------------

    @property
    def recorded(self) -> int:
        return self._recorder.recorded

    @property
    def store_error(self) -> BaseException | None:
        """Why results stopped being stored (e.g. a :class:`StoreFullError`), or None."""
        return self._recorder.error

    @property
    def job_id(self) -> int:
        return self.misses.job_id

    @property
    def name(self) -> str:
        return self._name

    @property
    def events(self) -> Any:
        return self.misses.events

    @property
    def total(self) -> int:
        return len(self._keys)

    @property
    def elapsed(self) -> float:
        return self.misses.elapsed

    def counts(self) -> dict[TaskState, int]:
        counts = self.misses.counts()
        counts[TaskState.SUCCEEDED] += self.cached
        # Items repeating a missing key are computed once and share that task's state.
        if len(self._keys) - self.cached > len(self._miss_of):
            partial = self.misses.partial_results(fill=_NOTHING)
            seen: set[bytes] = set()
            for key in self._keys:
                if key in self._hits:
                    continue
                if key in seen:
                    value = partial[self._miss_of[key]]
                    state = (TaskState.PENDING if value is _NOTHING else
                             TaskState.SUCCEEDED if type(value) is tuple else TaskState.FAILED)
                    counts[state] += 1
                seen.add(key)
        return counts

    def exceptions(self) -> dict[int, BaseException]:
        failed = self.misses.exceptions()
        return {i: failed[self._miss_of[key]] for i, key in enumerate(self._keys)
                if key not in self._hits and self._miss_of[key] in failed}

    def partial_results(self, fill: Any = None) -> list[Any]:
        partial = self.misses.partial_results(fill=_NOTHING)
        out = []
        for key in self._keys:
            if key in self._hits:
                out.append(self._hits[key])
                continue
            value = partial[self._miss_of[key]]
            if type(value) is tuple:
                out.append(value[1])
            elif value is _NOTHING or not self._return_exceptions:
                out.append(fill)
            else:
                out.append(value)
        return out

    def done(self) -> bool:
        return self.misses.done() and self._recorder.done.done()

    def cancelled(self) -> bool:
        return self.misses.cancelled()

    def finished(self) -> bool:
        return self.misses.finished()

    def on_done(self, fn: Callable[[Any], object]) -> None:
        """Call ``fn(handle)`` once every computed result is stored (see ``MapHandle.on_done``)."""
        self._recorder.done.add_done_callback(lambda _: fn(self))

    def cancel(self, kill: bool = False) -> bool:
        return self.misses.cancel(kill)

    def cancel_by(self, who: str, kill: bool = False) -> bool:
        return self.misses.cancel_by(who, kill)

    def wait_finished(self, timeout: float | None = None) -> bool:
        return self.misses.wait_finished(timeout)

    # --- results --------------------------------------------------------------------------

    def _assemble(self, completion: list[Any]) -> list[Any]:
        """All results from the miss map's (completion-order) results."""
        computed: dict[int, Any] = {}
        for value in completion:
            if type(value) is tuple:
                computed[value[0]] = value[1]
        failed = self.misses.exceptions()
        out: list[Any] = []
        first_error: BaseException | None = None
        for key in self._keys:
            if key in self._hits:
                out.append(self._hits[key])
                continue
            j = self._miss_of[key]
            if j in computed:
                out.append(computed[j])
            else:
                error = failed.get(j) or concurrent.futures.CancelledError(f"task {j} was cancelled")
                first_error = first_error or error
                out.append(error)
        if first_error is not None and not self._return_exceptions:
            raise first_error
        if not self._ordered:
            hits = [v for key, v in zip(self._keys, out, strict=True) if key in self._hits]
            order = [value[0] for value in completion if type(value) is tuple]
            by_miss = {j: computed[j] for j in order}
            return hits + [by_miss[j] for j in order] + [e for e in out if isinstance(e, BaseException)]
        return out

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> list[T]:
        completion = await self.misses
        await asyncio.wrap_future(self._recorder.done)
        return self._assemble(completion)

    def result(self, timeout: float | None = None) -> list[T]:
        completion = self.misses.result(timeout)
        self._recorder.done.result(timeout)
        return self._assemble(completion)

    def __iter__(self) -> Iterator[T]:
        stream = _Stream(self)
        yield from stream.ready()
        for value in self.misses:
            stream.add(value)
            yield from stream.ready()
        self._recorder.done.result()  # stored: a map started next finds them all
        yield from stream.rest()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[T]:
        stream = _Stream(self)
        for value in stream.ready():
            yield value
        async for result in self.misses:
            stream.add(result)
            for value in stream.ready():
                yield value
        await asyncio.wrap_future(self._recorder.done)
        for value in stream.rest():
            yield value

    def _ipython_display_(self) -> None:
        """As a cell's value: the map's live view (every item; the hits as "cached")."""
        hook = _handles.display_hook
        if hook is not None:
            hook(self)
        else:
            print(repr(self))

    def __repr__(self) -> str:
        done = self.counts()
        finished = done[TaskState.SUCCEEDED] + done[TaskState.FAILED] + done[TaskState.CANCELLED]
        status = "cancelled" if self.cancelled() else "done" if self.done() else "running"
        return (f"<CachedMapHandle job={self.job_id} {self._name!r} {status} {finished}/{self.total} "
                f"cached={self.cached} failed={done[TaskState.FAILED]}>")



class _Stream:
    """The items of a cached map in the order ``for`` yields them, as results arrive."""

    def __init__(self, handle: CachedMapHandle[Any]) -> None:
        self._handle = handle
        self._cursor = 0
        self._computed: dict[int, Any] = {}
        self._errors = 0
        self._hits_sent = False

    def add(self, result: Any) -> None:
        if type(result) is tuple:
            self._computed[result[0]] = result[1]
        else:
            self._errors += 1

    def ready(self) -> Iterator[Any]:
        h = self._handle
        if not h._ordered:
            if not self._hits_sent:
                self._hits_sent = True
                yield from (h._hits[key] for key in h._keys if key in h._hits)
            while self._computed:
                yield self._computed.pop(next(iter(self._computed)))
            return
        keys = h._keys
        while self._cursor < len(keys):
            key = keys[self._cursor]
            if key in h._hits:
                value = h._hits[key]
            else:
                j = h._miss_of[key]
                if j not in self._computed:
                    failed = h.misses.exceptions()
                    if j in failed:
                        self._cursor += 1
                        if h._return_exceptions:
                            yield failed[j]
                            continue
                        raise failed[j]
                    return
                value = self._computed[j]
            self._cursor += 1
            yield value

    def rest(self) -> Iterator[Any]:
        """After the miss map ended: what is left (failed or cancelled items)."""
        yield from self.ready()
        h = self._handle
        failed = h.misses.exceptions()
        if not h._ordered:
            for error in failed.values():
                if not h._return_exceptions:
                    raise error
                yield error
            return
        if self._cursor < len(h._keys):
            raise concurrent.futures.CancelledError(f"task {self._cursor} was cancelled")


class CachedTaskHandle(Generic[T]):
    """The handle of a cached ``run``: awaitable and waitable like a ``TaskHandle``;
    ``from_store`` says whether the value came from the store."""

    def __init__(self, handle: CachedMapHandle[Any]) -> None:
        self.map_handle = handle
        self.from_store = handle.cached == 1

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> T:
        return (await self.map_handle)[0]  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> T:
        return self.map_handle.result(timeout)[0]  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except Exception as exc:
            return exc
        return None

    def done(self) -> bool:
        return self.map_handle.done()

    def cancelled(self) -> bool:
        return self.map_handle.cancelled()

    def cancel(self, kill: bool = False) -> bool:
        return self.map_handle.cancel(kill)

    def on_done(self, fn: Callable[[Any], object]) -> None:
        self.map_handle.on_done(lambda _: fn(self))

    @property
    def state(self) -> TaskState:
        counts = self.map_handle.counts()
        return next((state for state, n in counts.items() if n), TaskState.PENDING)

    @property
    def job_id(self) -> int:
        return self.map_handle.job_id

    @property
    def name(self) -> str:
        return self.map_handle.name

    @property
    def events(self) -> Any:
        return self.map_handle.events

    @property
    def total(self) -> int:
        return 1

    def counts(self) -> dict[TaskState, int]:
        return self.map_handle.counts()

    def exceptions(self) -> dict[int, BaseException]:
        return self.map_handle.exceptions()

    def _ipython_display_(self) -> None:
        self.map_handle._ipython_display_()

    def __repr__(self) -> str:
        where = "from the store" if self.from_store else "computed"
        return f"<CachedTaskHandle {self.name!r} {where} {'done' if self.done() else 'running'}>"


# --- the decorator ------------------------------------------------------------------------


class CachedFunction:
    """``@orchestra.cached``: a function whose results are kept in the store.

    ``f(x)`` computes in this process (a hit returns at once); ``f.map(xs)`` and
    ``f.run(x)`` are cached ``map``/``run`` on a pool; ``f.clear()`` forgets ``f``'s
    results (those of its current fingerprint). ``orchestra.map(f, xs)`` is cached too.
    """

    def __init__(self, fn: Callable[..., Any], store: ResultStore | str | os.PathLike[str] | None,
                 pool: Callable[[], Pool]) -> None:
        if not callable(fn):
            raise TypeError(f"cached() needs a callable, got {fn!r}")
        self.fn = fn
        self.store = store
        self._pool = pool
        self.__wrapped__ = fn
        for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attribute):
                setattr(self, attribute, getattr(fn, attribute))

    def _store(self) -> ResultStore:
        return resolve_store(True if self.store is None else self.store)

    @property
    def fingerprint(self) -> bytes:
        """The function's fingerprint now (it changes when its code or what it uses does)."""
        return function_fingerprint(self.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        store = self._store()
        function_key = function_fingerprint(self.fn)
        key = call_fingerprint(function_key, args, kwargs)
        hit, value = store.get(key)
        if hit:
            return value
        args, keywords = unwrap_unkeyed(args, kwargs)
        value = self.fn(*args, **(keywords or {}))
        try:
            store.put(key, function_key, _name(self.fn), value)
        except StoreError as exc:
            warnings.warn(f"{exc}; the result is returned but not cached", RuntimeWarning, stacklevel=2)
        return value

    def map(self, *iterables: Iterable[Any], checkpoint: str | None = None,
            **options: Any) -> CachedMapHandle[Any]:
        return cached_map(self._pool(), self.fn, iterables, cache=True if self.store is None else self.store,
                          checkpoint=checkpoint, **options)

    def run(self, *args: Any, **kwargs: Any) -> CachedTaskHandle[Any]:
        return cached_run(self._pool(), self.fn, args, kwargs,
                          True if self.store is None else self.store)

    def clear(self) -> int:
        """Delete this function's stored results; returns how many."""
        return self._store().clear(function_fingerprint(self.fn))

    def __repr__(self) -> str:
        return f"<cached {_name(self.fn)}>"


def is_cached(fn: object) -> bool:
    return isinstance(fn, CachedFunction)

