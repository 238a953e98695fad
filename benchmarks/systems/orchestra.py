"""orchestra_nb, through its public API only (``Pool``, ``run``, ``map``, handles).

Measured through ``await`` (the notebook path): every operation runs on this adapter's own
event loop, which stands in for the kernel's loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from benchmarks.systems.base import WORKERS, System

T = TypeVar("T")


class Orchestra(System):
    key = "orchestra"
    label = "orchestra_nb"
    requires = ("orchestra_nb",)
    prefer_async = True
    # asyncio is already imported in a notebook kernel, so it is not part of the clock.
    cold_preamble = "import asyncio\n"

    def start(self) -> None:
        self.pool = self.aio(self.open_pool())

    @staticmethod
    async def open_pool() -> Any:
        """A pool made inside a running loop (as in a notebook cell), warm on return."""
        try:
            import orchestra_nb as orchestra

            orchestra.Pool  # noqa: B018  # the package may exist before its API does
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"import: {exc}") from exc
        pool = orchestra.Pool(workers=WORKERS)
        await pool.started()
        return pool

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            self.aio(asyncio.wait_for(pool.aclose(), 60))

    @staticmethod
    def cold_code() -> str:
        return (
            "import orchestra_nb as orchestra\n"
            "async def _cold():\n"
            f"    pool = orchestra.Pool(workers={WORKERS})\n"
            "    return pool, await pool.run(abs, -1)\n"
            "_loop = asyncio.new_event_loop()\n"
            "pool, first = _loop.run_until_complete(_cold())\n"
            "def cleanup(): _loop.run_until_complete(pool.aclose()); _loop.close()\n"
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.pool.run(fn, *args).result(timeout)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]:
        return list(self.pool.map(fn, items, chunksize=chunksize).result())

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        handles = [self.pool.run(fn, x) for x in items]
        return [h.result() for h in handles]

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        raise NotImplementedError("orchestra streams through `async for`")

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.pool.run(fn, *args)

    async def amap(self, fn: Callable[[Any], T], items: Sequence[Any], chunksize: int | None = None) -> list[T]:
        return list(await self.pool.map(fn, items, chunksize=chunksize))

    async def asubmit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        return list(await asyncio.gather(*[self.pool.run(fn, x) for x in items]))

    broadcast_how = (
        "its default map (adaptive chunks): a large argument or captured array is written once per map "
        "into a shared-memory segment every worker maps"
    )

    def broadcast(self, fn: Callable[..., float], big: Any, parts: int, captured: bool) -> list[float]:
        async def run() -> list[float]:
            if captured:
                return list(await self.pool.map(functools.partial(fn, big, parts=parts), range(parts)))
            bound = functools.partial(fn, parts=parts)
            return list(await self.pool.map(bound, [big] * parts, range(parts)))

        return self.aio(run())

    async def astream_sum(
        self, fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int
    ) -> tuple[int, Any]:
        # Default settings: the point is the bounded in-flight submission of a generator.
        n, total = 0, 0
        async for v in self.pool.map(fn, items):
            n += 1
            total += v
        return n, total
