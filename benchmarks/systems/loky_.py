"""loky's reusable executor (cloudpickle, spawn-like 'loky' start method)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from benchmarks.systems.base import WORKERS, System, await_cf

T = TypeVar("T")


class Loky(System):
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

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.ex.submit(fn, *args).result(timeout)

    def map(
        self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None
    ) -> list[T]:
        return list(self.ex.map(fn, items, chunksize=chunksize or 1))

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        futs = [self.ex.submit(fn, x) for x in items]
        return [f.result() for f in futs]

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        return self.ex.map(fn, items, chunksize=chunksize)

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await await_cf(self.ex.submit(fn, *args))
