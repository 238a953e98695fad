"""What crosses the process boundary, and the errors when it cannot (layer 0).

Callables and data go through cloudpickle, so functions, lambdas, closures and classes
defined in notebook cells (``__main__``) travel by value. A callable is pickled once per
job and cached in each worker by the digest of its bytes.

When something cannot be pickled, :class:`SerializationError` names the culprit: the
function itself, the global or closure variable it references (found by walking its code
objects), the argument's position, or a task's result.
"""

from __future__ import annotations

import functools
import hashlib
import io
import linecache
import marshal
import os
import pickle
import secrets
import sys
import traceback
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ._exceptions import RemoteError, RemoteTraceback, ResultTooLargeError, SerializationError
from ._protocol import SHM_THRESHOLD

__all__ = [
    "ErrorRecord",
    "ResultLimitExceeded",
    "blame_results",
    "callable_name",
    "capture_exception",
    "describe_unpicklable_argument",
    "dumps",
    "dumps_callable",
    "dumps_callable_shared",
    "dumps_result",
    "dumps_with_source",
    "rebuild_exception",
]


def dumps(obj: object, protocol: int = 5, buffer_callback: Any = None) -> bytes:
    if _plain_call(obj):
        # [((1, 2.0, "x"), {})]: atoms cannot reference __main__, so plain pickle is exact,
        # and it skips cloudpickle's Pickler set-up (most of the cost for small calls).
        return pickle.dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
    data: bytes = _cloudpickle().dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
    return data


def dumps_result(
    obj: object, protocol: int = 5, buffer_callback: Any = None, limit: int | None = None
) -> bytes:
    """:func:`dumps` for what a *worker* sends back: plain pickle when it is exact, which it
    is for nearly every result, else cloudpickle (whose Pickler set-up is most of the cost of
    pickling a small result).

    In a worker, plain pickle is exact for whatever it can pickle at all. It pickles classes
    and functions by reference only after looking them up by module and qualified name and
    finding the very same object; the worker's ``__main__`` is orchestra's worker module, not
    the notebook's, so the cell-defined classes and lambdas that cloudpickle rebuilt in the
    worker (still named ``__main__.X``) fail that check, and plain pickle raises. Two more
    cases go to cloudpickle: a stream that names ``__main__`` at all (an object of the
    worker's own ``__main__`` would be looked up in the parent's), and any module registered
    with ``cloudpickle.register_pickle_by_value``. When plain pickle fails, the object's
    reducers run a second time, under cloudpickle, whose error is the one raised.

    ``buffer_callback`` sees only the pass whose stream is returned: the first pass collects
    the out-of-band buffers itself, and a result that has any is pickled again for the caller.
    (That pass copies no buffer data, so a second one costs a walk of the object.)

    ``limit``: raise :class:`ResultLimitExceeded` as soon as the stream and the out-of-band
    buffers together pass this many bytes, so that an oversized result costs the worker
    about ``limit`` bytes of pickle, not its whole size.
    """
    if limit is not None:
        return _dump_limited(obj, protocol, buffer_callback, limit)
    if not _pickled_by_value():
        found: list[pickle.PickleBuffer] = []
        try:
            data = pickle.dumps(
                obj, protocol=protocol, buffer_callback=found.append if buffer_callback else None
            )
        except Exception:
            pass
        else:
            if data.find(b"__main__") < 0:  # (find: ``in`` first tries the needle as an int)
                if found:
                    return pickle.dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
                return data
    out: bytes = _cloudpickle().dumps(obj, protocol=protocol, buffer_callback=buffer_callback)
    return out


