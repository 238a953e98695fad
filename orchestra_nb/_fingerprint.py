"""Stable fingerprints of functions and arguments (layer 0: pure, no I/O).

A fingerprint is a 32-byte BLAKE2b digest that is the same in every session for the same
code and the same values, so that a result computed in one kernel can be found again by
the next one. Neither cloudpickle bytes (they carry line numbers, file names and memo
order) nor ``hash()`` (salted per process for ``str``) are stable, so both are built
here from first principles.

Function fingerprints (:func:`function_fingerprint`) cover, recursively:

* the code object: bytecode, constants (nested code objects included), names, argument
  layout and flags; *not* its name, file name or line numbers, so a cell can move, a
  comment can be added above a function, and a ``lambda`` equals a ``def`` with the same
  body;
* default and keyword-only default values, closure cell values;
* the values of the globals the code reads (only those: editing an unrelated cell changes
  nothing). A global that is itself a function or class defined in the notebook (no
  importable module) is fingerprinted the same way, so editing a helper the task calls
  changes the key. A module, or a function or class imported from a module, counts by
  module name, qualified name and the version of its distribution.

Argument fingerprints (:func:`value_fingerprint`) hash a canonical pickle stream: dicts
and sets are ordered by the fingerprints of their keys / elements, numpy arrays by
``dtype``, ``shape`` and their bytes, functions by their function fingerprint, and no memo
is used (two equal lists hash alike whether or not they are the same object). Objects
that cannot be pickled raise :class:`FingerprintError` naming the argument.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import pickle
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ._exceptions import OrchestraError
from ._indexed import Unkeyed

__all__ = [
    "FingerprintError",
    "call_fingerprint",
    "call_fingerprints",
    "function_fingerprint",
    "value_fingerprint",
]

DIGEST_SIZE = 32
# Bytecode differs between Python versions; so must every key.
_PYTHON_TAG = importlib.util.MAGIC_NUMBER
_FAST_ATOMS = (int, float, str, bytes, bool, type(None))


class FingerprintError(OrchestraError, TypeError):
    """A function or argument whose value cannot be fingerprinted (it cannot be pickled,
    or it is recursive). The message names the argument or global. An argument that should
    not be part of the key can be passed as ``orchestra.store.unkeyed(value)``."""


_Bytes = bytes | bytearray | memoryview


def _digest(*parts: _Bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in parts:
        h.update(memoryview(part).nbytes.to_bytes(8, "little"))
        h.update(part)
    return h.digest()


# --- values ---------------------------------------------------------------------------------


class _Canonical:
    """A dict or set replaced by its sorted form (its type is private: no user value can
    pickle the same)."""

    __slots__ = ("kind", "payload")

    def __init__(self, kind: str, payload: Any) -> None:
        self.kind = kind
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return _tagged, (self.kind, self.payload)


def _canon(obj: Any, context: _FunctionContext) -> Any:
    """``obj`` with every dict and set inside its containers put in a canonical order.

    The C pickler never asks ``reducer_override`` about builtin containers, so they are
    rewritten before pickling; other objects' reductions are canonicalised by the pickler
    as it meets them.
    """
    kind = type(obj)
    if kind in _FAST_ATOMS:
        return obj
    if kind is list or kind is tuple:
        if all(type(item) in _FAST_ATOMS for item in obj):
            return obj
        items = [_canon(item, context) for item in obj]
        return items if kind is list else tuple(items)
    if kind is dict:
        pairs = sorted(((_value_digest(k, context), _canon(v, context)) for k, v in obj.items()),
                       key=lambda pair: pair[0])
        return _Canonical("dict", pairs)
    if kind is set or kind is frozenset:
        return _Canonical(kind.__name__, sorted(_value_digest(e, context) for e in obj))
    return obj


class _CanonicalPickler(pickle.Pickler):
    """Pickles into a hash-friendly canonical form (see the module docstring)."""

    def __init__(self, file: io.BytesIO, context: _FunctionContext) -> None:
        super().__init__(file, protocol=5)
        self.fast = True  # no memo: equal values give equal bytes, shared or not
        self._context = context

    def reducer_override(self, obj: Any) -> Any:
        if obj is _tagged or type(obj) is _Canonical:
            return NotImplemented  # pickled by reference / by its own __reduce__
        kind = type(obj)
        if kind is Unkeyed:  # the caller's explicit opt-out: not part of the key
            return _tagged, ("unkeyed",)
        if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | functools.partial
                      | types.MethodType | type | types.ModuleType):
            return _tagged, ("callable", self._context.callable_digest(obj))
        if kind.__module__ == "numpy" and kind.__name__ == "ndarray":
            return _tagged, ("ndarray", _array_digest(obj, self._context))
        reduce_ex = getattr(obj, "__reduce_ex__", None)
        if reduce_ex is None:
            return NotImplemented
        reduced = reduce_ex(5)
        if isinstance(reduced, str):
            return NotImplemented  # a global, pickled by name
        # Sets or dicts in an object's arguments or state: canonical too.
        return (reduced[0], _canon(reduced[1], self._context),
                *(_canon(part, self._context) for part in reduced[2:3]), *reduced[3:])


def _tagged(*_: Any) -> None:  # a stand-in constructor; fingerprints are never unpickled
    return None


def _array_digest(array: Any, context: _FunctionContext) -> bytes:
    data: _Bytes
    if array.dtype.hasobject:
        data = b"".join(_value_digest(item, context) for item in array.ravel().tolist())
    else:  # the array's memory itself, no copy unless it is not contiguous
        data = memoryview(array if array.flags.c_contiguous else array.copy(order="C")).cast("B")
    return _digest(b"ndarray", array.dtype.str.encode(), repr(array.shape).encode(), data)


def _value_digest(value: Any, context: _FunctionContext) -> bytes:
    kind = type(value)
    if kind in _FAST_ATOMS:
        return _digest(pickle.dumps(value, protocol=5))
    buffer = io.BytesIO()
    _CanonicalPickler(buffer, context).dump(_canon(value, context))
    return _digest(buffer.getbuffer())


def value_fingerprint(value: Any, *, what: str = "the value") -> bytes:
    """The fingerprint of ``value``; raises :class:`FingerprintError` naming ``what``."""
    try:
        return _value_digest(value, _FunctionContext())
    except FingerprintError:
        raise
    except RecursionError as exc:
        raise FingerprintError(f"cannot fingerprint {what}: it is recursive (contains itself)") from exc
    except Exception as exc:
        raise FingerprintError(
            f"cannot fingerprint {what} (type {type(value).__qualname__}): {type(exc).__name__}: {exc}"
        ) from exc


# --- functions ------------------------------------------------------------------------------


class _FunctionContext:
    """Memoises function digests within one fingerprint and breaks recursion cycles
    (mutually recursive helpers)."""

    def __init__(self) -> None:
        self._done: dict[int, bytes] = {}
        self._active: set[int] = set()
        self._keep: list[Any] = []  # keeps ids valid while this context lives

    def callable_digest(self, fn: Any) -> bytes:
        key = id(fn)
        found = self._done.get(key)
        if found is not None:
            return found
        if key in self._active:  # a helper that calls itself (or back): its name suffices
            return _digest(b"cycle", _qualname(fn).encode())
        self._active.add(key)
        self._keep.append(fn)
        try:
            digest = self._callable_digest(fn)
        finally:
            self._active.discard(key)
        self._done[key] = digest
        return digest

    def _callable_digest(self, fn: Any) -> bytes:
        if isinstance(fn, types.ModuleType):
            return _digest(b"module", fn.__name__.encode(), _version_of(fn.__name__))
        if isinstance(fn, functools.partial):
            return _digest(b"partial", self.callable_digest(fn.func), _value_digest(fn.args, self),
                           _value_digest(fn.keywords, self))
        if isinstance(fn, types.MethodType):
            return _digest(b"method", self.callable_digest(fn.__func__), _value_digest(fn.__self__, self))
        if _is_importable(fn) and _version_of(getattr(fn, "__module__", None) or "builtins") != _UNVERSIONED:
            module = getattr(fn, "__module__", None) or "builtins"
            return _digest(b"ref", module.encode(), _qualname(fn).encode(), _version_of(module))
        if isinstance(fn, types.FunctionType):
            return self._function_digest(fn)
        if isinstance(fn, type):
            return self._class_digest(fn)
        if callable(fn):  # an instance with __call__, defined in the notebook
            return _digest(b"instance", self._class_digest(type(fn)),
                           _value_digest(getattr(fn, "__dict__", None), self))
        raise FingerprintError(f"not a callable: {fn!r}")

    def _function_digest(self, fn: types.FunctionType) -> bytes:
        code = fn.__code__
        parts = [b"function", _PYTHON_TAG, _code_digest(code)]
        parts.append(_value_digest(fn.__defaults__, self))
        parts.append(_value_digest(fn.__kwdefaults__, self))
        for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell (a name bound later)
                parts.append(_digest(b"empty", name.encode()))
                continue
            parts.append(_digest(name.encode(), self._member_digest(value, f"closure variable {name!r}")))
        namespace = fn.__globals__
        builtins = namespace.get("__builtins__", {})
        for name in sorted(_global_names(code)):
            if name in namespace:
                value = namespace[name]
                parts.append(_digest(name.encode(), self._member_digest(value, f"global {name!r}")))
            elif name in (builtins if isinstance(builtins, dict) else vars(builtins)):
                parts.append(_digest(b"builtin", name.encode()))
        return _digest(*parts)

    def _class_digest(self, cls: type) -> bytes:
        """A class defined in the notebook: its bases and the members it defines."""
        parts = [b"class", cls.__qualname__.encode()]
        parts.extend(self.callable_digest(base) for base in cls.__bases__)
        for name, member in sorted(vars(cls).items()):
            if name in _CLASS_BOOKKEEPING:
                continue
            target = member.__func__ if isinstance(member, staticmethod | classmethod) else member
            if isinstance(target, property):
                target = (target.fget, target.fset, target.fdel)
            parts.append(_digest(name.encode(), self._member_digest(target, f"class attribute {name!r}")))
        return _digest(*parts)

    def _member_digest(self, value: Any, what: str) -> bytes:
        try:
            return _value_digest(value, self)
        except FingerprintError:
            raise
        except Exception as exc:
            raise FingerprintError(
                f"cannot fingerprint {what} (type {type(value).__qualname__}): {type(exc).__name__}: {exc}"
            ) from exc


# Entries of a class's namespace that say where or how it was defined, not what it does
# (``__firstlineno__`` and ``__static_attributes__`` appear in Python 3.13).
_CLASS_BOOKKEEPING = frozenset({"__dict__", "__weakref__", "__module__", "__doc__", "__qualname__",
                                "__firstlineno__", "__static_attributes__"})


def _code_digest(code: types.CodeType) -> bytes:
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            consts.append(_digest(b"code", _code_digest(const)))
        else:
            consts.append(_digest(b"const", pickle.dumps(_freeze_const(const), protocol=5)))
    return _digest(
        code.co_code,
        b"".join(consts),
        "\0".join(code.co_names).encode(),
        "\0".join(code.co_varnames).encode(),
        "\0".join(code.co_freevars).encode(),
        "\0".join(code.co_cellvars).encode(),
        code.co_exceptiontable,  # where each try block's handler is (offsets, not lines)
        repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
              code.co_flags)).encode(),
    )


def _freeze_const(const: Any) -> Any:
    """Constants are immutable atoms, tuples and frozensets; frozensets are ordered so
    that their pickles do not depend on string hashing."""
    if isinstance(const, frozenset):
        return ("frozenset", sorted(pickle.dumps(_freeze_const(c), protocol=5) for c in const))
    if isinstance(const, tuple):
        return tuple(_freeze_const(c) for c in const)
    return const


def _global_names(code: types.CodeType) -> set[str]:
    """Names the code (and the functions defined inside it) may read as globals. Attribute
    names are among them too (``co_names`` mixes both); those not in the namespace are
    simply not found."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__


