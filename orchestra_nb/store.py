"""``orchestra.store``: the result store behind ``cache=True`` and ``checkpoint=``.

::

    orchestra.store.info()                 # entries, bytes, where it lives
    orchestra.store.runs()                 # named runs (checkpoint="sweep-1") and their progress
    orchestra.store.delete_run("sweep-1")  # forget a run (results=True: its results too)
    orchestra.store.clear(f)               # forget f's results; clear() forgets everything
    orchestra.store.evict(max_age=7 * 86400, max_bytes="10GB")

    @orchestra.cached                      # f(x) here, f.map(xs) / f.run(x) on the pool
    def f(x): ...

The store lives at ``$ORCHESTRA_STORE``, else ``$XDG_CACHE_HOME/orchestra_nb/store.sqlite``
(``~/.cache/...``); ``orchestra.configure(store="path")`` or ``%config Orchestra.store``
moves it. Format, safety guarantees and fingerprint rules: ``docs/store.md``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, overload

from . import _api, _cache
from ._cache import CachedFunction, CachedMapHandle, CachedTaskHandle
from ._fingerprint import FingerprintError, function_fingerprint
from ._indexed import Unkeyed
from ._policy import parse_size
from ._store import (
    ResultStore,
    RunInfo,
    StoreError,
    StoreFullError,
    StoreInfo,
    StoreVersionError,
    UnpicklableValueError,
)

__all__ = [
    "CachedFunction",
    "CachedMapHandle",
    "CachedTaskHandle",
    "FingerprintError",
    "ResultStore",
    "RunInfo",
    "StoreError",
    "StoreFullError",
    "StoreInfo",
    "StoreVersionError",
    "Unkeyed",
    "UnpicklableValueError",
    "cached",
    "clear",
    "close_all",
    "current",
    "delete_run",
    "evict",
    "info",
    "open_store",
    "report",
    "run_results",
    "runs",
    "unkeyed",
    "use",
]

StoreLike = ResultStore | str | os.PathLike[str]


def current() -> ResultStore:
    """The store ``cache=True`` uses now."""
    return _cache.default_store()


def use(path: str | os.PathLike[str] | None) -> None:
    """Make ``path`` the store of ``cache=True`` (``None``: the default location); the
    same as ``orchestra.configure(store=path)``, without touching the default pool."""
    _cache.set_default_store(path)


def open_store(path: str | os.PathLike[str]) -> ResultStore:
    """The store at ``path`` (shared with every other use of that path in this process)."""
    return _cache.resolve_store(path)


def unkeyed(value: Any) -> Unkeyed:
    """Pass ``value`` to the function but leave it out of the cache key:
    ``orchestra.map(f, xs, [unkeyed(logger)] * len(xs), cache=True)``, or an argument that
    cannot be fingerprinted and does not change the result."""
    return Unkeyed(value)


def close_all() -> None:
    """Close every store this process opened (each opens again on its next use)."""
    _cache.close_stores()


def report(store: StoreLike | None = None) -> str:
    """What ``%orchestra store`` prints: location, size, and the named runs."""
    target = _resolve(store)
    about = target.info()
    lines = [f"result store {about.path}",
             f"  {about.entries} result(s) of {about.functions} function(s), {_size(about.bytes)} "
             f"({about.files} in files), database {_size(about.database_bytes)}"]
    found = target.runs()
    if found:
        lines.append("  named runs (checkpoint=):")
        lines.extend(f"    {run.name!r}: {run.function}, {run.done}/{run.total} done" for run in found)
    return "\n".join(lines)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _resolve(store: StoreLike | None) -> ResultStore:
    return current() if store is None else _cache.resolve_store(store)


def info(store: StoreLike | None = None) -> StoreInfo:
    """Entries, bytes, files and runs of the store."""
    return _resolve(store).info()


def runs(store: StoreLike | None = None) -> list[RunInfo]:
    """The named runs (``checkpoint="..."``), most recently started first, each with how
    many of its items have a stored result; rerun the same cell to resume one."""
    return _resolve(store).runs()


def run_results(name: str, *, fill: Any = None, store: StoreLike | None = None) -> list[Any]:
    """The stored results of run ``name`` by item index, ``fill`` where an item has none
    yet: a run can be inspected from any kernel, without its function or inputs."""
    target = _resolve(store)
    keys = target.run_keys(name)
    if not keys and name not in {run.name for run in target.runs()}:
        raise KeyError(f"no run named {name!r} in the result store at {target.path}")
    found = target.get_many(list(dict.fromkeys(keys)))
    return [found.get(key, fill) for key in keys]


def delete_run(name: str, *, results: bool = False, store: StoreLike | None = None) -> bool:
    """Forget the run ``name`` (its stored results too with ``results=True``)."""
    return _resolve(store).delete_run(name, results=results)


def clear(fn: Callable[..., Any] | None = None, *, store: StoreLike | None = None) -> int:
    """Delete ``fn``'s stored results (those of its current code), or with no ``fn``
    everything in the store; returns the number of entries deleted."""
    if fn is None:
        return _resolve(store).clear()
    target = fn.fn if isinstance(fn, CachedFunction) else fn
    return _resolve(store).clear(function_fingerprint(target))


def evict(*, max_age: float | None = None, max_bytes: int | str | None = None,
          store: StoreLike | None = None) -> int:
    """Delete entries unused for ``max_age`` seconds, then the least recently used until
    the results take at most ``max_bytes`` (an int or ``"10GB"``); returns how many."""
    limit = None if max_bytes is None else parse_size(max_bytes)
    return _resolve(store).evict(max_age=max_age, max_bytes=limit)


@overload
def cached(fn: Callable[..., Any], /) -> CachedFunction: ...
@overload
def cached(*, store: StoreLike | None = None,
           pool: _api.Pool | None = None) -> Callable[[Callable[..., Any]], CachedFunction]: ...


def cached(fn: Callable[..., Any] | None = None, /, *, store: StoreLike | None = None,
           pool: _api.Pool | None = None) -> Any:
    """``@orchestra.cached`` or ``@orchestra.cached(store=..., pool=...)``: see
    :class:`CachedFunction`. ``f.map``/``f.run`` use ``pool`` (default: the default pool)."""

    def wrap(target: Callable[..., Any]) -> CachedFunction:
        return CachedFunction(target, store, _api.default_pool if pool is None else (lambda: pool))

    return wrap if fn is None else wrap(fn)