class ResultLimitExceeded(Exception):  # a signal to the caller, not an error
    """A result's pickle passed its limit; pickling stopped there (``size`` bytes so far)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the pickled result passed {limit:,} bytes (stopped at {size:,})")
        self.size = size
        self.limit = limit


class _LimitedFile:
    """The file a Pickler writes to: keeps the stream (or only counts it, ``keep=False``)
    and raises :class:`ResultLimitExceeded` once it and the out-of-band buffers counted by
    :meth:`add` pass ``limit``. The C pickler writes a frame at a time (64 KiB) and hands a
    large bytes object over whole, uncopied, so the check comes before the memory is spent."""

    __slots__ = ("keep", "limit", "names_main", "parts", "size")

    def __init__(self, limit: int, keep: bool = True) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.keep = keep
        self.names_main = False

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.add(n)  # before any copy: past the limit, nothing more is spent
        if type(data) is not bytes:
            data = bytes(data)  # (a bytearray or a view, at most ``limit`` bytes)
        if not self.names_main and data.find(b"__main__") >= 0:
            self.names_main = True
        if self.keep:
            self.parts.append(data)
        return n

    def add(self, n: int) -> None:
        self.size += n
        if self.size > self.limit:
            raise ResultLimitExceeded(self.size, self.limit)

    def counting(self, callback: Any) -> Any:
        """``callback`` (a pickler's ``buffer_callback``), counting what goes out of band."""

        def on_buffer(buf: pickle.PickleBuffer) -> Any:
            in_band = callback(buf)
            if not in_band:
                self.add(memoryview(buf).nbytes)
            return in_band

        return on_buffer

    def getvalue(self) -> bytes:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


def _dump_limited(obj: object, protocol: int, buffer_callback: Any, limit: int, keep: bool = True) -> bytes:
    """:func:`dumps_result` (same choice of pickler) into a :class:`_LimitedFile`."""
    if not _pickled_by_value():
        found: list[pickle.PickleBuffer] = []
        file = _LimitedFile(limit, keep)
        try:
            pickle.Pickler(
                file, protocol, buffer_callback=file.counting(found.append) if buffer_callback else None
            ).dump(obj)
        except ResultLimitExceeded:
            raise
        except Exception:
            pass
        else:
            if not file.names_main:
                if found:
                    file = _LimitedFile(limit, keep)
                    callback = file.counting(buffer_callback)
                    pickle.Pickler(file, protocol, buffer_callback=callback).dump(obj)
                return file.getvalue()
    file = _LimitedFile(limit, keep)
    callback = file.counting(buffer_callback) if buffer_callback else None
    _cloudpickle().Pickler(file, protocol=protocol, buffer_callback=callback).dump(obj)
    return file.getvalue()


def _out_of_band(buf: pickle.PickleBuffer) -> bool:
    return False  # a buffer_callback that keeps every buffer out of the stream (uncopied)


def _cloudpickle() -> Any:
    """cloudpickle, imported on first use: a worker needs it only for what plain pickle
    cannot do (loading a function pickled by value imports it by itself), and it is a good
    part of a worker's start-up imports."""
    import cloudpickle

    return cloudpickle


_UNKNOWN_REGISTRY = frozenset({"(unknown: always use cloudpickle)"})


def _pickled_by_value() -> Any:
    """The modules whose objects cloudpickle pickles by value (its private registry, filled
    by ``cloudpickle.register_pickle_by_value``; if cloudpickle renames it, everything goes
    through cloudpickle). Empty while cloudpickle is not imported: nothing registered."""
    module = sys.modules.get("cloudpickle.cloudpickle")
    if module is None:
        return ()
    return getattr(module, "_PICKLE_BY_VALUE_MODULES", _UNKNOWN_REGISTRY)

_ATOMS = frozenset({int, float, str, bytes, bool, type(None)})


def _plain_call(obj: object) -> bool:
    """``[(args, kwargs)]`` of one ``run`` call whose arguments are all atoms."""
    if type(obj) is not list or len(obj) != 1:
        return False
    item = obj[0]
    if type(item) is not tuple or len(item) != 2:
        return False
    args, kwargs = item
    return (
        type(args) is tuple
        and type(kwargs) is dict
        and all(type(a) in _ATOMS for a in args)
        and all(type(v) in _ATOMS for v in kwargs.values())
    )


def callable_name(fn: object) -> str:
    """What error messages and job names call ``fn``: its qualified name, else its type."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def dumps_callable(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """Pickle ``fn`` for shipping; returns ``(payload, digest)``.

    Raises :class:`SerializationError` naming the unpicklable part, or explaining why a
    ``__main__`` callable pickled *by reference* could not be loaded by a worker.
    """
    payload, digest, _ = _dumps_callable(fn, False)
    return payload, digest


def dumps_callable_shared(fn: Callable[..., Any]) -> tuple[bytes, bytes, tuple[pickle.PickleBuffer, ...]]:
    """:func:`dumps_callable`, leaving the large buffers ``fn`` captures (numpy arrays of
    at least ``SHM_THRESHOLD`` bytes) out of the stream, uncopied: ``(payload, digest,
    buffers)``, for a backend that places them once per job (``_shared``). A payload with
    such buffers gets a digest of its own (the stream plus a random token): the stream
    alone does not say what the buffers held, and hashing them would cost more than
    placing them."""
    return _dumps_callable(fn, True)


def _dumps_callable(
    fn: Callable[..., Any], out_of_band: bool
) -> tuple[bytes, bytes, tuple[pickle.PickleBuffer, ...]]:
    key = _cache_key(fn)
    if key is not None:
        hit = _callable_cache.get(key)
        if hit is not None and hit[0]() is fn:
            return hit[1], hit[2], ()
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}: {fn!r}")
    _reject_by_reference(fn)
    large: list[pickle.PickleBuffer] = []

    def keep_large_out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < SHM_THRESHOLD:
            return True
        large.append(buf)
        return False

    try:
        payload = dumps_with_source(fn, keep_large_out_of_band if out_of_band else None)
    except Exception as exc:
        raise SerializationError(_explain_callable_failure(fn, exc)) from exc
    if large:
        digest = hashlib.blake2b(payload + secrets.token_bytes(16), digest_size=16).digest()
        return payload, digest, tuple(large)  # (not cached: such captures are never frozen)
    digest = hashlib.blake2b(payload, digest_size=16).digest()
    if key is not None:
        if len(_callable_cache) >= 256:
            _callable_cache.pop(next(iter(_callable_cache)))
        _callable_cache[key] = (weakref.ref(fn), payload, digest)
    return payload, digest, ()


# --- source lines travel with the code ----------------------------------------------------
#
# A worker formats a task's traceback itself, reading source lines through ``linecache``.
# A function defined in a notebook cell has no file the worker could read: its code names a
# file that only the kernel's linecache knows (ipykernel's ``/tmp/ipykernel_*/<hash>.py``).
# Worse, cloudpickle 3.1.3 renames the file of every code object it ships to
# ``<dynamic-code>``. So code objects are pickled here with ``marshal`` (exact, file name
# included; workers run the kernel's own interpreter) together with the lines of their file
# when that file does not exist on disk, and loading them registers those lines in the
# worker's linecache under the original name. The same mechanism works whatever cloudpickle
# does with code objects, since it never sees them.


@functools.cache
def _source_pickler() -> Any:
    """cloudpickle's Pickler, with code objects marshalled and their source attached."""

    class SourcePickler(_cloudpickle().Pickler):  # type: ignore[misc]
        def reducer_override(self, obj: object) -> Any:
            if type(obj) is types.CodeType:
                return _rebuild_code, (marshal.dumps(obj), _source_to_ship(obj.co_filename))
            return super().reducer_override(obj)

    return SourcePickler


def _source_to_ship(filename: str) -> list[str] | None:
    """The lines of ``filename`` if a worker could not read them itself (a cell)."""
    if not filename or os.path.isfile(filename):
        return None
    entry = linecache.cache.get(filename)
    if entry is None or len(entry) != 4:
        return None
    lines: list[str] = entry[2]  # the cache's own list: pickled once per payload (memo)
    return lines or None


def _rebuild_code(data: bytes, lines: list[str] | None) -> types.CodeType:
    """In the worker: the code object, its source registered in ``linecache``."""
    code = marshal.loads(data)
    if not isinstance(code, types.CodeType):
        raise TypeError(f"expected marshalled code, got {type(code).__name__}")
    if lines:
        filename = code.co_filename
        entry = linecache.cache.get(filename)
        if entry is None or len(entry) != 4 or entry[2] != lines:
            # mtime None: linecache.checkcache keeps the entry (there is no file to check)
            linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
    return code


def dumps_with_source(obj: object, buffer_callback: Any = None) -> bytes:
    """cloudpickle, with every shipped code object keeping its file name and source lines."""
    with io.BytesIO() as file:
        _source_pickler()(file, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


# Pickling a function by value costs tens of microseconds, too much to repeat for 20,000
# calls of the same function. The cache is keyed on the identity of the function *and* of
# everything it captures, and used only when all of that is immutable or pickled by
# reference: then the bytes cloudpickle would produce cannot have changed. A function that
# captures a list, a dict or a cell-defined class is pickled afresh every time.
_callable_cache: dict[tuple[int, ...], tuple[weakref.ref[Any], bytes, bytes]] = {}
_IMMUTABLE_ATOMS = (int, float, complex, str, bytes, bool, type(None), range)


def _cache_key(fn: object) -> tuple[int, ...] | None:
    if not isinstance(fn, types.FunctionType):
        return None
    code = fn.__code__
    if not (fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__) and _code_is_closed(code):
        return (id(fn), id(code))  # captures nothing: the common fast path
    key = [id(fn), id(code)]
    for _kind, _name, value in _captured_values(fn):
        if not _frozen_value(value):
            return None
        key.append(id(value))
    return tuple(key)


_closed_codes: weakref.WeakKeyDictionary[types.CodeType, bool] = weakref.WeakKeyDictionary()


def _code_is_closed(code: types.CodeType) -> bool:
    """No global names and no nested code: decided once per code object (it is immutable)."""
    closed = _closed_codes.get(code)
    if closed is None:
        closed = not code.co_names and not any(isinstance(c, types.CodeType) for c in code.co_consts)
        _closed_codes[code] = closed
    return closed


def _frozen_value(value: object) -> bool:
    if isinstance(value, _IMMUTABLE_ATOMS):
        return True
    if isinstance(value, tuple | frozenset):
        return all(_frozen_value(v) for v in value)
    if isinstance(value, types.FunctionType):
        return True  # walked by _captured_values: its own captures are checked too
    if isinstance(value, type | types.BuiltinFunctionType):
        # By reference (importable) never goes stale; a __main__ class travels by value.
        return getattr(value, "__module__", "__main__") != "__main__"
    return False


def _reject_by_reference(fn: object) -> None:
    """cloudpickle ships ``__main__`` functions and classes by value, but other callables
    from ``__main__`` (``functools.lru_cache`` wrappers, C-level wrappers) are pickled by
    reference to ``__main__.name``, which a worker's ``__main__`` does not have."""
    if isinstance(fn, types.FunctionType | types.MethodType | type | functools.partial):
        return
    if getattr(fn, "__module__", None) != "__main__":
        return
    name = callable_name(fn)
    if hasattr(fn, "cache_info") and hasattr(fn, "__wrapped__"):
        raise SerializationError(
            f"{name!r} is wrapped by functools.lru_cache/cache in __main__; such wrappers are "
            "pickled by reference and a worker has no __main__.{name}. Pass "
            f"{name}.__wrapped__ (each worker then computes without the parent's cache), or "
            "move the cached function into an importable module."
        )
    raise SerializationError(
        f"{name!r} ({type(fn).__name__}) from __main__ is pickled by reference, and a worker "
        "cannot import it from its own __main__; wrap it in a plain def or lambda, or move it "
        "into an importable module."
    )


def _explain_callable_failure(fn: Callable[..., Any], exc: Exception) -> str:
    name = callable_name(fn)
    fallback = None
    for kind, var, value in _captured_values(fn):
        try:
            _cloudpickle().dumps(value, protocol=5)
        except Exception as inner:
            message = (
                f"cannot pickle {kind} {var!r} referenced by {name} "
                f"(type {_type_name(value)}): {type(inner).__name__}: {inner}"
            )
            if isinstance(value, types.FunctionType | types.MethodType | functools.partial):
                fallback = fallback or message  # walked further: name what it holds instead
                continue
            return message
    return fallback or f"cannot pickle function {name}: {type(exc).__name__}: {exc}"


def _captured_values(fn: object) -> Iterator[tuple[str, str, object]]:
    """The globals and closure variables ``fn`` uses, walking nested code objects and the
    ``__main__`` functions it calls (cloudpickle captures all of those by value)."""
    seen: set[int] = set()
    stack: list[object] = [fn]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, types.MethodType):
            yield "bound instance", callable_name(obj), obj.__self__
            stack.append(obj.__func__)
            continue
        if isinstance(obj, functools.partial):
            for i, arg in enumerate(obj.args):
                yield "partial argument", str(i), arg
            for key, arg in obj.keywords.items():
                yield "partial argument", key, arg
            stack.append(obj.func)
            continue
        if not isinstance(obj, types.FunctionType):
            continue
        for var, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: nothing to pickle
                continue
            yield "closure variable", var, value
            stack.append(value)
        fn_globals = obj.__globals__
        for var in _global_names(obj.__code__):
            if var in fn_globals:
                value = fn_globals[var]
                if isinstance(value, types.ModuleType):
                    continue  # modules are pickled by reference, always fine
                yield "global", var, value
                stack.append(value)
        for default in obj.__defaults__ or ():
            yield "default argument", callable_name(obj), default


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _type_name(value: object) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ in ("builtins", "__main__") else (f"{t.__module__}.{t.__qualname__}")


def describe_unpicklable_argument(items: list[Any], start: int, exc: Exception) -> dict[int, str]:
    """After a chunk of arguments failed to pickle: which items, and why (index -> message)."""
    culprits: dict[int, str] = {}
    for offset, item in enumerate(items):
        try:
            _cloudpickle().dumps(item, protocol=5)
        except Exception as inner:
            culprits[start + offset] = (
                f"cannot pickle the argument of task {start + offset} "
                f"(type {_type_name(item)}): {type(inner).__name__}: {inner}"
            )
    if not culprits:  # the list pickles item by item but not as a whole: blame them all
        for offset in range(len(items)):
            culprits[start + offset] = f"cannot pickle the arguments: {type(exc).__name__}: {exc}"
    return culprits


# --- remote exceptions ------------------------------------------------------------------


class ErrorRecord(NamedTuple):
    """A task's exception as it travels back: the pickled exception when it survives a
    round trip (tier 1), and always its type name, message and formatted traceback."""

    pickled: bytes | None
    ename: str
    evalue: str
    traceback: str
    kind: str  # "error", "cancelled", "timeout", "serialization"
    # How long the failing call ran, in seconds (None: not timed); ``duration_bound``: at
    # most that long (the worker timed a block of fast items, not this one alone).
    duration: float | None = None
    duration_bound: bool = False


def capture_exception(exc: BaseException, kind: str = "error", skip_frames: int = 0) -> ErrorRecord:
    tb = exc.__traceback__
    for _ in range(skip_frames):  # drop the worker's own frames above the user function
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    ename = f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins.")
    try:
        evalue = str(exc)
    except Exception:
        evalue = f"<unprintable {ename}>"
    pickled: bytes | None
    try:
        pickled = _cloudpickle().dumps(exc, protocol=5)
        pickle.loads(pickled)  # the round trip must work here, or the parent gets tier 2
    except Exception:
        pickled = None
    return ErrorRecord(pickled, ename, evalue, text, kind)


def rebuild_exception(record: ErrorRecord, note: str) -> BaseException:
    """The original exception with the remote traceback as its cause, or a RemoteError."""
    exc: BaseException
    if record.pickled is not None:
        try:
            exc = pickle.loads(record.pickled)
        except Exception:
            exc = RemoteError(record.ename, record.evalue, record.traceback)
        else:
            exc.__cause__ = RemoteTraceback(record.traceback)
    else:
        exc = RemoteError(record.ename, record.evalue, record.traceback)
    exc.add_note(note)
    return exc


def blame_results(
    values: list[Any], errors: dict[int, ErrorRecord], start: int, limit: int | None = None
) -> None:
    """A chunk's results could not be pickled together (one cannot be pickled at all, or,
    with ``limit`` (the pool's ``max_result_bytes``), they passed it): check them one by one
    and turn each culprit into the error of its own task (``start`` + offset), in place, so
    the other results still travel. A result is only counted, not kept, and its counting
    stops at the limit. Used by every worker (local and dask)."""
    for offset, value in enumerate(values):
        if offset in errors:
            continue
        err: SerializationError
        try:
            _dump_limited(value, 5, _out_of_band, sys.maxsize if limit is None else limit, False)
        except ResultLimitExceeded as exc:
            err = ResultTooLargeError(
                f"the result of task {start + offset} (type {_type_name(value)}) is larger "
                f"than the pool's max_result_bytes={exc.limit:,} (pickling it stopped at "
                f"{exc.size:,} bytes)"
            )
        except Exception as exc:
            err = SerializationError(
                f"cannot pickle the result of task {start + offset} "
                f"(type {type(value).__qualname__}): {type(exc).__name__}: {exc}"
            )
        else:
            continue
        errors[offset] = capture_exception(err, "serialization")
        values[offset] = None
