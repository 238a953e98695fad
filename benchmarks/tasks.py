"""Task functions shipped to workers.

They live in an importable module (not ``__main__``) so that every system, including the
ones that pickle functions by reference, can run them; the ``__main__`` cases of workload 8
are built separately in :mod:`benchmarks.mainfuncs`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def inc(x: int) -> int:
    return x + 1


def apply_chunk(fn: Callable[[Any], Any], xs: list[Any]) -> list[Any]:
    """Manual chunking for systems without a chunksize option (dask)."""
    return [fn(x) for x in xs]


def nap(seconds: float) -> int:
    """Occupies one worker for a while, so that warming up reaches every worker."""
    time.sleep(seconds)
    return os.getpid()


def burn(n: int) -> int:
    """Pure-Python CPU work; holds the GIL the whole time."""
    acc = 0
    for i in range(n):
        acc = (acc + i * i) % 1_000_003
    return acc


def calibrate_burn(seconds: float) -> int:
    """Loop count for which :func:`burn` takes about ``seconds`` here."""
    n = 200_000
    while True:
        t0 = time.perf_counter()
        burn(n)
        dt = time.perf_counter() - t0
        if dt > 0.05:
            return max(1, int(n * seconds / dt))
        n *= 4


def array_sum(a: Any) -> float:
    return float(a.sum())


def make_array(n: int) -> Any:
    import numpy as np  # imported here so workers that never see arrays stay light

    return np.ones(n, dtype=np.float64)


def slice_sum(big: Any, i: int, parts: int) -> float:
    """Broadcast argument: item ``i`` of ``parts`` sums its share of the one big array."""
    size = len(big) // parts
    return float(big[i * size : (i + 1) * size].sum())


def monte_carlo(seed: int, samples: int, block: int = 250_000) -> float:
    """Realistic CPU work: a numpy estimate of pi from ``samples`` random points, drawn in
    blocks so that a task's memory stays small whatever its length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    inside = 0
    for start in range(0, samples, block):
        n = min(block, samples - start)
        x = rng.random(n)
        y = rng.random(n)
        inside += int(np.count_nonzero(x * x + y * y <= 1.0))
    return 4.0 * inside / samples
