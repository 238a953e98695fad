"""Assertions shared by the fault-tolerance tests.

A module of its own, not conftest.py: ``from conftest import ...`` resolves to whichever
conftest.py was imported first, which in a run of the whole suite is tests/conftest.py.
"""

from __future__ import annotations

import orchestra_nb as orchestra
from orchestra_nb import TaskState


def square(x: int) -> int:
    return x * x


def assert_serves(pool: orchestra.Pool, n: int = 50) -> None:
    """The pool runs a fresh map correctly and holds no task RUNNING/PENDING anywhere."""
    assert pool.map(square, range(n)).result(timeout=30) == [x * x for x in range(n)]
    pool.wait_started(timeout=30)  # replacements of crashed workers are ready
    status = pool.status()
    assert status["state"] == "running"
    assert status["jobs"] == []
    alive = [w for w in status["workers"] if w["state"] == "ready"]
    assert len(alive) == pool.workers, status


def assert_all_final(handle: object) -> None:
    counts = handle.counts()  # type: ignore[attr-defined]
    assert counts[TaskState.RUNNING] == 0, counts
    assert counts[TaskState.PENDING] == 0, counts
    assert counts[TaskState.RETRYING] == 0, counts
