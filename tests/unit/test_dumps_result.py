"""How a worker pickles results: plain pickle where it is exact, cloudpickle where it is not.

A worker runs functions and classes that cloudpickle rebuilt from a notebook cell: their
``__module__`` is ``"__main__"``, but the worker's ``__main__`` is not the notebook's. These
tests build such objects the same way (by value, through cloudpickle) and check that they
still travel by value, never as a reference to whatever ``__main__`` holds.
"""

from __future__ import annotations

import pickle
import sys
import threading
import types
from typing import Any

import cloudpickle
import numpy as np
import pytest

from orchestra_nb import _protocol as proto, _serialize
from orchestra_nb._serialize import ErrorRecord, dumps_result

CELL = """
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm1(self):
        return abs(self.x) + abs(self.y)

scale = lambda v: 10 * v
"""


def _cell() -> dict[str, Any]:
    """What a worker holds after running a notebook cell's function: classes and lambdas
    whose ``__module__`` is ``"__main__"``, shipped by value."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(CELL, ns)
    shipped: dict[str, Any] = pickle.loads(cloudpickle.dumps({"Point": ns["Point"], "scale": ns["scale"]}))
    return shipped


def _load_without_main(data: bytes) -> Any:
    """Unpickle ``data`` where ``__main__`` has nothing: it loads only if pickled by value."""
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return pickle.loads(data)
    finally:
        sys.modules["__main__"] = saved


def test_plain_values_take_plain_pickle() -> None:
    body = ([1, 2.5, "x", None, (3, b"y"), {"k": [1]}], {0: ErrorRecord(None, "E", "v", "", "error")})
    data = dumps_result(body)
    assert data == pickle.dumps(body, protocol=5)
    assert pickle.loads(data) == body


def test_cell_class_and_lambda_results_travel_by_value() -> None:
    cell = _cell()
    point = cell["Point"](3, -4)
    for result in (point, [1, point], cell["scale"], cell["Point"], ([point], None)):
        with pytest.raises(pickle.PicklingError):  # plain pickle finds no __main__.Point
            pickle.dumps(result, protocol=5)
        _load_without_main(dumps_result(result))
    got = _load_without_main(dumps_result([point, cell["scale"]]))
    assert got[0].norm1() == 7 and (got[0].x, got[0].y) == (3, -4)
    assert got[1](2) == 20


def test_a_same_named_main_attribute_is_not_taken_for_the_cell_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``__main__.Point`` exists but is another object: plain pickle's identity check fails,
    so the cell's class still travels by value."""
    cell = _cell()

    class Point:  # an impostor of the same name in __main__
        pass

    monkeypatch.setattr(sys.modules["__main__"], "Point", Point, raising=False)
    monkeypatch.setattr(sys.modules["__main__"], "scale", len, raising=False)
    data = dumps_result([cell["Point"](1, 2), cell["scale"]])
    monkeypatch.undo()
    got = _load_without_main(data)
    assert type(got[0]) is not Point and got[0].norm1() == 3 and got[1](1) == 10


