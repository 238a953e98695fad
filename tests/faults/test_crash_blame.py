"""Crash blame on a fresh pool: only the item that kills its workers fails, every time.

A worker runs several short chunks back to back; when it dies, a result it sent just
before may never arrive, so the pool cannot tell which of the chunks it had sent was
running. It blames none of them: each is rerun alone on a worker, and only an item that
kills a worker while running alone counts a crash.
"""

from __future__ import annotations

import os

import pytest

import orchestra_nb as orchestra

pytestmark = pytest.mark.timeout(300)

RUNS = 20


def crashy(i: int) -> int:
    if i == 5:
        os._exit(1)
    return i


def test_only_the_crashing_item_fails_on_fresh_pools() -> None:
    blamed = []
    for _ in range(RUNS):
        with orchestra.Pool(workers=2) as pool:  # fresh: no timing estimate of crashy yet
            handle = pool.map(crashy, range(20), return_exceptions=True)
            results = handle.result(120)
            failed = sorted(handle.exceptions())
            blamed.append(failed)
            assert all(isinstance(results[i], orchestra.WorkerCrashedError) for i in failed)
            assert [r for i, r in enumerate(results) if i not in failed] == [
                i for i in range(20) if i not in failed
            ]
    assert blamed == [[5]] * RUNS, blamed
