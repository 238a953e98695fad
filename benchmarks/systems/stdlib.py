"""Standard-library peers: ProcessPoolExecutor and multiprocessing.Pool.

forkserver is the measured start method (a notebook tool cannot fork, see performance.md);
the fork variants are reference rows only.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, ClassVar, TypeVar

from benchmarks.systems.base import WORKERS, FuturesExecutorSystem, System, await_callback

T = TypeVar("T")


class _PPE(FuturesExecutorSystem):
    method: ClassVar[str]

    def start(self) -> None:
        self.ex = ProcessPoolExecutor(WORKERS, mp_context=mp.get_context(self.method))
        self.warm()

    def close(self) -> None:
        ex = getattr(self, "ex", None)
        if ex is None:
            return
        # A hung or broken pool must not hang the run: kill the workers first, then shut down.
        procs = list((getattr(ex, "_processes", None) or {}).values())
        if getattr(ex, "_broken", False) or self.hung:
            for p in procs:
                p.kill()
        ex.shutdown(wait=True, cancel_futures=True)

    @classmethod
    def cold_code(cls) -> str:
        return (
            "import multiprocessing as mp\n"
            "from concurrent.futures import ProcessPoolExecutor\n"
            f"ex = ProcessPoolExecutor({WORKERS}, mp_context=mp.get_context({cls.method!r}))\n"
            "first = ex.submit(abs, -1).result()\n"
            "def cleanup(): ex.shutdown()\n"
        )


class PPEForkserver(_PPE):
    key = "ppe_forkserver"
    label = "ProcessPoolExecutor (forkserver)"
    method = "forkserver"


class PPEFork(_PPE):
    key = "ppe_fork"
    label = "ProcessPoolExecutor (fork, reference)"
    method = "fork"
    reference = True


class _MPPool(System):
    method: ClassVar[str]

    def start(self) -> None:
        self.pool = mp.get_context(self.method).Pool(WORKERS)
        self.warm()

    def close(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            # terminate(): close()+join() hangs forever if a task never finished.
            pool.terminate()
            pool.join()

    @classmethod
    def cold_code(cls) -> str:
        return (
            "import multiprocessing as mp\n"
            f"pool = mp.get_context({cls.method!r}).Pool({WORKERS})\n"
            "first = pool.apply(abs, (-1,))\n"
            "def cleanup(): pool.terminate(); pool.join()\n"
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        return self.pool.apply_async(fn, args).get(timeout)

    def map(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int | None = None) -> list[T]:
        return self.pool.map(fn, items, chunksize=chunksize)

    def submit_many(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        rs = [self.pool.apply_async(fn, (x,)) for x in items]
        return [r.get() for r in rs]

    def stream(self, fn: Callable[[Any], T], items: Iterable[Any], chunksize: int) -> Iterator[T]:
        return self.pool.imap(fn, items, chunksize=chunksize)

    def starmap(self, fn: Callable[..., T], args: Sequence[tuple[Any, ...]], chunksize: int) -> list[T]:
        return self.pool.starmap(fn, args, chunksize=chunksize)

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        def register(ok: Callable[[Any], None], err: Callable[[BaseException], None]) -> None:
            self.pool.apply_async(fn, args, callback=ok, error_callback=err)

        result: T = await await_callback(register)
        return result

    async def amap(self, fn: Callable[[Any], T], items: Sequence[Any], chunksize: int | None = None) -> list[T]:
        def register(ok: Callable[[Any], None], err: Callable[[BaseException], None]) -> None:
            self.pool.map_async(fn, items, chunksize, callback=ok, error_callback=err)

        result: list[T] = await await_callback(register)
        return result


class MPPoolForkserver(_MPPool):
    key = "mp_pool"
    label = "multiprocessing.Pool (forkserver)"
    method = "forkserver"


class MPPoolFork(_MPPool):
    key = "mp_pool_fork"
    label = "multiprocessing.Pool (fork, reference)"
    method = "fork"
    reference = True


__all__ = ["MPPoolFork", "MPPoolForkserver", "PPEFork", "PPEForkserver"]
