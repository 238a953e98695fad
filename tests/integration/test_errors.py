"""Errors: remote exceptions with type, traceback and note; everything unpicklable named;
and after each failure the same pool (same worker processes) keeps serving."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import orchestra_nb as orchestra
from orchestra_nb import RemoteError, RemoteTraceback, ResultTooLargeError, SerializationError

HANG_GUARD = 30.0
LOCK = threading.Lock()  # a global no pickle can carry



# Remote tracebacks, pickling of functions, arguments and results: the process boundary.
pytestmark = pytest.mark.local_only("errors across the process boundary (pickling, remote tracebacks)")

def square(x: int) -> int:
    return x * x


def identity(x: object) -> object:
    return x


def pair(a: object, b: object) -> tuple[object, object]:
    return a, b


def boom(x: int) -> int:
    if x == 3:
        raise KeyError(f"boom on {x}")  # the line the remote traceback must show
    return x


class LockedError(Exception):
    """Pickles by value, but carries a lock: cannot cross the process boundary."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but fails to unpickle (the classic ``__init__`` signature trap)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_locked(x: int) -> None:
    raise LockedError(f"locked {x}")


def raise_two_arg(x: int) -> None:
    raise TwoArgError("left", str(x))


def lock_result(x: int) -> object:
    return threading.Lock() if x == 1 else x


def big_result(n: int) -> bytes:
    return b"x" * n


def still_serves(pool: orchestra.Pool, pids: list[int]) -> None:
    """The pool answers a new map, on the very same (warm) worker processes."""
    assert pool.map(square, range(30)).result(HANG_GUARD) == [x * x for x in range(30)]
    assert sorted(pool.worker_pids()) == sorted(pids)
    assert sorted(pool.run_on_all(os.getpid).result(HANG_GUARD)) == sorted(pids)


# --- remote exceptions ------------------------------------------------------------------------