def _is_importable(obj: Any) -> bool:
    """Defined in a module that can be imported by name (not ``__main__``, not a cell)."""
    module = getattr(obj, "__module__", None)
    if module is None:
        return isinstance(obj, types.BuiltinFunctionType)
    if module in ("__main__", "__mp_main__") or "<locals>" in _qualname(obj):
        return False
    found = sys.modules.get(module)
    return found is not None and getattr(found, "__spec__", None) is not None


@functools.lru_cache(maxsize=512)
def _version_of(module: str) -> bytes:
    """The version of the distribution that provides ``module`` (the Python version for
    the standard library)."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return f"python-{sys.version_info[0]}.{sys.version_info[1]}".encode()
    found = sys.modules.get(top)
    version = getattr(found, "__version__", None)
    if isinstance(version, str):
        return version.encode()
    for dist in _distributions().get(top, ()):
        try:
            return f"{dist}-{importlib.metadata.version(dist)}".encode()
        except importlib.metadata.PackageNotFoundError:
            continue
    return _UNVERSIONED


_UNVERSIONED = b"unversioned"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    """Top-level module -> the distributions providing it (read once: it scans site-packages)."""
    return dict(importlib.metadata.packages_distributions())


def function_fingerprint(fn: Callable[..., Any]) -> bytes:
    """The fingerprint of ``fn`` (see the module docstring)."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}: {fn!r}")
    try:
        return _FunctionContext().callable_digest(fn)
    except FingerprintError as exc:
        raise FingerprintError(f"cannot fingerprint function {_qualname(fn)}: {exc}") from exc
    except RecursionError as exc:
        raise FingerprintError(f"cannot fingerprint function {_qualname(fn)}: a recursive value") from exc


