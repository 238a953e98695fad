"""The Dask backend against plain dask on the same cluster: ``python -m benchmarks.dask_backend``.

One LocalCluster (2 worker processes x 1 thread, on 127.0.0.1); each row runs orchestra's
``map`` on ``Pool(backend=client)`` and dask's own ``client.map`` + ``client.gather`` on it,
alternating, ``--repeat`` times, and prints the medians (and min-max) as a markdown table:

* 10,000 tiny tasks (``x + 1``), orchestra with an event subscriber (per-item events on);
* 100 tasks of 50 ms (``time.sleep``);
* the lag of an asyncio loop that awaits the work (a 1 ms ticker's lateness, p99 and max):
  orchestra's ``await pool.map(...)`` against dask's asynchronous client awaiting
  ``client.gather`` on the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import distributed

import orchestra_nb as orchestra


def tiny(x: int) -> int:
    return x + 1


def sleepy(x: int) -> int:
    time.sleep(0.05)
    return x


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def lag_while(work: Coroutine[Any, Any, object], interval: float = 0.001) -> tuple[float, float]:
    """p99 and max lateness (s) of a ``interval`` ticker while ``work`` is awaited."""
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        while not stop:
            t0 = time.perf_counter()
            await asyncio.sleep(interval)
            lags.append(time.perf_counter() - t0 - interval)

    tick = asyncio.create_task(ticker())
    try:
        await work
    finally:
        stop = True
        await tick
    lags.sort()
    return lags[int(0.99 * (len(lags) - 1))], lags[-1]


def fmt(values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    med = statistics.median(values) * scale
    return f"{med:.3g} {unit} ({min(values) * scale:.3g}-{max(values) * scale:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tiny", type=int, default=10_000)
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}

    def add(row: str, system: str, value: float) -> None:
        rows.setdefault(row, {}).setdefault(system, []).append(value)

    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        pool = orchestra.Pool(backend=client)
        pool.wait_started(timeout=60)
        events = [0]
        sub = pool.subscribe(lambda e: events.__setitem__(0, events[0] + 1))
        n = args.tiny
        # Warm-up: both paths load the functions on the workers once.
        pool.map(tiny, range(100)).result(60)
        client.gather(client.map(tiny, range(100), pure=False))
        for _ in range(args.repeat):
            add(f"{n:,} tiny tasks", "orchestra", timed(lambda: pool.map(tiny, range(n)).result(600)))
            add(
                f"{n:,} tiny tasks",
                "dask",
                timed(lambda: client.gather(client.map(tiny, range(n), pure=False))),
            )
            add("100 tasks of 50 ms", "orchestra", timed(lambda: pool.map(sleepy, range(100)).result(600)))
            add(
                "100 tasks of 50 ms",
                "dask",
                timed(lambda: client.gather(client.map(sleepy, range(100), pure=False))),
            )

        async def orchestra_lag(items: range, fn: Callable[[int], int]) -> tuple[float, float]:
            return await lag_while(_await(pool.map(fn, items)))

        async def dask_lag(items: range, fn: Callable[[int], int]) -> tuple[float, float]:
            async with distributed.Client(cluster.scheduler_address, asynchronous=True) as aclient:
                return await lag_while(aclient.gather(aclient.map(fn, items, pure=False)))

        for _ in range(args.repeat):
            for label, items, fn in ((f"{n:,} tiny", range(n), tiny), ("100 x 50 ms", range(100), sleepy)):
                p99, worst = asyncio.run(orchestra_lag(items, fn))
                add(f"loop lag p99, awaiting {label}", "orchestra", p99)
                add(f"loop lag max, awaiting {label}", "orchestra", worst)
                p99, worst = asyncio.run(dask_lag(items, fn))
                add(f"loop lag p99, awaiting {label}", "dask", p99)
                add(f"loop lag max, awaiting {label}", "dask", worst)
        sub.close()
        with contextlib.suppress(Exception):
            pool.shutdown()
    print(
        f"| workload | orchestra (Dask backend) | dask client.map/gather |  (median, min-max of "
        f"{args.repeat}; events seen by the subscriber: {events[0]:,})"
    )
    print("|---|---|---|")
    for row, systems in rows.items():
        lag = row.startswith("loop lag")
        scale, unit = (1000.0, "ms") if lag else (1.0, "s")
        print(f"| {row} | {fmt(systems['orchestra'], scale, unit)} | {fmt(systems['dask'], scale, unit)} |")


async def _await(handle: Any) -> object:
    return await handle


if __name__ == "__main__":
    main()