def test_remote_exception_type_traceback_note(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    h = pool.map(boom, range(5), chunksize=1)
    with pytest.raises(KeyError) as info:
        h.result(HANG_GUARD)
    exc = info.value
    assert type(exc) is KeyError and exc.args == ("boom on 3",)
    cause = exc.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in boom" in cause.tb
    assert 'raise KeyError(f"boom on {x}")' in cause.tb  # the worker's source line
    assert "_worker.py" not in cause.tb  # the worker's own frames are trimmed
    (note,) = [n for n in exc.__notes__ if "raised in worker" in n]
    pid = int(note.split("(pid ")[1].split(")")[0])
    assert pid in pids
    assert "task 3" in note and f"job {h.job_id}" in note
    assert set(h.exceptions()) == {3}
    still_serves(pool, pids)


async def test_remote_exception_awaited(apool: orchestra.Pool) -> None:
    with pytest.raises(KeyError, match="boom on 3") as info:
        await apool.run(boom, 3)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert any("task 0" in n for n in info.value.__notes__)


def test_several_failures_noted(pool: orchestra.Pool) -> None:
    h = pool.map(boom, [3, 1, 3, 3])
    with pytest.raises(KeyError) as info:
        h.result(HANG_GUARD)
    assert any("raised in worker" in n and "task 0" in n for n in info.value.__notes__)
    assert any("2 other task(s)" in n for n in info.value.__notes__)
    assert sorted(h.exceptions()) == [0, 2, 3]


def test_unpicklable_exception_becomes_remote_error(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    with pytest.raises(RemoteError) as info:
        pool.run(raise_locked, 7).result(HANG_GUARD)
    err = info.value
    assert err.ename == "test_errors.LockedError"
    assert err.evalue == "locked 7"
    assert "raise LockedError" in err.traceback and "in raise_locked" in err.traceback
    assert any("raised in worker" in n for n in err.__notes__)
    # pickles, but cannot be rebuilt: also a RemoteError, not a confusing TypeError
    with pytest.raises(RemoteError) as info:
        pool.run(raise_two_arg, 1).result(HANG_GUARD)
    assert info.value.ename == "test_errors.TwoArgError"
    assert info.value.evalue == "left/1"
    still_serves(pool, pids)


# --- unpicklable function / argument / global / result -----------------------------------------


def test_unpicklable_global_names_it(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()

    def uses_lock(x: int) -> int:  # local: shipped by value, with the globals it uses
        with LOCK:
            return x

    with pytest.raises(SerializationError) as info:
        pool.map(uses_lock, range(3))  # raises at once, in the caller
    msg = str(info.value)
    assert "global 'LOCK'" in msg and "uses_lock" in msg and "lock" in msg
    with pytest.raises(SerializationError, match="global 'LOCK'"):
        pool.run(uses_lock, 1)
    still_serves(pool, pids)


def test_unpicklable_function_names_it(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    lk = threading.Lock()

    def closure(x: int) -> object:
        return lk, x

    with pytest.raises(SerializationError, match="closure variable 'lk'"):
        pool.run(closure, 1)
    with pytest.raises(SerializationError, match="partial argument"):
        pool.map(functools.partial(identity, threading.Lock()), range(2))

    class Holder:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def method(self, x: int) -> int:
            return x

    with pytest.raises(SerializationError, match="bound instance"):
        pool.run(Holder().method, 1)
    with pytest.raises(TypeError):
        pool.run(42)  # type: ignore[arg-type]
    still_serves(pool, pids)


def test_unpicklable_argument_of_run(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    with pytest.raises(SerializationError, match=r"argument 1 of pair .*lock"):
        pool.run(pair, 1, threading.Lock())
    with pytest.raises(SerializationError, match=r"keyword argument 'b' of pair .*lock"):
        pool.run(pair, 1, b=threading.Lock())
    still_serves(pool, pids)


def test_unpicklable_argument_in_map(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    items = [1, 2, threading.Lock(), 4, 5]
    h = pool.map(identity, items)
    with pytest.raises(SerializationError, match="argument of task 2") as info:
        h.result(HANG_GUARD)
    assert "lock" in str(info.value)
    assert list(h.exceptions()) == [2]
    assert h.counts()[orchestra.TaskState.SUCCEEDED] == 4
    out = pool.map(identity, items, return_exceptions=True).result(HANG_GUARD)
    assert out[:2] == [1, 2] and out[3:] == [4, 5]
    assert isinstance(out[2], SerializationError)
    still_serves(pool, pids)


def test_unpicklable_result(pool: orchestra.Pool) -> None:
    pids = pool.worker_pids()
    out = pool.map(lock_result, range(3), return_exceptions=True, chunksize=3).result(HANG_GUARD)
    assert out[0] == 0 and out[2] == 2
    err = out[1]
    assert isinstance(err, SerializationError)
    assert "result of task 1" in str(err) and "lock" in str(err)
    with pytest.raises(SerializationError, match="result of task 0"):
        pool.run(lock_result, 1).result(HANG_GUARD)
    still_serves(pool, pids)


def test_result_too_large() -> None:
    with orchestra.Pool(workers=1, max_result_bytes=100_000) as pool:
        pool.wait_started(HANG_GUARD)
        pids = pool.worker_pids()
        with pytest.raises(ResultTooLargeError, match="max_result_bytes"):
            pool.run(big_result, 1_000_000).result(HANG_GUARD)
        assert issubclass(ResultTooLargeError, SerializationError)
        out = pool.map(big_result, [10, 1_000_000, 20], return_exceptions=True,
                       chunksize=3).result(HANG_GUARD)
        assert out[0] == b"x" * 10 and out[2] == b"x" * 20
        assert isinstance(out[1], ResultTooLargeError) and "task 1" in str(out[1])
        still_serves(pool, pids)


# --- by-reference callables and globals of __main__ ---------------------------------------------

MAIN_SCRIPT = textwrap.dedent(
    """
    import functools, json, threading
    import orchestra_nb as orchestra
    from orchestra_nb import SerializationError

    out = {}
    pool = orchestra.Pool(workers=1)
    try:
        @functools.lru_cache(maxsize=None)
        def cached(x):
            return x * 2

        lock = threading.Lock()

        def uses_global(x):
            with lock:
                return x

        for key, call in [("lru", lambda: pool.map(cached, range(3))),
                          ("global", lambda: pool.run(uses_global, 1))]:
            try:
                call()
                out[key] = None
            except SerializationError as exc:
                out[key] = str(exc)
        # the documented way out works, and the pool still serves
        out["wrapped"] = pool.map(cached.__wrapped__, range(3)).result(60)
        out["pids"] = pool.worker_pids()
    finally:
        pool.shutdown()
    print(json.dumps(out))
    """
)


def test_main_by_reference_callable_and_global(tmp_path: Path) -> None:
    script = tmp_path / "cell.py"
    script.write_text(MAIN_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "'cached'" in out["lru"] and "lru_cache" in out["lru"] and "__wrapped__" in out["lru"]
    assert "global 'lock'" in out["global"] and "uses_global" in out["global"]
    assert "lock" in out["global"].split("type ")[1]
    assert out["wrapped"] == [0, 2, 4]
    import psutil

    assert not [p for p in out["pids"] if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
