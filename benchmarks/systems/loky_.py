"""loky's reusable executor (cloudpickle, spawn-like 'loky' start method)."""

from __future__ import annotations

from typing import TypeVar

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

    @staticmethod
    def cold_code() -> str:
        return (
            "from loky import get_reusable_executor\n"
            f"ex = get_reusable_executor(max_workers={WORKERS})\n"
            "first = ex.submit(abs, -1).result()\n"
            "def cleanup(): ex.shutdown(wait=True, kill_workers=True)\n"
        )
