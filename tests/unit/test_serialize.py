"""Pickling of callables and the errors that name what cannot be pickled."""

from __future__ import annotations

import functools
import pickle
import threading

import pytest

from orchestra_nb import RemoteError, RemoteTraceback, SerializationError
from orchestra_nb._serialize import (
    capture_exception,
    describe_unpicklable_argument,
    dumps_callable,
    rebuild_exception,
)

LOCK = threading.Lock()


def test_callables_by_value_and_digest() -> None:
    k = 3
    f = lambda x: x * k  # noqa: E731
    payload, digest = dumps_callable(f)
    assert pickle.loads(payload)(2) == 6
    assert len(digest) == 16
    assert dumps_callable(f)[1] == digest  # stable
    assert dumps_callable(lambda x: x + 1)[1] != digest
    with pytest.raises(TypeError):
        dumps_callable(42)  # type: ignore[arg-type]


def test_global_culprit_named() -> None:
    def uses_lock() -> None:
        with LOCK:
            pass

    with pytest.raises(SerializationError) as info:
        dumps_callable(uses_lock)
    msg = str(info.value)
    assert "global 'LOCK'" in msg and "uses_lock" in msg and "_thread.lock" in msg


def test_nested_global_culprit_named() -> None:
    def inner() -> None:
        with LOCK:
            pass

    def outer() -> None:
        inner()

    with pytest.raises(SerializationError, match="'LOCK'"):
        dumps_callable(outer)


def test_closure_partial_bound_default_culprits_named() -> None:
    lk = threading.Lock()

    def closure() -> object:
        return lk

    with pytest.raises(SerializationError, match="closure variable 'lk'"):
        dumps_callable(closure)
    with pytest.raises(SerializationError, match="partial argument"):
        dumps_callable(functools.partial(print, lk))

    class Holder:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def method(self) -> None:
            pass

    with pytest.raises(SerializationError, match="bound instance"):
        dumps_callable(Holder().method)

    def with_default(x: object = lk) -> object:
        return x

    with pytest.raises(SerializationError, match="default argument"):
        dumps_callable(with_default)


def test_main_by_reference_callables_rejected() -> None:
    def base(x: int) -> int:
        return x

    base.__module__ = "__main__"
    cached = functools.lru_cache(maxsize=None)(base)
    assert cached.__module__ == "__main__"
    with pytest.raises(SerializationError, match="lru_cache") as info:
        dumps_callable(cached)
    assert "__wrapped__" in str(info.value)


def test_describe_unpicklable_argument() -> None:
    lock = threading.Lock()
    culprits = describe_unpicklable_argument([1, lock, 3, lock], 10, TypeError("x"))
    assert sorted(culprits) == [11, 13]
    assert "task 11" in culprits[11] and "lock" in culprits[11]


def test_exception_round_trip_tier_one() -> None:
    try:
        raise KeyError("k")
    except KeyError as exc:
        record = capture_exception(exc)
    assert record.pickled is not None and record.ename == "KeyError"
    assert "raise KeyError" in record.traceback
    exc2 = rebuild_exception(record, "raised in worker 1 (pid 2) while running task 3")
    assert type(exc2) is KeyError and exc2.args == ("k",)
    assert isinstance(exc2.__cause__, RemoteTraceback)
    assert "raise KeyError" in str(exc2.__cause__)
    assert exc2.__notes__ == ["raised in worker 1 (pid 2) while running task 3"]


class _Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("has a lock")
        self.lock = threading.Lock()


def test_exception_tier_two() -> None:
    try:
        raise _Unpicklable()
    except _Unpicklable as exc:
        record = capture_exception(exc)
    assert record.pickled is None
    exc2 = rebuild_exception(record, "note")
    assert isinstance(exc2, RemoteError)
    assert exc2.ename.endswith("_Unpicklable") and exc2.evalue == "has a lock"
    assert "raise _Unpicklable()" in exc2.traceback
    assert exc2.__notes__ == ["note"]
    # RemoteError itself travels (pickle round trip keeps its fields)
    again = pickle.loads(pickle.dumps(exc2))
    assert (again.ename, again.evalue, again.traceback) == (exc2.ename, exc2.evalue, exc2.traceback)
