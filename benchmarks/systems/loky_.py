"""loky's reusable executor (cloudpickle, spawn-like 'loky' start method)."""

from __future__ import annotations

import functools
import sys
from typing import Any, TypeVar

from benchmarks.systems.base import WORKERS, FuturesExecutorSystem

T = TypeVar("T")


class Loky(FuturesExecutorSystem):
    key = "loky"
    label = "loky"
    requires = ("loky",)

    def start(self) -> None:
        from loky import get_reusable_executor

        self.ex = get_reusable_executor(max_workers=WORKERS, timeout=600)
        self.warm()

    def close(self) -> None:
        ex = getattr(self, "ex", None)
        if ex is not None:
            ex.shutdown(wait=True, kill_workers=True)
        if "joblib" in sys.modules:  # joblib's own reusable executor outlives its calls
            from joblib.externals.loky import reusable_executor

            executor = getattr(reusable_executor, "_executor", None)
            if executor is not None:
                executor.shutdown(wait=True, kill_workers=True)

    @staticmethod
    def cold_code() -> str:
        return (
            "from loky import get_reusable_executor\n"
            f"ex = get_reusable_executor(max_workers={WORKERS})\n"
            "first = ex.submit(abs, -1).result()\n"
            "def cleanup(): ex.shutdown(wait=True, kill_workers=True)\n"
        )

    broadcast_how = (
        "joblib.Parallel(n_jobs=2), loky backend, automatic memmapping (max_nbytes='1M'): an "
        "array argument is dumped once to a memory-mapped file the workers map; a captured "
        "one is pickled with the function"
    )

    def broadcast(self, fn: Any, big: Any, parts: int, captured: bool) -> list[float]:
        import joblib

        with joblib.parallel_config(backend="loky"):
            run = joblib.Parallel(n_jobs=WORKERS)
            if captured:
                bound = functools.partial(fn, big, parts=parts)
                return list(run(joblib.delayed(bound)(i) for i in range(parts)))
            return list(run(joblib.delayed(fn)(big, i, parts) for i in range(parts)))

    def broadcast_warm(self) -> None:
        import joblib

        joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(abs)(-i) for i in range(20))