def test_a_reference_to_main_goes_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even the very object, reachable as ``__main__.Point`` (plain pickle would pickle it by
    reference, and the parent would look it up in *its* ``__main__``), goes by value."""
    cell = _cell()
    monkeypatch.setattr(sys.modules["__main__"], "Point", cell["Point"], raising=False)
    assert b"__main__" in pickle.dumps(cell["Point"](1, 2), protocol=5)  # by reference
    data = dumps_result(cell["Point"](1, 2))
    monkeypatch.undo()
    assert _load_without_main(data).norm1() == 3


def test_modules_registered_by_value_go_through_cloudpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = cloudpickle.dumps

    def spy(obj: object, *args: Any, **kwargs: Any) -> bytes:
        calls.append(obj)
        data: bytes = real(obj, *args, **kwargs)
        return data

    monkeypatch.setattr(cloudpickle, "dumps", spy)
    dumps_result([1, 2])
    assert calls == []
    monkeypatch.setattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", {"some_module"})
    dumps_result([1, 2])
    assert calls == [[1, 2]]


def test_cloudpickle_keeps_the_private_registry() -> None:
    """dumps_result reads cloudpickle's registry of by-value modules; if cloudpickle renames
    it, every result silently goes through cloudpickle: this test says so instead."""
    assert isinstance(cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES, set)
    assert _serialize._pickled_by_value() is cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES


def test_unpicklable_result_raises_cloudpickles_error() -> None:
    with pytest.raises(TypeError, match="lock") as plain:
        cloudpickle.dumps([1, threading.Lock()], protocol=5)
    with pytest.raises(TypeError, match="lock") as ours:
        dumps_result([1, threading.Lock()])
    assert str(ours.value) == str(plain.value)


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "cloudpickle"])
def test_buffers_reach_the_callback_once(fallback: bool) -> None:
    """Out-of-band buffers: the caller's callback sees those of the returned stream only, even
    when plain pickle had met some before failing and cloudpickle pickled it all again."""
    a = np.arange(100_000, dtype=np.int64)  # 800 KB: out of band
    b = np.arange(10, dtype=np.int64)  # small: in band
    result: list[Any] = [a, b, _cell()["scale"] if fallback else 7]
    seen: list[pickle.PickleBuffer] = []

    def callback(buf: pickle.PickleBuffer) -> bool:
        seen.append(buf)
        return buf.raw().nbytes < 1000

    data = dumps_result(result, buffer_callback=callback)
    assert len(seen) == 2
    got = pickle.loads(data, buffers=[buf for buf in seen if buf.raw().nbytes >= 1000])
    assert np.array_equal(got[0], a) and np.array_equal(got[1], b)
    assert got[2](1) == 10 if fallback else got[2] == 7


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "cloudpickle"])
def test_through_pickle_payload(fallback: bool) -> None:
    a = np.arange(100_000, dtype=np.float64)
    body = ([a, _cell()["Point"](1, 1) if fallback else None], None)
    frames, names = proto.pickle_payload(dumps_result, body, None)
    assert names == (None,) and len(frames) == 2
    values, errors = pickle.loads(frames[0], buffers=proto.read_buffers(frames, names, None))
    assert np.array_equal(values[0], a) and errors is None
    assert values[1].norm1() == 2 if fallback else values[1] is None


# --- the limit (max_result_bytes): checked while pickling ---------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "cloudpickle"])
def test_under_the_limit_the_stream_is_the_same(fallback: bool) -> None:
    result: list[Any] = [b"x" * 100_000, [str(i) for i in range(1000)]]
    if fallback:
        result.append(_cell()["Point"](1, 2))
    data = dumps_result(result, limit=10_000_000)
    assert data == dumps_result(result)
    assert _load_without_main(data)[:2] == result[:2]


@pytest.mark.parametrize("fallback", [False, True], ids=["plain", "cloudpickle"])
def test_pickling_stops_soon_after_the_limit(fallback: bool) -> None:
    """Many small objects: the pickler hands over a frame (64 KiB) at a time, and the first
    one past the limit stops it; the rest of the result is never pickled."""
    result: list[Any] = [str(i) * 50 for i in range(200_000)]  # ~50 MB of pickle
    if fallback:
        result.append(_cell()["scale"])
    with pytest.raises(_serialize.ResultLimitExceeded) as info:
        dumps_result(result, limit=1_000_000)
    assert 1_000_000 < info.value.size < 1_000_000 + 200_000
    assert info.value.limit == 1_000_000


def test_a_large_bytes_object_is_refused_without_a_copy() -> None:
    with pytest.raises(_serialize.ResultLimitExceeded) as info:
        dumps_result([1, b"x" * 5_000_000], limit=1_000_000)
    assert info.value.size > 5_000_000  # counted whole, as the pickler handed it over


def test_out_of_band_buffers_count_towards_the_limit() -> None:
    a = np.zeros(1_000_000)  # 8 MB, out of band (a frame or shared memory), not in the stream
    seen: list[pickle.PickleBuffer] = []
    with pytest.raises(_serialize.ResultLimitExceeded):
        dumps_result([a], buffer_callback=seen.append, limit=1_000_000)
    frames, _ = proto.pickle_payload(dumps_result, [a], None)  # no limit: it travels
    assert len(frames) == 2


def test_blame_results_names_the_task_over_the_limit() -> None:
    from orchestra_nb._exceptions import ResultTooLargeError

    values: list[Any] = [b"x" * 10, b"x" * 2_000_000, threading.Lock(), np.zeros(500_000)]
    errors: dict[int, ErrorRecord] = {}
    _serialize.blame_results(values, errors, 10, limit=1_000_000)
    assert sorted(errors) == [1, 2, 3]
    assert errors[1].ename == "orchestra_nb._exceptions.ResultTooLargeError"
    assert "task 11 (type bytes)" in errors[1].evalue
    assert "max_result_bytes=1,000,000" in errors[1].evalue
    assert errors[2].ename == "orchestra_nb._exceptions.SerializationError"
    assert "task 12" in errors[2].evalue
    assert "task 13 (type numpy.ndarray)" in errors[3].evalue
    assert values == [b"x" * 10, None, None, None]
    assert isinstance(pickle.loads(errors[1].pickled or b""), ResultTooLargeError)
