"""dask.distributed: LocalCluster with 2 single-threaded worker processes.

dask has no chunksize: "chunksize=N" is done by hand (one task per chunk of N items).
The async forms bridge the synchronous Client to the caller's loop through a thread, as a
notebook user does with a Client made without ``asynchronous=True``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

from benchmarks import tasks
from benchmarks.systems.base import WORKERS, System

T = TypeVar("T")


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class Dask(System):
    key = "dask"
    label = "dask.distributed"
    requires = ("distributed",)
    slow = True

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        )
        self.client = Client(self.cluster)
        self.client.wait_for_workers(WORKERS)
        self.warm()

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            cluster.close()

    @staticmethod
    def cold_code() -> str:
        return (
            "from distributed import Client, LocalCluster\n"
            f"cluster = LocalCluster(n_workers={WORKERS}, threads_per_worker=1, processes=True,"
            " dashboard_address=None)\n"
            "client = Client(cluster)\n"
            "first = client.submit(abs, -1).result()\n"
            "def cleanup(): client.close(); cluster.close()\n"
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.client.submit(fn, *args, pure=False).result(timeout)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]:
        if not chunksize or chunksize == 1:
            return self.client.gather(self.client.map(fn, list(items), pure=False))
        chunks = list(_chunks(items, chunksize))
        futs = self.client.map(tasks.apply_chunk, [fn] * len(chunks), chunks, pure=False)
        return [v for chunk in self.client.gather(futs) for v in chunk]

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        futs = [self.client.submit(fn, x, pure=False) for x in items]
        return self.client.gather(futs)

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        chunks = list(_chunks(items, chunksize))
        futs = self.client.map(tasks.apply_chunk, [fn] * len(chunks), chunks, pure=False)
        for f in futs:
            yield from f.result()

    # Captured, the array travels with every task (100 x 256 MB held by the workers at once:
    # 10 GB each when tried), so only dask's own idiom is measured.
    broadcast_forms = ("argument",)
    broadcast_how = (
        "argument only: client.scatter(array, broadcast=True), then client.map (dask's idiom); "
        "captured, the array travels with every task (tried: 10 GB per worker)"
    )

    def broadcast(self, fn: Callable[..., float], big: Any, parts: int, captured: bool) -> list[float]:
        client = self.client
        if captured:
            raise NotImplementedError("dask is measured with the array scattered only")
        shared = client.scatter(big, broadcast=True)
        try:
            return list(client.gather(client.map(fn, [shared] * parts, range(parts), parts=parts, pure=False)))
        finally:
            client.cancel(shared)

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        # A sync Client's future is not awaitable; waiting on it in a thread is the bridge.
        return await asyncio.to_thread(self.call, fn, *args)

    async def asubmit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        return await asyncio.to_thread(self.submit_many, fn, items)