def call_fingerprints(
    function_key: bytes, calls: Iterable[tuple[tuple[Any, ...], dict[str, Any] | None]]
) -> Iterator[bytes]:
    """``call_fingerprint`` of many ``(args, kwargs)`` calls of one function (a map's
    items), with a fast path for the common one-atom call."""
    base = hashlib.blake2b(function_key, digest_size=DIGEST_SIZE)
    atoms = _FAST_ATOMS
    dumps = pickle.dumps
    for args, kwargs in calls:
        if kwargs is None and len(args) == 1 and type(args[0]) in atoms:
            h = base.copy()  # the same bytes call_fingerprint hashes
            part = dumps(args[0], protocol=5)
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
            yield h.digest()
        else:
            yield call_fingerprint(function_key, args, kwargs)


def call_fingerprint(function_key: bytes, args: Iterable[Any], kwargs: dict[str, Any] | None = None) -> bytes:
    """The key of one call: the function's fingerprint and every argument's, each named
    in the error if it cannot be fingerprinted."""
    h = hashlib.blake2b(function_key, digest_size=DIGEST_SIZE)
    for index, arg in enumerate(args):
        # Atoms (the common case, at a microsecond) by their pickle, the rest by their
        # fingerprint; a length prefix keeps the parts apart.
        part = pickle.dumps(arg, protocol=5) if type(arg) in _FAST_ATOMS else \
            value_fingerprint(arg, what=f"argument {index}")
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    if kwargs:
        h.update(b"\0keywords")
        for name in sorted(kwargs):
            h.update(_digest(name.encode(), value_fingerprint(kwargs[name], what=f"keyword argument {name!r}")))
    return h.digest()

