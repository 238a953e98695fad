"""ipyparallel: a local Cluster of 2 engines, load-balanced view."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from benchmarks.systems.base import WORKERS, System, await_cf

T = TypeVar("T")


class IPyParallel(System):
    key = "ipyparallel"
    label = "ipyparallel"
    requires = ("ipyparallel",)
    slow = True

    def start(self) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=WORKERS, log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(WORKERS, timeout=120)
        self.view = self.rc.load_balanced_view()
        self.warm()

    def close(self) -> None:
        rc = getattr(self, "rc", None)
        if rc is not None:
            rc.close()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.stop_cluster_sync()

    @staticmethod
    def cold_code() -> str:
        return (
            "import ipyparallel as ipp\n"
            f"cluster = ipp.Cluster(n={WORKERS}, log_level=40)\n"
            "rc = cluster.start_and_connect_sync()\n"
            f"rc.wait_for_engines({WORKERS}, timeout=120)\n"
            "first = rc.load_balanced_view().apply_sync(abs, -1)\n"
            "def cleanup(): rc.close(); cluster.stop_cluster_sync()\n"
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.view.apply_async(fn, *args).get(timeout)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]:
        return list(self.view.map_sync(fn, list(items), chunksize=chunksize or 1))

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        ars = [self.view.apply_async(fn, x) for x in items]
        return [ar.get() for ar in ars]

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        # map needs a sequence: the whole input is materialised up front.
        return iter(self.view.map_async(fn, list(items), chunksize=chunksize))

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await await_cf(self.view.apply_async(fn, *args))

    async def amap(self, fn: Callable[[Any], T], items: Sequence[Any], chunksize: int | None = None) -> list[T]:
        return list(await await_cf(self.view.map_async(fn, list(items), chunksize=chunksize or 1)))

    async def asubmit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        import asyncio

        return list(await asyncio.gather(*[await_cf(self.view.apply_async(fn, x)) for x in items]))
