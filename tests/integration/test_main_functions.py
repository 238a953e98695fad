"""Functions, lambdas, closures and classes from ``__main__`` (a notebook's cells).

A test module is not ``__main__``, so each test runs a small script as ``__main__`` in a
subprocess: it starts a pool, *then* defines things (as later cells would), uses them, shuts
its pool down and prints JSON that the test checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

PRELUDE = textwrap.dedent(
    """
    import asyncio, json, os, sys
    import orchestra_nb as orchestra

    pool = orchestra.Pool(workers=2)
    pool.wait_started(60)
    out = {"pids": pool.worker_pids()}
    T = 60
    """
)


def run_cells(tmp_path: Path, body: str) -> dict:
    script = tmp_path / "notebook.py"
    script.write_text(PRELUDE + textwrap.dedent(body) + "\npool.shutdown()\nprint(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    alive = [p for p in out["pids"] if _alive(p)]
    assert not alive, f"workers left alive by the script: {alive}"
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(120)
def test_functions_lambdas_closures_defined_after_start(tmp_path: Path) -> None:
    out = run_cells(tmp_path, """
        # cells run after the pool started
        def triple(x):
            return x * 3

        offset = 100

        def shifted(x):
            return triple(x) + offset

        def make_scaler(k):
            def scale(x):
                return x * k + offset
            return scale

        out["def"] = pool.map(triple, range(5)).result(T)
        out["globals"] = pool.map(shifted, range(3)).result(T)
        out["lambda"] = pool.map(lambda x: x + 1, range(5)).result(T)
        out["closure"] = pool.run(make_scaler(10), 2).result(T)
        out["star_lambda"] = pool.map(lambda a, b: a * b, [1, 2], [3, 4]).result(T)

        async def coro(x):
            await asyncio.sleep(0)
            return -x
        out["async_def"] = pool.map(coro, range(3)).result(T)

        def triple(x):
            return x * 1000
        out["redefined"] = pool.map(triple, range(3)).result(T)
        offset = 7
        out["new_global"] = pool.run(shifted, 1).result(T)

        async def cell():
            return await pool.map(lambda x: x * x, range(4))
        out["awaited"] = asyncio.run(cell())
    """)
    assert out["def"] == [0, 3, 6, 9, 12]
    assert out["globals"] == [100, 103, 106]
    assert out["lambda"] == [1, 2, 3, 4, 5]
    assert out["closure"] == 120
    assert out["star_lambda"] == [3, 8]
    assert out["async_def"] == [0, -1, -2]
    assert out["redefined"] == [0, 1000, 2000]
    assert out["new_global"] == 1007
    assert out["awaited"] == [0, 1, 4, 9]


@pytest.mark.timeout(120)
def test_cell_classes_and_instances_round_trip(tmp_path: Path) -> None:
    out = run_cells(tmp_path, """
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def norm2(self):
                return self.x ** 2 + self.y ** 2
            def __eq__(self, other):
                return type(other) is Point and (self.x, self.y) == (other.x, other.y)

        class CellError(Exception):
            pass

        def fail(x):
            raise CellError(f"cell error {x}")

        p = pool.run(lambda a, b: Point(a, b), 3, 4).result(T)      # made in a worker
        out["made_type_is"] = type(p) is Point
        out["made_norm"] = p.norm2()
        back = pool.run(lambda q: Point(q.x * 2, q.y * 2), Point(1, 2)).result(T)
        out["round_trip"] = type(back) is Point and back == Point(2, 4)
        out["method"] = pool.run(Point(5, 12).norm2).result(T)    # a bound method
        out["isinstance_in_worker"] = pool.run(lambda q: type(q).__name__, Point(0, 0)).result(T)
        pts = pool.map(lambda i: Point(i, -i), range(50)).result(T)
        out["many"] = all(type(q) is Point for q in pts) and pts[7] == Point(7, -7)
        out["class_itself"] = pool.run(lambda cls: cls(1, 1).norm2(), Point).result(T)
        try:
            pool.run(fail, 9).result(T)
        except CellError as exc:
            out["caught"] = [type(exc) is CellError, str(exc), type(exc.__cause__).__name__]
        res = pool.map(fail, range(2), return_exceptions=True).result(T)
        out["returned"] = [type(r) is CellError for r in res]
    """)
    assert out["made_type_is"] is True
    assert out["made_norm"] == 25
    assert out["round_trip"] is True
    assert out["method"] == 169
    assert out["isinstance_in_worker"] == "Point"
    assert out["many"] is True
    assert out["class_itself"] == 2
    assert out["caught"] == [True, "cell error 9", "RemoteTraceback"]
    assert out["returned"] == [True, True]
