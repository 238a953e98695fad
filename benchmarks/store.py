"""The result store's costs, beside joblib.Memory on the same workloads.

    python -m benchmarks.store            # ~1-2 min on 2 cores
    python -m benchmarks.store --quick    # a few seconds (the numbers are then rough)

* hits: a map of small-int items whose results are all stored: items per second, from the
  call to the results (fingerprints, look-ups, unpickling; no worker is involved);
  joblib: ``Memory.cache(f)(x)`` per item, the way joblib serves hits;
* recording: a map of 10 ms tasks on 2 workers, all misses, every result recorded as it
  finishes, against the same map uncached: the relative overhead; joblib: ``Parallel``
  over ``delayed(Memory.cache(f))`` against plain ``Parallel``.

Each figure is the median of the repetitions. The report goes to
``benchmarks/results/store.md`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orchestra_nb as orchestra
from orchestra_nb.store import ResultStore

TASK_SECONDS = 0.01


def square(x: int) -> int:
    return x * x


def ten_ms(x: int) -> int:
    time.sleep(TASK_SECONDS)
    return x


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_hits(pool: orchestra.Pool, root: Path, items: int, repeat: int) -> list[float]:
    path = root / "hits.sqlite"
    store = ResultStore(path)
    try:
        pool.map(square, range(items), cache=store).result(600)
        rates = []
        for _ in range(repeat):
            rates.append(items / timed(lambda: pool.map(square, range(items), cache=store).result(600)))
        return rates
    finally:
        store.close()


def bench_recording(
    pool: orchestra.Pool, root: Path, items: int, repeat: int
) -> tuple[list[float], list[float]]:
    plain: list[float] = []
    cached: list[float] = []
    for trial in range(repeat):  # alternate, so that load drifts hit both alike
        plain.append(timed(lambda: pool.map(ten_ms, range(items), chunksize=1).result(600)))
        store = ResultStore(root / f"record-{trial}.sqlite")
        try:
            cached.append(
                timed(lambda s=store: pool.map(ten_ms, range(items), cache=s, chunksize=1).result(600))
            )
            assert store.count() == items
        finally:
            store.close()
    return plain, cached


def bench_joblib(root: Path, hit_items: int, items: int, repeat: int) -> dict[str, Any] | None:
    try:
        import joblib
    except ImportError:
        return None
    memory = joblib.Memory(root / "joblib", verbose=0)
    cached_square = memory.cache(square)
    for x in range(hit_items):
        cached_square(x)
    rates = [hit_items / timed(lambda: [cached_square(x) for x in range(hit_items)]) for _ in range(repeat)]
    plain: list[float] = []
    cached: list[float] = []
    with joblib.Parallel(n_jobs=2) as parallel:
        parallel(joblib.delayed(ten_ms)(x) for x in range(4))  # start its workers first
        for trial in range(repeat):
            plain.append(timed(lambda: parallel(joblib.delayed(ten_ms)(x) for x in range(items))))
            fresh = joblib.Memory(root / f"joblib-{trial}", verbose=0).cache(ten_ms)
            cached.append(timed(lambda f=fresh: parallel(joblib.delayed(f)(x) for x in range(items))))
    return {"version": joblib.__version__, "hits": rates, "plain": plain, "cached": cached}


def overhead(plain: list[float], cached: list[float]) -> float:
    return statistics.median(cached) / statistics.median(plain) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "store.md")
    args = parser.parse_args()
    hit_items, task_items, repeat = (20_000, 100, 2) if args.quick else (200_000, 400, 3)
    joblib_hits = 2_000 if args.quick else 10_000
    root = Path(tempfile.mkdtemp(prefix="orchestra-store-bench-"))
    try:
        with orchestra.Pool(workers=2) as pool:
            pool.wait_started(60)
            hits = bench_hits(pool, root, hit_items, repeat)
            plain, cached = bench_recording(pool, root, task_items, repeat)
        joblib_numbers = bench_joblib(root, joblib_hits, task_items, repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        "# Result store benchmark",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Python {platform.python_version()}, "
        f"{platform.machine()}, 2 workers; median of {repeat} runs" + (" (--quick)" if args.quick else ""),
        "",
        "| workload | orchestra_nb | joblib.Memory |",
        "|---|---|---|",
    ]
    j = joblib_numbers
    lines.append(
        f"| cache hits, items/s ({hit_items:,} items; joblib {joblib_hits:,}) "
        f"| {statistics.median(hits):,.0f} | "
        + (f"{statistics.median(j['hits']):,.0f} |" if j else "not installed |")
    )
    lines.append(
        f"| {task_items} x 10 ms tasks, uncached, s | {statistics.median(plain):.3f} | "
        + (f"{statistics.median(j['plain']):.3f} |" if j else "- |")
    )
    lines.append(
        f"| same, every result recorded, s | {statistics.median(cached):.3f} | "
        + (f"{statistics.median(j['cached']):.3f} |" if j else "- |")
    )
    lines.append(
        f"| recording overhead | {overhead(plain, cached):+.1%} | "
        + (f"{overhead(j['plain'], j['cached']):+.1%} |" if j else "- |")
    )
    lines += [
        "",
        f"raw: hits/s {[round(h) for h in hits]}, plain {plain}, recorded {cached}"
        + (
            f"; joblib {j['version']}: hits/s {[round(h) for h in j['hits']]}, "
            f"plain {j['plain']}, cached {j['cached']}"
            if j
            else ""
        ),
        "",
    ]
    text = "\n".join(lines)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
