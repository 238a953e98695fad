"""Fingerprints: stable across processes, changed by every edit that can change a result,
unchanged by edits that cannot."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestra_nb._fingerprint import (
    FingerprintError,
    call_fingerprint,
    call_fingerprints,
    function_fingerprint,
    value_fingerprint,
)

NOTEBOOK = textwrap.dedent("""\
    import math
    import numpy as np

    SCALE = 3

    def helper(x):
        return x * SCALE

    def task(x, offset=1):
        return helper(x) + offset + math.floor(np.sum([x]))
    """)


def fingerprint_in_new_process(tmp_path: Path, source: str, expr: str = "task", *,
                               hash_seed: str = "1") -> str:
    """The fingerprint of ``expr`` evaluated in a fresh interpreter running ``source`` as
    ``__main__`` (as a notebook's functions are)."""
    script = tmp_path / f"nb_{abs(hash((source, expr, hash_seed)))}.py"
    script.write_text(source + textwrap.dedent(f"""
        from orchestra_nb._fingerprint import function_fingerprint, value_fingerprint
        value = {expr}
        print((function_fingerprint(value) if callable(value) else value_fingerprint(value)).hex())
        """))
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_same_code_in_a_new_process_gives_the_same_key(tmp_path: Path) -> None:
    first = fingerprint_in_new_process(tmp_path, NOTEBOOK, hash_seed="1")
    second = fingerprint_in_new_process(tmp_path, NOTEBOOK, hash_seed="2")
    assert first == second and len(first) == 64


def test_unrelated_cells_and_moved_code_keep_the_key(tmp_path: Path) -> None:
    base = fingerprint_in_new_process(tmp_path, NOTEBOOK)
    unrelated = "UNUSED = [1, 2, 3]\n\ndef other(y):\n    return y - 1\n\n"
    assert fingerprint_in_new_process(tmp_path, unrelated + NOTEBOOK + "UNUSED = 5\n") == base
    # Blank lines and comments move the functions' line numbers: still the same key.
    shifted = NOTEBOOK.replace("def task", "# a comment\n\n\ndef task")
    assert fingerprint_in_new_process(tmp_path, shifted) == base


@pytest.mark.parametrize(("label", "edit"), [
    ("constant", ("+ offset +", "+ offset + 2 +")),
    ("default", ("offset=1", "offset=2")),
    ("global value", ("SCALE = 3", "SCALE = 4")),
    ("helper", ("return x * SCALE", "return x * SCALE * 1.0")),
])
def test_every_relevant_edit_changes_the_key(tmp_path: Path, label: str, edit: tuple[str, str]) -> None:
    old, new = edit
    assert old in NOTEBOOK
    changed = NOTEBOOK.replace(old, new)
    base = fingerprint_in_new_process(tmp_path, NOTEBOOK)
    assert fingerprint_in_new_process(tmp_path, changed) != base, label


def test_a_changed_closure_changes_the_key() -> None:
    def make(k: int) -> Any:
        def scaled(x: int) -> int:
            return x * k
        return scaled

    assert function_fingerprint(make(2)) == function_fingerprint(make(2))
    assert function_fingerprint(make(2)) != function_fingerprint(make(3))


def test_keyword_only_defaults_count() -> None:
    def a(x: int, *, k: int = 1) -> int:
        return x + k

    def b(x: int, *, k: int = 2) -> int:
        return x + k

    assert function_fingerprint(a) != function_fingerprint(b)


def test_lambda_and_def_with_the_same_body_agree() -> None:
    square = lambda x: x * x  # noqa: E731

    def square_def(x: Any) -> Any:
        return x * x

    cube = lambda x: x * x * x  # noqa: E731
    assert function_fingerprint(square) == function_fingerprint(square_def)
    assert function_fingerprint(square) != function_fingerprint(cube)


def test_library_functions_count_by_module_and_version(tmp_path: Path) -> None:
    # A library function as the task, or as a global the task uses: a reference, not its code.
    assert function_fingerprint(math.sqrt) == function_fingerprint(math.sqrt)
    assert function_fingerprint(math.sqrt) != function_fingerprint(math.floor)
    assert fingerprint_in_new_process(tmp_path, "import numpy as np\n", "np.linalg.norm") == \
        function_fingerprint(np.linalg.norm).hex()


def test_a_notebook_class_counts_by_its_code(tmp_path: Path) -> None:
    source = textwrap.dedent("""\
        class Point:
            def __init__(self, x):
                self.x = x
            def norm(self):
                return abs(self.x)
        """)
    use = "Point(3)"
    base = fingerprint_in_new_process(tmp_path, source, use)
    assert fingerprint_in_new_process(tmp_path, source, use, hash_seed="7") == base
    assert fingerprint_in_new_process(tmp_path, source.replace("abs(self.x)", "self.x"), use) != base
    assert fingerprint_in_new_process(tmp_path, source, "Point(4)") != base


def test_recursive_helpers_terminate() -> None:
    def even(n: int) -> bool:
        return n == 0 or odd(n - 1)

    def odd(n: int) -> bool:
        return n != 0 and even(n - 1)

    globals()["even"], globals()["odd"] = even, odd
    try:
        assert function_fingerprint(even) == function_fingerprint(even)
    finally:
        del globals()["even"], globals()["odd"]


def test_numpy_arrays_hash_by_content() -> None:
    a = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert value_fingerprint(a) == value_fingerprint(a.copy())
    assert value_fingerprint(a.T) == value_fingerprint(np.ascontiguousarray(a.T))  # layout is not content
    assert value_fingerprint(a) != value_fingerprint(a.astype(np.int32))  # dtype
    assert value_fingerprint(a) != value_fingerprint(a.reshape(4, 3))  # shape
    b = a.copy()
    b[2, 3] += 1
    assert value_fingerprint(a) != value_fingerprint(b)  # one element
    assert value_fingerprint({"w": a}) == value_fingerprint({"w": a.copy()})  # nested


def test_pandas_like_objects_hash_by_their_arrays() -> None:
    class Frame:  # holds its columns as arrays, in a dict, like a DataFrame's block manager
        def __init__(self, columns: dict[str, Any]) -> None:
            self.columns = columns

    one = Frame({"a": np.ones(5), "b": np.zeros(5)})
    same = Frame({"b": np.zeros(5), "a": np.ones(5)})
    other = Frame({"a": np.ones(5), "b": np.full(5, 2.0)})
    assert value_fingerprint(one) == value_fingerprint(same)
    assert value_fingerprint(one) != value_fingerprint(other)


def test_dicts_and_sets_are_order_independent(tmp_path: Path) -> None:
    assert value_fingerprint({"a": 1, "b": 2}) == value_fingerprint({"b": 2, "a": 1})
    assert value_fingerprint({"a": 1, "b": 2}) != value_fingerprint({"a": 1, "b": 3})
    assert value_fingerprint([{"x", "y"}]) == value_fingerprint([{"y", "x"}])
    assert value_fingerprint({1, 2}) != value_fingerprint(frozenset({1, 2}))
    # String hashing differs between processes; a set of strings must not.
    expr = "{'alpha', 'beta', 'gamma', 'delta'}"
    assert fingerprint_in_new_process(tmp_path, "", expr, hash_seed="1") == \
        fingerprint_in_new_process(tmp_path, "", expr, hash_seed="99")


def test_equal_values_hash_alike_shared_or_not() -> None:
    part = [1, 2, 3]
    assert value_fingerprint([part, part]) == value_fingerprint([[1, 2, 3], [1, 2, 3]])


def test_types_are_told_apart() -> None:
    keys = {value_fingerprint(v) for v in (1, 1.0, True, "1", b"1", (1,), [1])}
    assert len(keys) == 7


def test_partial_and_bound_methods() -> None:
    assert function_fingerprint(functools.partial(pow, 2)) != function_fingerprint(functools.partial(pow, 3))

    class Scaler:
        def __init__(self, k: int) -> None:
            self.k = k

        def apply(self, x: int) -> int:
            return x * self.k

    assert function_fingerprint(Scaler(2).apply) == function_fingerprint(Scaler(2).apply)
    assert function_fingerprint(Scaler(2).apply) != function_fingerprint(Scaler(3).apply)


def test_unfingerprintable_arguments_are_named() -> None:
    key = function_fingerprint(abs)
    with pytest.raises(FingerprintError, match=r"argument 1 \(type lock\)"):
        call_fingerprint(key, (1, threading.Lock()))
    with pytest.raises(FingerprintError, match=r"keyword argument 'guard' \(type lock\)"):
        call_fingerprint(key, (1,), {"guard": threading.Lock()})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(FingerprintError, match="argument 0"):
        call_fingerprint(key, (loop,))


def test_an_unfingerprintable_global_is_named() -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(FingerprintError, match=r"uses_lock.*closure variable 'lock'"):
        function_fingerprint(uses_lock)


def test_keyword_order_does_not_matter() -> None:
    key = function_fingerprint(abs)
    assert call_fingerprint(key, (), {"a": 1, "b": 2}) == call_fingerprint(key, (), {"b": 2, "a": 1})
    assert call_fingerprint(key, (1,)) != call_fingerprint(key, (), {"x": 1})


def test_the_batch_fast_path_gives_the_same_keys() -> None:
    key = function_fingerprint(abs)
    calls: list[tuple[tuple[Any, ...], dict[str, Any] | None]] = [
        ((1,), None), (("a",), None), ((1.5,), None), ((None,), None), (((1, 2),), None),
        ((1, 2), None), ((), {"x": 1}), ((3,), {"y": [1]}),
    ]
    assert list(call_fingerprints(key, calls)) == [call_fingerprint(key, a, k) for a, k in calls]
    assert len(set(call_fingerprints(key, calls))) == len(calls)
