"""What a composite costs: a 3-step ``Sequence`` of maps against the same maps awaited by hand.

``python -m benchmarks.pipelines [--items 10000] [--repeat 15]`` from the repository root.

Both forms run the same three maps over ``--items`` items on one warm 2-worker pool::

    by hand:    a = await pool.map(f1, xs); b = await pool.map(f2, a); c = await pool.map(f3, b)
    composite:  c = await Sequence(Map(f1, xs), Map(f2), Map(f3)).run(pool)

The two forms alternate, repetition by repetition, so that the machine's drift hits both
alike; the figure is the difference of the medians divided by the three steps. Also timed:
the same with a blocking ``result()`` instead of ``await``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import orchestra_nb as orchestra
from orchestra_nb import Map, Sequence


def f1(x: int) -> int:
    return x + 1


def f2(x: int) -> int:
    return x * 2


def f3(x: int) -> int:
    return x - 3


async def by_hand_async(pool: orchestra.Pool, xs: list[int]) -> list[int]:
    a = await pool.map(f1, xs)
    b = await pool.map(f2, a)
    return await pool.map(f3, b)


async def composite_async(pool: orchestra.Pool, xs: list[int]) -> Any:
    return await Sequence(Map(f1, xs), Map(f2), Map(f3)).run(pool)


def by_hand_sync(pool: orchestra.Pool, xs: list[int]) -> list[int]:
    a = pool.map(f1, xs).result()
    b = pool.map(f2, a).result()
    return pool.map(f3, b).result()


def composite_sync(pool: orchestra.Pool, xs: list[int]) -> Any:
    return Sequence(Map(f1, xs), Map(f2), Map(f3)).run(pool).result()


def measure(items: int, repeat: int) -> dict[str, list[float]]:
    xs = list(range(items))
    expected = [(x + 1) * 2 - 3 for x in xs]
    times: dict[str, list[float]] = {
        k: [] for k in ("hand await", "composite await", "hand result()", "composite result()")
    }
    with orchestra.Pool(workers=2) as pool:
        pool.wait_started(60)

        async def run_async() -> None:
            for rep in range(repeat + 2):  # the first two warm the chunk-size estimates up
                for name, form in (("hand await", by_hand_async), ("composite await", composite_async)):
                    t0 = time.perf_counter()
                    out = await form(pool, xs)
                    elapsed = time.perf_counter() - t0
                    assert out == expected, name
                    if rep >= 2:
                        times[name].append(elapsed)

        asyncio.run(run_async())
        for rep in range(repeat + 2):
            for name, form in (("hand result()", by_hand_sync), ("composite result()", composite_sync)):
                t0 = time.perf_counter()
                out = form(pool, xs)
                elapsed = time.perf_counter() - t0
                assert out == expected, name
                if rep >= 2:
                    times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    times = measure(args.items, args.repeat)
    print(f"3 maps of {args.items} items, 2 workers, {args.repeat} repetitions (median, min-max, ms)\n")
    print("| form | median | min | max |\n|---|---|---|---|")
    for name, values in times.items():
        print(
            f"| {name} | {statistics.median(values) * 1e3:.1f} | {min(values) * 1e3:.1f} "
            f"| {max(values) * 1e3:.1f} |"
        )
    for kind in ("await", "result()"):
        hand = statistics.median(times[f"hand {kind}"])
        comp = statistics.median(times[f"composite {kind}"])
        print(
            f"\ncomposite overhead ({kind}): {(comp - hand) * 1e3 / 3:+.2f} ms per step "
            f"(medians {comp * 1e3:.1f} vs {hand * 1e3:.1f} ms)"
        )


if __name__ == "__main__":
    main()
